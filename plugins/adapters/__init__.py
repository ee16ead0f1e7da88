"""Built-in model adapters, registered through the ``tokenreduce_register_adapters`` hook.

This package is the built-in ``tokenreduce`` plugin (entry point ``adapters``), so it also
implements the hooks by which the core reaches model-specific code without importing it:
the embedded default model and evaluation default, and vision features for ``show``.
"""

from tokenreduce import hookimpl

from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen_vl import QwenVLAdapter


@hookimpl
def tokenreduce_register_adapters():
    return [LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, QwenVLAdapter, InternVLAdapter, Gemma3Adapter]


@hookimpl
def tokenreduce_default_model():
    from .tiny import build_tiny_llava

    return build_tiny_llava


@hookimpl
def tokenreduce_default_eval():
    from tokenreduce.hookspecs import DefaultEval

    from ..eval_tiny import tiny_samples, write_tiny_checkpoint, write_tiny_tasks

    return DefaultEval(write_checkpoint=write_tiny_checkpoint, write_tasks=write_tiny_tasks, samples=tiny_samples)


@hookimpl
def tokenreduce_vision_features(image, model, model_id, device):
    from .features import llava_features

    return llava_features(image, model, model_id, device)
