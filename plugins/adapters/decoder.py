"""LLM-layer token reduction inside any Hugging Face decoder-only text model.

Model-generic: works on a transformers text decoder (``LlamaModel``, ``Qwen2Model``,
``MistralModel``, ``Qwen2_5_VLTextModel``, ...) whose decoder layers are an
``nn.ModuleList`` called as ``layer(hidden_states, attention_mask=..., position_ids=...,
position_embeddings=(cos, sin), cache=..., **kw)`` and which has a ``rotary_emb`` module
called once per forward as ``rotary_emb(x, position_ids)``. Nothing is copied from the
modeling files: everything is done with forward (pre-)hooks, removed by :meth:`detach`.

API
---
::

    red = DecoderReduction(decoder, steps, positions="compact", on_record=records.append)
    red.attach()                  # installs the hooks
    red.set_image_mask(mask)      # (B, L) bool: image-token positions of the NEXT forward's
                                  # input (call before every forward; decode steps pass a
                                  # mask with no True, or nothing)
    out = model(...)              # plain forward or generate(); any number of forwards
    red.last_kept                 # (B, L_out) long: for each position of the last forward's
                                  # output, its input position (-1 = padding slot); None when
                                  # nothing was removed
    red.detach()

``decoder`` is the text model (the module owning ``layers``), e.g.
``llava.model.language_model``; ``steps`` are the pipeline's ``llm_layer`` steps (increasing
layers). Optional arguments: ``apply_rotary(q, k, cos, sin) -> (q, k)`` overrides the rotary
function used to recompute attention rows (default: the attention module's own module-level
``apply_rotary_pos_emb``); ``grid`` in ``set_image_mask`` is passed as ``context.grid``
to a step that sees an unreduced single grid per row.

Semantics
---------
* At the input of decoder layer ``K`` of each step, the image tokens of every row are
  gathered into ``(B, N_max, D)`` (``mask`` marks each row's real ones) and passed to the
  step's reducer; only image tokens are removed, text is untouched; the reducer's kept
  (possibly merged) features are written back in place. Rows that keep different numbers
  of tokens are left-padded with masked slots to a common length.
* Positions: ``"original"`` keeps every token's position ids (any shape whose last dim is
  the sequence: ``(B, L)``, ``(1, L)``, M-RoPE ``(3, B, L)``); ``"compact"`` subtracts,
  per token, the number of tokens removed before it in its row, i.e. layers >= K see the
  position ids the shortened sequence would have had. Rotary embeddings for layers >= K
  are recomputed with ``decoder.rotary_emb`` from those ids (``original`` gathers them).
* Mask and cache: layers < K cache the full sequence, layers >= K the reduced one. The
  causal + padding mask of layers >= K is rebuilt with transformers' own mask functions
  (``create_causal_mask`` / ``create_sliding_window_causal_mask`` sized by that layer's
  cache), so ``eager``, ``sdpa``, ``flash_attention_2`` and ``flex`` all work. What a
  later forward needs (each reduced cache's padding mask, the per-row removed counts for
  ``compact``) is kept per cache object, so every ``generate()`` decoding step is exact.
  Only ``DynamicCache``-style caches are supported (no static cache, no beam reordering).
* Attention context: a reducer with ``"attention"`` in ``required_context`` gets
  ``context.attention (B, Q, N_max)``: the head-averaged attention that the query rows pay
  to the image tokens, softmax over the full causal row, recomputed from the q/k
  projections (+ rotary, + q/k norms if any) of layer ``K - 1`` (``attention_layer =
  "previous"``) or ``K`` (``"current"``) for the query rows only (``attention_query``:
  ``"last"`` = last token, Q = 1; ``"text"`` = text tokens after the row's last image
  token, left-aligned, ``context.text_mask`` marks real rows). The model keeps its fast
  attention kernel.
* Other context at an LLM layer: ``text_embeds (B, Q_t, D)`` + ``text_mask``: the layer
  input hidden states of the text tokens after the last image token (the instruction);
  ``keys (B, N, H_kv * d)`` / ``text_keys (B, Q_t, H_kv * d)``: the image / instruction
  tokens' keys (post-RoPE, heads concatenated) of the layer ``attention_layer`` names;
  ``positions``: the image tokens' current position ids, ``(B, N)`` or ``(B, N, R)``.
* Records: one :class:`~tokenreduce.adapter.StageRecord` per step per forward that saw
  image tokens, passed to ``on_record`` (units = batch rows).
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenreduce.adapter import StageRecord
from tokenreduce.context import ReductionContext
from tokenreduce.errors import ConfigError, InvalidInputError
from tokenreduce.ops import gather_rows
from tokenreduce.pipeline import Step
from tokenreduce.stages import Stage

from . import compat

__all__ = ["DecoderReduction", "attention_rows", "decoder_layers", "find_text_decoder", "layer_keys"]


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The decoder's ``layers`` ModuleList (raises a clear error if there is none)."""
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(decoder).__name__} has no `layers` ModuleList; llm_layer steps cannot be applied")
    return layers


