"""Attention rows and keys of one decoder layer, recomputed from its q/k projections.

The model keeps its fast attention kernel (which returns no weights); a reducer that
needs the attention a few query rows pay, or the keys, gets them recomputed here for
those rows only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from tokenreduce.ops import gather_rows
from tokenreduce.pipeline import Step
from tokenreduce.requirements import decoder_reads

__all__ = ["attention_rows", "layer_keys"]



def reads(step: Step) -> tuple[str, str]:
    """``(query rows, whose q/k)`` an ``llm_layer`` step reads: its reducer's typed requirements
    (:class:`~tokenreduce.requirements.AttentionRows`), e.g. ``("last", "previous")`` for FastV."""
    return decoder_reads(step.reducer.requires)

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _default_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _module_rotary(attn: nn.Module) -> Callable:
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    return fn if callable(fn) else _default_rotary


def attention_rows(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    key_valid: torch.Tensor,
    *,
    past_keys: torch.Tensor | None = None,
    past_valid: torch.Tensor | None = None,
    apply_rotary: Callable | None = None,
) -> torch.Tensor:
    """Head-averaged attention probabilities of some query rows of one decoder layer.

    Recomputes ``softmax(q k^T * scaling + mask)`` from the layer's ``input_layernorm``,
    ``self_attn.q_proj``/``k_proj`` (+ ``q_norm``/``k_norm`` if present) and rotary
    embedding, for ``Q`` query rows only: ``O(Q * L)`` memory instead of ``O(L^2)``.

    Args:
        layer: a decoder layer with ``input_layernorm`` and ``self_attn``.
        hidden: ``(B, L, D)`` the layer's input hidden states.
        cos_sin: the ``(cos, sin)`` rotary tables of ``hidden`` ``(B|1, L, d)``.
        query_index: ``(B, Q)`` positions (into ``hidden``) of the query rows; ``-1`` = none.
        key_valid: ``(B, L)`` bool, keys that may be attended (not padding).
        past_keys: ``(B, H_kv, P, d)`` cached (already rotated) keys before ``hidden``.
        past_valid: ``(B, P)`` bool validity of ``past_keys``.
        apply_rotary: ``(q, k, cos, sin) -> (q, k)``; default: the attention module's own.

    Returns:
        ``(B, Q, P + L)`` float32 attention probabilities (zero rows for ``-1`` queries).
    """
    attn = layer.self_attn
    rot = apply_rotary or _module_rotary(attn)
    b, n, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    head_dim = attn.head_dim
    qx = gather_rows(x, query_index)
    q = attn.q_proj(qx).view(b, qx.shape[1], -1, head_dim)
    k = attn.k_proj(x).view(b, n, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = cos_sin
    cos, sin = cos.expand(b, *cos.shape[-2:]), sin.expand(b, *sin.shape[-2:])
    q = rot(q, q, gather_rows(cos, query_index), gather_rows(sin, query_index))[0]
    k = rot(k, k, cos, sin)[0]
    p = 0
    if past_keys is not None and past_keys.shape[-2] > 0:
        p = past_keys.shape[-2]
        k = torch.cat([past_keys.to(k.dtype), k], dim=2)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scaling
    allowed = _allowed_keys(attn, hidden, query_index, key_valid, p, past_valid)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked (padding) rows -> 0
    return probs.mean(dim=1)


def _allowed_keys(
    attn: nn.Module,
    hidden: torch.Tensor,
    query_index: torch.Tensor,
    key_valid: torch.Tensor,
    p: int,
    past_valid: torch.Tensor | None,
) -> torch.Tensor:
    """``(B, Q, P + L)`` bool: valid past keys + valid current keys at or before the query (causal, windowed)."""
    b, n = hidden.shape[:2]
    dev = hidden.device
    pos = torch.arange(n, device=dev)
    causal = pos.view(1, 1, n) <= query_index.unsqueeze(-1)
    allowed = causal & key_valid.unsqueeze(1)
    window = getattr(attn, "sliding_window", None)
    if window:
        allowed &= (query_index.unsqueeze(-1) - pos.view(1, 1, n)) < window
    if p:
        pv = past_valid if past_valid is not None else torch.ones(b, p, dtype=torch.bool, device=dev)
        past_allowed = pv.unsqueeze(1).expand(b, query_index.shape[1], p)
        if window:
            dist = (query_index.unsqueeze(-1) + p) - torch.arange(p, device=dev).view(1, 1, p)
            past_allowed = past_allowed & (dist < window)
        allowed = torch.cat([past_allowed, allowed], dim=-1)
    return allowed & (query_index >= 0).unsqueeze(-1)


def layer_keys(
    layer: nn.Module, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], apply_rotary: Callable | None = None
) -> torch.Tensor:
    """``(B, L, H_kv * d)`` a decoder layer's keys (post-RoPE, heads concatenated) of its input ``hidden``."""
    attn = layer.self_attn
    rot = apply_rotary or _module_rotary(attn)
    b, n, _ = hidden.shape
    k = attn.k_proj(layer.input_layernorm(hidden)).view(b, n, -1, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    cos, sin = cos_sin
    cos, sin = cos.expand(b, *cos.shape[-2:]), sin.expand(b, *sin.shape[-2:])
    k = rot(k, k, cos, sin)[0]
    return k.transpose(1, 2).reshape(b, n, -1)
