"""Packed variable-length attention in one SDPA call, for vision towers that attend within windows.

Qwen-VL vision towers attend within each image (full layers) or within each window of
an image (Qwen2.5-VL's windowed layers). The sequences lie packed one after another,
delimited by ``cu_seqlens``. Under flash-attention the towers make one varlen call per
layer; under SDPA or eager they split the packed tensor and call attention once per
window: at 1344x1344, 4,036 calls per image for Qwen2.5-VL-7B, which leaves the GPU
idle most of the tower's time (the host is the bottleneck).

:func:`packed_sdpa` gives the varlen call without flash-attention: it gathers the
sequences into a padded ``(S_count, H, L_max, D)`` batch, runs one
``scaled_dot_product_attention`` with a key-padding mask and scatters the rows back. It
is registered in transformers' ``AttentionInterface`` under :data:`NAME`; transformers
sends the packed call (``cu_seq_lens_q``) to implementations whose name contains
"flash", hence the name. Nothing here is model-specific beyond that calling convention.

Same mathematics as the per-window calls; SDPA may pick another kernel for the padded,
masked batch, so results agree to rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

#: The registered implementation name ("flash" in it routes the tower's packed call here).
NAME = "tokenreduce_flash_free_packed_sdpa"


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``(1, H, S, D)`` packed q/k/v, sequences at ``cu_seq_lens_q`` -> ``(1, S, H, D)`` outputs."""
    if cu_seq_lens_q is None or attention_mask is not None or is_causal or query.shape[0] != 1:
        # Not the packed bidirectional call this is for (e.g. a text decoder): plain SDPA.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, is_causal=is_causal, **kwargs
        )
    total = query.shape[2]
    cu = cu_seq_lens_q.to(query.device, torch.long)
    count = cu.shape[0] - 1  # a shape: known on the host without reading the tensor
    longest = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
    offsets = torch.arange(longest, device=query.device)
    valid = offsets < (cu[1:] - cu[:-1]).unsqueeze(1)  # (count, longest)
    index = (cu[:-1].unsqueeze(1) + offsets).masked_fill(~valid, 0)

    def batch(x: torch.Tensor) -> torch.Tensor:  # (1, H, S, D) -> (count, H, longest, D)
        return x[0][:, index].transpose(0, 1)

    k, v = batch(key), batch(value)
    if k.shape[1] != query.shape[1]:  # grouped-query attention: repeat the key/value heads
        groups = query.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(
        batch(query), k, v, attn_mask=valid[:, None, None, :], dropout_p=dropout, scale=scaling
    )  # (count, H, longest, D)
    # Back to the packed order; padding rows go to one extra row that is dropped.
    rows = out.transpose(1, 2).reshape(count * longest, *out.shape[1:2], out.shape[-1])
    packed = rows.new_zeros(total + 1, *rows.shape[1:])
    packed.index_copy_(0, index.masked_fill(~valid, total).reshape(-1), rows)
    return packed[:total].unsqueeze(0), None


def register() -> str:
    """Register :func:`packed_sdpa` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_sdpa)
    return NAME


def install(config: Any) -> Callable[[], None] | None:
    """Route a packed-sequence tower (its ``config``) to :func:`packed_sdpa`; returns the undo, or None.

    Under flash-attention the tower already makes one varlen call per layer and is kept.
    ``_attn_implementation`` is a config property: it is restored by assignment.
    """
    current = config._attn_implementation
    if current is not None and "flash" in current:
        return None
    config._attn_implementation = register()

    def undo() -> None:
        config._attn_implementation = current

    return undo
