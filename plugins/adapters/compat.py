"""Every transformers internal that the adapters touch, in one place.

transformers renames keywords and reshapes internal helpers between minor releases (5.17
calls the KV cache ``past_key_values`` where 5.24 calls it ``cache``; 5.24's multimodal
forwards take pre-encoded features as ``mm_encoder_outputs``, 5.17's do not). Adapters
never name such an internal themselves: they go through the helpers here, which detect
what the installed release offers by its signatures, not by its version string.

The version string is used for one thing only: :func:`check_supported` refuses releases
outside the tested window, where a silent wrong result would be possible.
"""

from __future__ import annotations

import inspect
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from packaging.version import Version

from tokenreduce.errors import ConfigError

from .patches import Patches

#: The oldest and the newest transformers releases the test suite runs against (in CI).
TESTED_RELEASES = ("5.17.0", "5.24.0")
#: The window those ends span: every release from the oldest to the newest tested minor.
SUPPORTED = ">=5.17,<5.25"
_LOW, _HIGH = Version("5.17"), Version("5.25")
#: Set to 1 to run on an untested release anyway (with a warning instead of an error).
ALLOW_ENV = "TOKENREDUCE_ALLOW_UNTESTED_TRANSFORMERS"

#: Names a cache argument has had: the current one first.
CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


def installed_version() -> str:
    return transformers.__version__


def check_supported(version: str | None = None) -> None:
    """Refuse (``ConfigError``) a transformers release outside :data:`SUPPORTED`.

    Model internals change between releases in ways that make a patched model run
    without error but compute something else, so an untested release is refused rather
    than trusted. ``TOKENREDUCE_ALLOW_UNTESTED_TRANSFORMERS=1`` turns the error into a
    warning, for users who test a new release themselves.
    """
    version = version or installed_version()
    v = Version(version)
    if _LOW <= Version(v.base_version) < _HIGH:
        return
    msg = (
        f"tokenreduce's model adapters support transformers {SUPPORTED} (tested: {', '.join(TESTED_RELEASES)}), "
        f"but transformers {version} is installed. Install a supported release, e.g. "
        f"pip install 'transformers{SUPPORTED}', or set {ALLOW_ENV}=1 to run on this release untested."
    )
    if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return
    raise ConfigError(msg)


# -- keyword names -------------------------------------------------------------------------


def signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature(fn)``, remembered per function: it takes tens of microseconds, and the
    wrappers ask for it on every call (a bound method's is its function's, less ``self``)."""
    func = getattr(fn, "__func__", fn)
    cache = _BOUND if func is not fn else _PLAIN
    try:
        sig = cache.get(func)
    except TypeError:  # not weakly referenceable: asked every time
        return inspect.signature(fn)
    if sig is None:
        sig = cache[func] = inspect.signature(fn)
    return sig


_BOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return dict(signature(fn).parameters)


def cache_name(fn: Callable[..., Any]) -> str:
    """The name under which ``fn`` takes the KV cache (``cache`` or ``past_key_values``)."""
    params = parameters(fn)
    return next((n for n in CACHE_NAMES if n in params), "cache")


def get_cache(kw: dict[str, Any]) -> Any:
    """The cache in a call's keyword arguments, whatever its name there."""
    return next((kw[k] for k in CACHE_NAMES if kw.get(k) is not None), None)


