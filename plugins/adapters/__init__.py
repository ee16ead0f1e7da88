"""Built-in model adapters, registered through the ``tokenreduce_register_adapters`` hook."""

from tokenreduce import hookimpl

from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen_vl import QwenVLAdapter


@hookimpl
def tokenreduce_register_adapters():
    return [LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, QwenVLAdapter]


@hookimpl
def tokenreduce_default_model():
    from .tiny import build_tiny_llava

    return build_tiny_llava
