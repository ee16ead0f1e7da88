"""The first hooked layer of a decoder forward: checks its inputs and sets up the state.

Turns a :class:`~.decoder_state.NotStarted` phase into :class:`~.decoder_state.Passthrough`
(nothing to do) or :class:`~.decoder_state.Reducing` (the stock forward so far, with the
full-length sequence state the steps will shorten).
"""

from __future__ import annotations

from typing import Any

import torch

from tokenreduce.errors import InvalidInputError

from . import compat
from .decoder_state import PASSTHROUGH, CacheState, Forward, NotStarted, Passthrough, Reducing, Sequence

__all__ = ["start_forward"]


def start_forward(
    pending: NotStarted, hidden: torch.Tensor, kwargs: dict, *, decoder_name: str, positions: str
) -> Passthrough | Reducing:
    """The phase of a forward at its first hooked layer (``hidden``, ``kwargs``: that layer's inputs)."""
    b, q = hidden.shape[:2]
    dev = hidden.device
    cache = compat.get_cache(kwargs)
    # One host read per forward (not per layer): whether its input holds image tokens.
    has_images = pending.image_mask is not None and bool(pending.image_mask.any())
    if not has_images and pending.cache_state is None:
        return PASSTHROUGH  # nothing to reduce and a full-length cache: the stock forward as is
    _check_inputs(pending.attention_mask, cache, pending.cache_state, b)
    pad = _padding_mask(pending.attention_mask, b, pending.past0, q, dev)
    img = _image_tokens(pending.image_mask, b, q, dev) & pad[:, pending.past0 :]
    fwd = Forward(
        cache=cache,
        pad=pad,
        past0=pending.past0,
        cache_state=pending.cache_state,
        image_input=img if has_images else None,
        grid=pending.grid,
    )
    rope_ids = None if pending.rope_ids is None else per_row(pending.rope_ids, b, q)
    layer_ids = kwargs.get("position_ids")
    cos_sin = kwargs.get("position_embeddings")
    if cos_sin is None:
        raise InvalidInputError(f"{decoder_name} does not pass position_embeddings to its layers")
    if positions == "compact" and rope_ids is None:
        raise InvalidInputError("positions='compact': could not read the position ids given to rotary_emb")
    seq = Sequence(
        index=torch.arange(q, device=dev).expand(b, q),
        img=img,
        valid=pad[:, pending.past0 :].clone(),
        dropped_before=torch.zeros(b, q, dtype=torch.long, device=dev),
        total_dropped=torch.zeros(b, dtype=torch.long, device=dev),
        rope_ids=rope_ids,
        layer_ids=None if layer_ids is None else per_row(layer_ids, b, q),
        cos_sin=cos_sin,
        blocks=_blocks(pending.blocks, pending.past0, q, dev),
    )
    return Reducing(fwd, seq)


def _check_inputs(am: Any, cache: Any, state: CacheState | None, b: int) -> None:
    """The attention mask, cache and cache state this machinery supports."""
    if isinstance(am, dict) or (isinstance(am, torch.Tensor) and am.dim() != 2):
        raise InvalidInputError(
            "llm_layer reduction needs a 2-D (B, L) attention_mask (or None), got "
            f"{type(am).__name__ if isinstance(am, dict) else tuple(am.shape)}; static/compiled caches are not supported"
        )
    if cache is not None and not hasattr(cache, "layers"):
        raise InvalidInputError(f"llm_layer reduction supports transformers Cache objects, got {type(cache).__name__}")
    if state is not None and state.masks[0].shape[0] != b:
        raise InvalidInputError(
            f"the cache holds {state.masks[0].shape[0]} rows but this forward has {b}; "
            "beam search / batch reordering is not supported with llm_layer reduction"
        )


def _padding_mask(am: torch.Tensor | None, b: int, past0: int, q: int, dev: torch.device) -> torch.Tensor:
    """``(B, past0 + q)`` bool: which tokens of the full sequence (cache + input) are not padding."""
    if am is None:
        return torch.ones(b, past0 + q, dtype=torch.bool, device=dev)
    if am.shape[1] != past0 + q:
        raise InvalidInputError(f"attention_mask has length {am.shape[1]} but the cache holds {past0} tokens and the input {q}")
    return am.to(dev).bool()


def _image_tokens(mask: torch.Tensor | None, b: int, q: int, dev: torch.device) -> torch.Tensor:
    """``(B, q)`` bool image-token mask of the input (all False when none was given)."""
    if mask is None:
        return torch.zeros(b, q, dtype=torch.bool, device=dev)
    if tuple(mask.shape) != (b, q):
        raise InvalidInputError(f"image mask has shape {tuple(mask.shape)} but the decoder input is {(b, q)}")
    return mask.to(dev)


def _blocks(ids: torch.Tensor | None, past0: int, q: int, dev: torch.device) -> torch.Tensor | None:
    """This forward's columns ``[past0, past0 + q)`` of run ids given by absolute position (-1 past their end)."""
    if ids is None:
        return None
    ids = torch.nn.functional.pad(ids.to(dev), (0, max(0, past0 + q - ids.shape[1])), value=-1)
    return ids[:, past0 : past0 + q]


def per_row(ids: torch.Tensor, b: int, q: int) -> torch.Tensor:
    """Position ids ``(..., 1, q)`` expanded to ``(..., B, q)`` (already per row: unchanged)."""
    return ids.expand(*ids.shape[:-2], b, q) if ids.shape[-2] == 1 else ids