def native_kwargs(fn: Callable[..., Any], kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with the cache under the name ``fn`` takes (a copy; other keys untouched)."""
    out = dict(kw)
    present = [k for k in CACHE_NAMES if k in out]
    if present:
        value = next((out[k] for k in present if out[k] is not None), None)
        for k in present:
            del out[k]
        out[cache_name(fn)] = value
    return out


def canonical_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with the cache under ``cache``, the name adapters use internally (a copy)."""
    return native_kwargs(_takes_cache, kw)


def _takes_cache(cache: Any = None) -> None:
    """A signature naming the cache ``cache``."""


def output_cache(out: Any) -> Any:
    """The cache a model output carries (``out.cache`` or ``out.past_key_values``), or None."""
    if isinstance(out, tuple):
        return None
    for name in CACHE_NAMES:
        value = getattr(out, name, None) if not isinstance(out, dict) else out.get(name)
        if value is not None:
            return value
    return None


# -- masks -----------------------------------------------------------------------------------


def causal_mask(kind: str, *, config, inputs_embeds, attention_mask, cache, layer_idx, block_ids=None) -> Any:
    """transformers' own mask for ``kind`` ("full_attention" or "sliding_attention") over ``cache``.

    ``block_ids`` ``(B, P + L)``: runs attended bidirectionally (-1: none), composed as Gemma 3
    composes them: full = causal OR same run; sliding = (causal OR same run) AND window.
    """
    from transformers import masking_utils

    sliding = kind == "sliding_attention"
    fn = (
        masking_utils.create_sliding_window_causal_mask
        if sliding and block_ids is None
        else masking_utils.create_causal_mask
    )
    kw = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        cache_name(fn): cache,
        "position_ids": None,
    }
    if "layer_idx" in parameters(fn):
        kw["layer_idx"] = layer_idx
    if block_ids is not None and sliding:
        kw["or_mask_function"] = masking_utils.blockwise_overlay(block_ids)
        kw["and_mask_function"] = masking_utils.sliding_window_overlay(config.sliding_window)
    elif block_ids is not None:
        kw["block_sequence_ids"] = block_ids
    return fn(**kw)


# -- multimodal forwards ---------------------------------------------------------------------


def takes_encoder_outputs(forward: Callable[..., Any]) -> bool:
    """Whether a multimodal forward accepts pre-encoded features (``mm_encoder_outputs``)."""
    return "mm_encoder_outputs" in parameters(forward)


@contextmanager
def serving_features(inner: torch.nn.Module, outputs: dict[str, Any]) -> Iterator[None]:
    """While active, ``inner.get_<modality>_features(...)`` returns ``outputs[modality]``.

    For releases whose multimodal forward cannot take pre-encoded features: the forward is
    called with its pixel inputs as usual and gets the already reduced features from its
    own feature getter. The instance attributes are removed (or restored) on exit.
    """
    patches = Patches()
    try:
        for modality, value in outputs.items():
            name = f"get_{modality}_features"
            patches.set(inner, name, _serve(getattr(inner, name), value))
        yield
    finally:
        patches.restore()


def _serve(original: Callable[..., Any], value: Any) -> Callable[..., Any]:
    def get_features(*args: Any, **kwargs: Any) -> Any:
        return value

    get_features.__wrapped__ = original  # type: ignore[attr-defined]
    return get_features


def forward_adds_video_newline(inner: torch.nn.Module) -> bool:
    """Whether a LLaVA-OneVision forward appends the newline to the video features itself.

    Older releases add it in ``forward`` after ``get_video_features``; newer ones inside
    the getter. Read from the forward's source, as no signature tells it.
    """
    try:
        return "image_newline" in inspect.getsource(type(inner).forward)
    except (OSError, TypeError):  # no source (frozen install): the newer layout
        return False


def video_features(inner: torch.nn.Module, pixels: torch.Tensor, **kwargs: Any) -> Any:
    """``inner.get_video_features`` with the video pixels under whatever name it takes them."""
    fn = inner.get_video_features
    first = next(iter(parameters(fn)))
    return fn(**{first: pixels}, **kwargs)


def compute_3d_position_ids(inner: torch.nn.Module, **args: Any) -> torch.Tensor | None:
    """Qwen-VL's stock 3-D M-RoPE ids (``compute_3d_position_ids``), the cache under its native name."""
    fn = inner.compute_3d_position_ids
    params = parameters(fn)
    return fn(**{k: v for k, v in native_kwargs(fn, args).items() if k in params})