def find_text_decoder(model: nn.Module) -> nn.Module:
    """The text decoder of a (multimodal) causal LM: ``model.model.language_model`` or ``model.model``."""
    inner = getattr(model, "model", model)
    for cand in (getattr(inner, "language_model", None), inner, model):
        if cand is not None and isinstance(getattr(cand, "layers", None), nn.ModuleList):
            return cand
    raise ConfigError(f"cannot find the text decoder (a module with `layers`) in {type(model).__name__}")


def _seq_gather(x: torch.Tensor, src: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """Gather along the sequence dim (the one after ``batch_dim``) with ``src (B, L')`` (-1 -> 0)."""
    b = src.shape[0]
    shape = list(x.shape)
    shape[batch_dim] = b
    x = x.expand(*shape)
    idx = src.clamp(min=0)
    view = [1] * x.dim()
    view[batch_dim], view[batch_dim + 1] = b, src.shape[1]
    full = list(x.shape)
    full[batch_dim + 1] = src.shape[1]
    return torch.gather(x, batch_dim + 1, idx.view(view).expand(full))


def _ids_gather(ids: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Gather position ids ``(..., B|1, L)`` along the last dim."""
    return _seq_gather(ids, src, ids.dim() - 2)


def _cos_gather(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Gather rotary tables ``(..., B|1, L, d)`` along the sequence dim."""
    return _seq_gather(t, src, t.dim() - 3)


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
    # Allowed keys: valid past + valid current keys at or before the query (causal).
    pos = torch.arange(n, device=hidden.device)
    causal = pos.view(1, 1, n) <= query_index.unsqueeze(-1)
    allowed = causal & key_valid.unsqueeze(1)
    window = getattr(attn, "sliding_window", None)
    if window:
        allowed &= (query_index.unsqueeze(-1) - pos.view(1, 1, n)) < window
    if p:
        pv = past_valid if past_valid is not None else torch.ones(b, p, dtype=torch.bool, device=hidden.device)
        past_allowed = pv.unsqueeze(1).expand(b, query_index.shape[1], p)
        if window:
            dist = (query_index.unsqueeze(-1) + p) - torch.arange(p, device=hidden.device).view(1, 1, p)
            past_allowed = past_allowed & (dist < window)
        allowed = torch.cat([past_allowed, allowed], dim=-1)
    allowed &= (query_index >= 0).unsqueeze(-1)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked (padding) rows -> 0
    return probs.mean(dim=1)


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


@dataclass
class _CacheState:
    """What later forwards on the same cache need: per step, the reduced cache's padding
    mask and the number of tokens removed so far in each row."""

    masks: list[torch.Tensor]
    removed: list[torch.Tensor]
    full_len: int


@dataclass
class _Forward:
    """Bookkeeping of one decoder forward (reset by the decoder pre-hook)."""

    attention_mask: torch.Tensor | None
    image_mask: torch.Tensor | None
    grid: tuple[int, int] | None
    initialized: bool = False
    cache: Any = None
    state: _CacheState | None = None
    past0: int = 0
    pad2d: torch.Tensor | None = None
    # Current sequence (after the steps run so far in this forward).
    index: torch.Tensor | None = None  # (B, q) input position of each slot, -1 = padding slot
    img: torch.Tensor | None = None  # (B, q) image token
    valid: torch.Tensor | None = None  # (B, q) not padding
    dropped_before: torch.Tensor | None = None  # (B, q) tokens removed before it in this forward
    rope_ids: torch.Tensor | None = None  # original ids given to rotary_emb, (..., B, q)
    layer_ids: torch.Tensor | None = None  # original `position_ids` kwarg of the layers
    had_layer_ids: bool = False
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None  # stock (original) tables
    active: bool = False
    passive: bool = False
    has_images: bool = False
    step: int = -1
    total_dropped: torch.Tensor | None = None  # (B,) tokens removed in this forward so far
    cur_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
    cur_layer_ids: torch.Tensor | None = None
    mask2d: torch.Tensor | None = None
    masks: dict[str, Any] = field(default_factory=dict)
    new_masks: list[torch.Tensor] = field(default_factory=list)
    new_removed: list[torch.Tensor] = field(default_factory=list)
    captured: dict[int, tuple] = field(default_factory=dict)
    capturing_rope: bool = True


class DecoderReduction:
    """Removes image tokens at decoder layers (``llm_layer`` steps); see the module docstring."""

    def __init__(
        self,
        decoder: nn.Module,
        steps: list[Step],
        *,
        positions: str = "compact",
        on_record: Callable[[StageRecord], None] | None = None,
        apply_rotary: Callable | None = None,
    ):
        if positions not in ("compact", "original"):
            raise ConfigError(f"positions={positions!r} is not allowed; use 'compact' or 'original'")
        self.decoder = decoder
        self.layers = decoder_layers(decoder)
        self.steps = [s for s in steps if s.stage is Stage.LLM_LAYER]
        self.positions = positions
        self.on_record = on_record
        self.apply_rotary = apply_rotary
        self.rotary = getattr(decoder, "rotary_emb", None)
        self.last_kept: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._fwd: _Forward | None = None
        self._pending: tuple[torch.Tensor | None, tuple[int, int] | None] = (None, None)
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.validate()
        self._step_at = {s.layer: j for j, s in enumerate(self.steps)}
        self._capture = {
            s.layer - 1 for s in self.steps if self._needs_attention(s) and s.reducer.attention_layer == "previous"
        }
        self._first = min([s.layer for s in self.steps] + list(self._capture)) if self.steps else 0

    # -- setup ---------------------------------------------------------------------------

    @staticmethod
    def _needs_attention(step: Step) -> bool:
        """Whether the step reads a layer's q/k (attention rows or keys)."""
        return bool({"attention", "keys", "text_keys"} & set(step.reducer.required_context))

    def validate(self) -> None:
        """Raise :class:`ConfigError` if a step cannot run on this decoder."""
        n = len(self.layers)
        for step in self.steps:
            r = step.reducer
            if step.layer is None or not 0 <= step.layer < n:
                raise ConfigError(f"llm_layer step {r.name!r}: layer={step.layer} is out of range; this decoder has layers 0..{n - 1}")
            if self._needs_attention(step):
                if r.attention_query not in ("last", "text"):
                    raise ConfigError(f"reducer {r.name!r}: attention_query={r.attention_query!r}; allowed: 'last', 'text'")
                if r.attention_layer not in ("previous", "current"):
                    raise ConfigError(f"reducer {r.name!r}: attention_layer={r.attention_layer!r}; allowed: 'previous', 'current'")
                if r.attention_layer == "previous" and step.layer == 0:
                    raise ConfigError(
                        f"reducer {r.name!r} reads the attention of the previous layer, so its layer must be >= 1, got layer=0"
                    )
                layer = self.layers[step.layer - 1 if r.attention_layer == "previous" else step.layer]
                attn = getattr(layer, "self_attn", None)
                if attn is None or not hasattr(layer, "input_layernorm") or not hasattr(attn, "q_proj"):
                    raise ConfigError(f"cannot recompute attention rows for {type(layer).__name__} (needs input_layernorm, self_attn.q_proj/k_proj)")
        if self.steps and self.positions == "compact" and not isinstance(getattr(self.decoder, "rotary_emb", None), nn.Module):
            raise ConfigError(f"positions='compact' at llm_layer needs {type(self.decoder).__name__}.rotary_emb; use positions='original'")

    def attach(self) -> None:
        if self._handles or not self.steps:
            return
        self._handles.append(self.decoder.register_forward_pre_hook(self._pre_decoder, with_kwargs=True))
        self._handles.append(self.decoder.register_forward_hook(self._post_decoder))
        if self.rotary is not None:
            self._handles.append(self.rotary.register_forward_pre_hook(self._pre_rotary, with_kwargs=True))
        for i in range(self._first, len(self.layers)):
            hook = self._make_layer_hook(i)
            self._handles.append(self.layers[i].register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._fwd = None
        self._states = weakref.WeakKeyDictionary()

    def set_image_mask(self, mask: torch.Tensor | None, grid: tuple[int, int] | None = None) -> None:
        """Image-token positions ``(B, L)`` of the next forward's input (consumed by it)."""
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise InvalidInputError(f"image mask must be a (B, L) bool tensor, got {getattr(mask, 'shape', mask)!r}")
        self._pending = (None if mask is None else mask.bool(), grid)

    # -- hooks -----------------------------------------------------------------------------

    def _pre_decoder(self, module, args, kwargs):
        am = kwargs.get("attention_mask")
        mask, grid = self._pending
        self._pending = (None, None)
        fwd = _Forward(attention_mask=am, image_mask=mask, grid=grid)
        # Before any layer runs: how many tokens the sequence had before this forward
        # (full length; reduced layers hold fewer) and the state of a reduced cache.
        cache = compat.get_cache(kwargs)
        if cache is not None and hasattr(cache, "get_seq_length"):
            state = self._states.get(cache)
            if state is not None and cache.get_seq_length(self.steps[0].layer) == 0:
                state = None  # the cache was reset since: a fresh sequence
            fwd.state = state
            fwd.past0 = state.full_len if state is not None else cache.get_seq_length(0)
        self._fwd = fwd
        self.last_kept = None

    def _post_decoder(self, module, args, output):
        fwd, self._fwd = self._fwd, None
        if fwd is None or not fwd.initialized or not fwd.active:
            return
        self.last_kept = fwd.index
        if fwd.cache is not None and len(fwd.new_masks) == len(self.steps):
            self._states[fwd.cache] = _CacheState(fwd.new_masks, fwd.new_removed, fwd.pad2d.shape[1])
        return

    def _pre_rotary(self, module, args, kwargs):
        fwd = self._fwd
        if fwd is not None and fwd.capturing_rope and fwd.rope_ids is None:
            ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            fwd.rope_ids = ids

    def _make_layer_hook(self, i: int):
        def hook(module, args, kwargs):
            fwd = self._fwd
            if fwd is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if not fwd.initialized:
                self._init_forward(fwd, hidden, kwargs)
            if fwd.passive:
                return None
            if i in self._step_at:
                hidden = self._run_step(self._step_at[i], i, hidden, kwargs)
            if fwd.active and fwd.step >= 0:
                kwargs = dict(kwargs)
                kwargs["attention_mask"] = self._mask_for(i, hidden)
                kwargs["position_embeddings"] = fwd.cur_cos_sin
                if fwd.had_layer_ids:
                    kwargs["position_ids"] = fwd.cur_layer_ids
            if i in self._capture:
                cache = fwd.cache
                past = cache.get_seq_length(i) if cache is not None else 0
                cos_sin = kwargs.get("position_embeddings")
                fwd.captured[i] = (hidden, cos_sin, past)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    # -- per-forward state ------------------------------------------------------------------

    def _init_forward(self, fwd: _Forward, hidden: torch.Tensor, kwargs: dict) -> None:
        fwd.initialized = True
        fwd.capturing_rope = False
        b, q = hidden.shape[:2]
        dev = hidden.device
        cache = compat.get_cache(kwargs)
        fwd.cache = cache
        state, fwd.past0 = fwd.state, fwd.past0
        has_images = fwd.image_mask is not None and bool(fwd.image_mask.any())
        fwd.has_images = has_images
        if not has_images and state is None:
            fwd.passive = True  # nothing to reduce and a full-length cache: the stock forward as is
            return
        am = fwd.attention_mask
        if isinstance(am, dict) or (isinstance(am, torch.Tensor) and am.dim() != 2):
            raise InvalidInputError(
                "llm_layer reduction needs a 2-D (B, L) attention_mask (or None), got "
                f"{type(am).__name__ if isinstance(am, dict) else tuple(am.shape)}; static/compiled caches are not supported"
            )
        if cache is not None and not hasattr(cache, "layers"):
            raise InvalidInputError(f"llm_layer reduction supports transformers Cache objects, got {type(cache).__name__}")
        if state is not None:
            if state.masks[0].shape[0] != b:
                raise InvalidInputError(
                    f"the cache holds {state.masks[0].shape[0]} rows but this forward has {b}; "
                    "beam search / batch reordering is not supported with llm_layer reduction"
                )
            fwd.state = state
        if am is None:
            fwd.pad2d = torch.ones(b, fwd.past0 + q, dtype=torch.bool, device=dev)
        else:
            if am.shape[1] != fwd.past0 + q:
                raise InvalidInputError(
                    f"attention_mask has length {am.shape[1]} but the cache holds {fwd.past0} tokens and the input {q}"
                )
            fwd.pad2d = am.to(dev).bool()
        img = fwd.image_mask
        if img is None:
            img = torch.zeros(b, q, dtype=torch.bool, device=dev)
        elif tuple(img.shape) != (b, q):
            raise InvalidInputError(f"image mask has shape {tuple(img.shape)} but the decoder input is {(b, q)}")
        fwd.img = img.to(dev) & fwd.pad2d[:, fwd.past0 :]
        fwd.valid = fwd.pad2d[:, fwd.past0 :].clone()
        fwd.index = torch.arange(q, device=dev).expand(b, q)
        fwd.dropped_before = torch.zeros(b, q, dtype=torch.long, device=dev)
        fwd.total_dropped = torch.zeros(b, dtype=torch.long, device=dev)
        if fwd.rope_ids is not None:
            ids = fwd.rope_ids
            fwd.rope_ids = ids.expand(*ids.shape[:-2], b, q) if ids.shape[-2] == 1 else ids
        fwd.had_layer_ids = kwargs.get("position_ids") is not None
        if fwd.had_layer_ids:
            ids = kwargs["position_ids"]
            fwd.layer_ids = ids.expand(*ids.shape[:-2], b, q) if ids.shape[-2] == 1 else ids
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is None:
            raise InvalidInputError(f"{type(self.decoder).__name__} does not pass position_embeddings to its layers")
        fwd.cos_sin = cos_sin
        if self.positions == "compact" and fwd.rope_ids is None:
            raise InvalidInputError("positions='compact': could not read the position ids given to rotary_emb")
        # A cache produced by earlier reduced forwards: layers >= K already hold fewer tokens.
        fwd.active = fwd.state is not None

    def _past_mask(self, fwd: _Forward, j: int) -> torch.Tensor:
        if fwd.state is not None:
            return fwd.state.masks[j]
        return fwd.pad2d[:, : fwd.past0]

    def _past_removed(self, fwd: _Forward, j: int) -> torch.Tensor:
        b = fwd.valid.shape[0]
        if fwd.state is not None:
            return fwd.state.removed[j]
        return torch.zeros(b, dtype=torch.long, device=fwd.valid.device)

    # -- one step ------------------------------------------------------------------------------

    def _run_step(self, j: int, layer_idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        fwd = self._fwd
        b, q, _ = hidden.shape
        dev = hidden.device
        drop = torch.zeros(b, q, dtype=torch.bool, device=dev)
        has_images = fwd.has_images
        if has_images:
            n_img = fwd.img.sum(dim=1)
            if int(n_img.max()) > 0:
                hidden, drop = self._reduce(j, layer_idx, hidden, kwargs, n_img)
            has_images = bool(drop.any())
        if not has_images and not fwd.active:
            # Nothing removed yet: the stock computation goes on untouched; these layers
            # cache the full sequence.
            fwd.new_masks.append(fwd.pad2d)
            fwd.new_removed.append(self._past_removed(fwd, j))
            return hidden
        pos = torch.arange(q, device=dev).expand(b, q)
        if has_images:
            keep = ~drop
            length = int(keep.sum(dim=1).max())
            # Kept slots in order, right-aligned (rows with fewer kept get padding slots on the left).
            src = torch.sort(torch.where(keep, pos, torch.full_like(pos, -1)), dim=1).values[:, q - length :]
        else:  # decoding on a reduced cache: nothing to remove, no host sync needed
            src = pos
        slot = src >= 0
        dropped_before = fwd.dropped_before + drop.long().cumsum(dim=1)
        fwd.total_dropped = fwd.total_dropped + drop.sum(dim=1)
        hidden = gather_rows(hidden, src).masked_fill(~slot.unsqueeze(-1), 0)
        fwd.index = gather_rows(fwd.index, src).masked_fill(~slot, -1)
        fwd.img = gather_rows(fwd.img, src) & slot
        fwd.valid = gather_rows(fwd.valid, src) & slot
        fwd.dropped_before = gather_rows(dropped_before, src).masked_fill(~slot, 0)
        if fwd.rope_ids is not None:
            fwd.rope_ids = _ids_gather(fwd.rope_ids, src)
        if fwd.layer_ids is not None:
            fwd.layer_ids = _ids_gather(fwd.layer_ids, src)
        cos, sin = fwd.cos_sin
        fwd.cos_sin = (_cos_gather(cos, src), _cos_gather(sin, src))
        fwd.active = True
        fwd.step = j
        # Positions of the layers >= K.
        shift = self._past_removed(fwd, j).unsqueeze(1) + fwd.dropped_before  # (B, q')
        if self.positions == "compact":
            ids = fwd.rope_ids - shift
            fwd.cur_cos_sin = self.rotary(hidden, ids)
            fwd.cur_layer_ids = None if fwd.layer_ids is None else fwd.layer_ids - shift
        else:
            fwd.cur_cos_sin = fwd.cos_sin
            fwd.cur_layer_ids = fwd.layer_ids
            if "flash" in str(getattr(self.decoder.config, "_attn_implementation", "")):
                fwd.cur_layer_ids = None  # gapped ids would look like packed sequences to flash-attn
        # Padding mask of the reduced cache: what it held before + this forward's slots.
        past = self._past_mask(fwd, j)
        cache = fwd.cache
        if cache is not None:
            held = cache.get_seq_length(layer_idx)
            if held != past.shape[1]:
                raise InvalidInputError(
                    f"layer {layer_idx} caches {held} tokens but the reduction state expects {past.shape[1]}; "
                    "was the cache built, cropped or reordered outside this adapter?"
                )
        fwd.mask2d = torch.cat([past.to(dev), fwd.valid], dim=1)
        fwd.masks = {}
        fwd.new_masks.append(fwd.mask2d)
        fwd.new_removed.append(self._past_removed(fwd, j) + fwd.total_dropped)
        return hidden

    def _mask_for(self, i: int, hidden: torch.Tensor):
        """The 4-D (or backend-specific) mask of layer ``i`` over the reduced cache, built once per step and type."""
        fwd = self._fwd
        types = getattr(self.decoder.config, "layer_types", None)
        kind = types[i] if types is not None and i < len(types) else "full_attention"
        if kind not in fwd.masks:
            fwd.masks[kind] = compat.causal_mask(
                kind,
                config=self.decoder.config,
                inputs_embeds=hidden,
                attention_mask=fwd.mask2d,
                cache=fwd.cache,
                layer_idx=i if fwd.cache is not None else None,
            )
        return fwd.masks[kind]

    def _reduce(self, j: int, layer_idx: int, hidden: torch.Tensor, kwargs: dict, n_img: torch.Tensor):
        """Run the step's reducer on the image tokens; returns (hidden with kept features written back, drop mask)."""
        fwd = self._fwd
        step = self.steps[j]
        reducer = step.reducer
        b, q, d = hidden.shape
        dev = hidden.device
        pos = torch.arange(q, device=dev).expand(b, q)
        n_max = int(n_img.max())
        # Image positions first, in order (stable sort), then the rest.
        img_pos = torch.sort(torch.where(fwd.img, pos, pos + q), dim=1).values[:, :n_max]
        img_valid = torch.arange(n_max, device=dev).unsqueeze(0) < n_img.unsqueeze(1)
        img_pos = img_pos.masked_fill(~img_valid, -1)
        tokens = gather_rows(hidden, img_pos).masked_fill(~img_valid.unsqueeze(-1), 0)
        context = self._context(j, layer_idx, hidden, kwargs, img_pos, img_valid)
        start = time.perf_counter()
        red = reducer(tokens, mask=img_valid, context=context)
        seconds = time.perf_counter() - start
        kept_slot = red.valid
        kept_pos = gather_rows(img_pos.unsqueeze(-1), red.indices).squeeze(-1).masked_fill(~kept_slot, q)
        # Write the kept (possibly merged) features back; padded slots go to a spare row q.
        buf = torch.cat([hidden, hidden.new_zeros(b, 1, d)], dim=1)
        buf = buf.scatter(1, kept_pos.unsqueeze(-1).expand(-1, -1, d), red.tokens.to(hidden.dtype))
        hidden = buf[:, :q]
        keep_img = torch.zeros(b, q + 1, dtype=torch.bool, device=dev).scatter(1, kept_pos, True)[:, :q]
        drop = fwd.img & ~keep_img
        if self.on_record is not None:
            self.on_record(_record(step, n_img, red, seconds))
        return hidden, drop

    def _context(self, j, layer_idx, hidden, kwargs, img_pos, img_valid) -> ReductionContext:
        fwd = self._fwd
        step = self.steps[j]
        reducer = step.reducer
        b, q, _ = hidden.shape
        dev = hidden.device
        pos = torch.arange(q, device=dev).expand(b, q)
        # Text tokens after the row's last image token (the instruction), left-aligned.
        last_img = torch.where(fwd.img, pos, torch.full_like(pos, -1)).max(dim=1).values
        is_text = fwd.valid & ~fwd.img & (pos > last_img.unsqueeze(1)) & (last_img >= 0).unsqueeze(1)
        n_text = is_text.sum(dim=1)
        t_max = max(int(n_text.max()), 1)
        text_pos = torch.sort(torch.where(is_text, pos, pos + q), dim=1).values[:, :t_max]
        text_mask = torch.arange(t_max, device=dev).unsqueeze(0) < n_text.unsqueeze(1)
        text_pos = text_pos.masked_fill(~text_mask, -1)
        text_embeds = gather_rows(hidden, text_pos).masked_fill(~text_mask.unsqueeze(-1), 0)
        # Current position ids of the image tokens.
        ids = fwd.rope_ids if fwd.rope_ids is not None else fwd.layer_ids
        positions = None
        if ids is not None:
            if fwd.active and self.positions == "compact":
                ids = ids - (self._past_removed(fwd, j).unsqueeze(1) + fwd.dropped_before)
            g = _ids_gather(ids, img_pos)
            positions = g if g.dim() == 2 else g.movedim(0, -1).reshape(b, img_pos.shape[1], -1)
        attention = None
        if "attention" in reducer.required_context:
            if reducer.attention_query == "last":
                qidx = torch.where(fwd.valid, pos, torch.full_like(pos, -1)).max(dim=1, keepdim=True).values
            else:
                qidx = text_pos
            probs = self._attention(j, layer_idx, hidden, kwargs, qidx)
            p = probs.shape[-1] - q
            cols = (img_pos + p).clamp(min=0)
            attention = torch.gather(probs, 2, cols.unsqueeze(1).expand(-1, qidx.shape[1], -1))
            attention = attention.masked_fill(~img_valid.unsqueeze(1), 0).to(hidden.dtype)
        keys = text_keys = None
        if {"keys", "text_keys"} & set(reducer.required_context):
            li, h, cos_sin, _ = self._source(j, layer_idx, hidden, kwargs)
            k = layer_keys(self.layers[li], h, cos_sin, self.apply_rotary)
            keys = gather_rows(k, img_pos).masked_fill(~img_valid.unsqueeze(-1), 0)
            text_keys = gather_rows(k, text_pos).masked_fill(~text_mask.unsqueeze(-1), 0)
        grid = None
        if fwd.grid is not None and not fwd.active and bool((img_valid.sum(1) == fwd.grid[0] * fwd.grid[1]).all()):
            grid = fwd.grid
        return ReductionContext(
            stage=Stage.LLM_LAYER,
            layer=layer_idx,
            text_embeds=text_embeds,
            text_mask=text_mask,
            attention=attention,
            keys=keys,
            text_keys=text_keys,
            positions=positions,
            grid=grid,
            extra={"image_positions": img_pos},
        )

    def _source(self, j, layer_idx, hidden, kwargs):
        """Layer whose q/k a step reads (``attention_layer``), its input, rotary tables and cached length."""
        fwd = self._fwd
        if self.steps[j].reducer.attention_layer == "previous":
            li = layer_idx - 1
            h, cos_sin, past = fwd.captured[li]
            return li, h, cos_sin, past
        cos_sin = fwd.cur_cos_sin if fwd.active and fwd.step >= 0 else kwargs.get("position_embeddings")
        past = fwd.cache.get_seq_length(layer_idx) if fwd.cache is not None else 0
        return layer_idx, hidden, cos_sin, past

    def _attention(self, j, layer_idx, hidden, kwargs, qidx) -> torch.Tensor:
        fwd = self._fwd
        li, h, cos_sin, past = self._source(j, layer_idx, hidden, kwargs)
        past_keys = past_valid = None
        if past > 0:
            past_keys = fwd.cache.layers[li].keys[:, :, :past]
            past_valid = self._past_mask_for_layer(fwd, li)
        return attention_rows(
            self.layers[li], h, cos_sin, qidx, fwd.valid,
            past_keys=past_keys, past_valid=past_valid, apply_rotary=self.apply_rotary,
        )

    def _past_mask_for_layer(self, fwd: _Forward, li: int) -> torch.Tensor:
        js = [j for j, s in enumerate(self.steps) if s.layer <= li]
        return fwd.pad2d[:, : fwd.past0] if not js else self._past_mask(fwd, js[-1])


def _record(step: Step, n_img: torch.Tensor, red, seconds: float) -> StageRecord:
    b = n_img.shape[0]
    counts = red.counts
    info = []
    for row in range(b):
        info.append({k: (v[row] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b else v) for k, v in red.info.items()})
    return StageRecord(
        stage=Stage.LLM_LAYER,
        reducer=step.reducer.name,
        layer=step.layer,
        tokens_before=n_img.tolist(),
        tokens_after=counts.tolist(),
        indices=[red.indices[row, : int(counts[row])].detach() for row in range(b)],
        info=info,
        seconds=seconds,
    )
