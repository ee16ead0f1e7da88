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
  are recomputed with ``decoder.rotary_emb`` from those ids (``original`` gathers them);
  a rotary taking the layer type (Gemma 3's local and global bases) gives each layer its own.
* Mask and cache: layers < K cache the full sequence, layers >= K the reduced one. The
  causal + padding mask of layers >= K is rebuilt with transformers' own mask functions
  (``create_causal_mask`` / ``create_sliding_window_causal_mask`` sized by that layer's
  cache), so ``eager``, ``sdpa``, ``flash_attention_2`` and ``flex`` all work. What a
  later forward needs (each reduced cache's padding mask, the per-row removed counts for
  ``compact``) is kept per cache object, so every ``generate()`` decoding step is exact.
  Only ``DynamicCache``-style caches are supported (no static cache, no beam reordering).
  A decoder handed a prebuilt mask mapping (Gemma 3) gets the 2-D mask and the ids of its
  bidirectional image runs from the adapter (``set_image_mask(padding=, blocks=)``); the
  rebuilt masks keep the kept tokens' runs, composed as the model composes them.
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

Modules: the per-forward state and its phases are in :mod:`.decoder_state`, the checks and
set-up at a forward's first hooked layer in :mod:`.decoder_start`, the reducer's context
in :mod:`.decoder_context`, the recomputed attention rows and keys in
:mod:`.decoder_attention`. A step whose reducer class says ``acts_at = "decode"`` (DyCoke's
KV pruning) is not run on prompts but on decode steps, by :mod:`.decoder_kv`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tokenreduce.adapter import StageRecord
from tokenreduce.errors import ConfigError, InvalidInputError
from tokenreduce.ops import gather_rows
from tokenreduce.pipeline import Step, check_decoder_step, reads_decoder_qk
from tokenreduce.stages import Stage

from . import compat
from .decoder_attention import attention_rows, layer_keys, reads
from .decoder_context import StepSite, step_context, step_record
from .decoder_kv import DecodePruning, acts_at_decode
from .decoder_start import start_forward
from .decoder_state import CacheState, NotStarted, Passthrough, Reduced, Reducing

__all__ = ["DecoderReduction", "attention_rows", "decoder_layers", "layer_keys"]

#: The state of the forward in progress: None outside a decoder forward.
Phase = NotStarted | Passthrough | Reducing | Reduced
#: ``set_image_mask(padding=...)`` not given.
_UNSET: Any = object()


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The decoder's ``layers`` ModuleList (raises a clear error if there is none)."""
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(decoder).__name__} has no `layers` ModuleList; llm_layer steps cannot be applied")
    return layers


def _needs_attention(step: Step) -> bool:
    """Whether the step reads a layer's q/k (attention rows or keys)."""
    return reads_decoder_qk(step.reducer)


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
        llm = [s for s in steps if s.stage is Stage.LLM_LAYER]
        # Decode-time steps (DyCoke's KV pruning) leave prefills alone: run by .decoder_kv.
        self.steps = [s for s in llm if not acts_at_decode(s)]
        self.decode = DecodePruning.build(
            decoder, self.layers, [s for s in llm if acts_at_decode(s)], self.steps,
            on_record=on_record, apply_rotary=apply_rotary,
        )
        self.positions = positions
        self.on_record = on_record
        self.apply_rotary = apply_rotary
        self.rotary = getattr(decoder, "rotary_emb", None)
        # A rotary embedding called once per layer type (Gemma 3: local and global bases): tables per layer.
        typed = self.rotary is not None and "layer_type" in compat.parameters(self.rotary.forward)
        self._kinds = list(decoder.config.layer_types) if typed else None
        self.last_kept: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._phase: Phase | None = None
        self._pending: tuple = (None, None, _UNSET, None)
        self.paused = False  # the fast path runs the steps itself (fast_layers): these hooks sit out
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.validate()
        self._step_at = {s.layer: j for j, s in enumerate(self.steps)}
        self._step_layers = [s.layer for s in self.steps]
        self._capture = {s.layer - 1 for s in self.steps if _needs_attention(s) and reads(s)[1] == "previous"}
        self._first = min(self._step_layers + list(self._capture)) if self.steps else 0

    # -- setup ---------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise :class:`ConfigError` if a step cannot run on this decoder."""
        n = len(self.layers)
        for step in self.steps:
            r = step.reducer
            if step.layer is None or not 0 <= step.layer < n:
                raise ConfigError(f"llm_layer step {r.name!r}: layer={step.layer} is out of range; this decoder has layers 0..{n - 1}")
            if _needs_attention(step):
                self._validate_attention_step(step)
        if self.steps and self.positions == "compact" and not isinstance(getattr(self.decoder, "rotary_emb", None), nn.Module):
            raise ConfigError(f"positions='compact' at llm_layer needs {type(self.decoder).__name__}.rotary_emb; use positions='original'")

    def _validate_attention_step(self, step: Step) -> None:
        check_decoder_step(step.reducer, step.layer)  # the typed requirement's values, as every step's
        layer = self.layers[step.layer - 1 if reads(step)[1] == "previous" else step.layer]
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(layer, "input_layernorm") or not hasattr(attn, "q_proj"):
            raise ConfigError(f"cannot recompute attention rows for {type(layer).__name__} (needs input_layernorm, self_attn.q_proj/k_proj)")

    def attach(self) -> None:
        if self.decode is not None:
            self.decode.attach()
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
        if self.decode is not None:
            self.decode.detach()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._phase = None
        self._states = weakref.WeakKeyDictionary()

    def set_image_mask(
        self,
        mask: torch.Tensor | None,
        grid: tuple[int, int] | None = None,
        *,
        padding: Any = _UNSET,
        blocks: torch.Tensor | None = None,
    ) -> None:
        """Image-token positions ``(B, L)`` of the next forward's input (consumed by it).

        For a decoder handed a prebuilt mask mapping (Gemma 3): ``padding`` is the 2-D mask it
        was built from (None: no padding); ``blocks`` ``(B, L_t)`` the ids of the runs its masks
        make bidirectional, by absolute position (-1: none), which the reduced masks keep.
        """
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise InvalidInputError(f"image mask must be a (B, L) bool tensor, got {getattr(mask, 'shape', mask)!r}")
        self._pending = (None if mask is None else mask.bool(), grid, padding, blocks)
        if self.decode is not None:
            self.decode.set_image_mask(self._pending[0], **({} if padding is _UNSET else {"padding": padding}))

    # -- hooks -----------------------------------------------------------------------------

    def _pre_decoder(self, module, args, kwargs):
        if self.paused:
            self._phase = None
            return
        mask, grid, padding, blocks = self._pending
        self._pending = (None, None, _UNSET, None)
        state, past0 = self._cache_state(compat.get_cache(kwargs))
        am = kwargs.get("attention_mask")
        am = padding if isinstance(am, dict) and padding is not _UNSET else am
        self._phase = NotStarted(am, mask, grid, cache_state=state, past0=past0, blocks=blocks)
        self.last_kept = None

    def _cache_state(self, cache: Any) -> tuple[CacheState | None, int]:
        """Before any layer runs: the state of a reduced cache and how many tokens the sequence
        had before this forward (full length; reduced layers hold fewer)."""
        if cache is None or not hasattr(cache, "get_seq_length"):
            return None, 0
        state = self._states.get(cache)
        if state is not None and cache.get_seq_length(self.steps[0].layer) == 0:
            state = None  # the cache was reset since: a fresh sequence
        return state, state.full_len if state is not None else cache.get_seq_length(0)

    def _post_decoder(self, module, args, output):
        phase, self._phase = self._phase, None
        if not isinstance(phase, Reduced):
            return
        self.last_kept = phase.seq.index
        if phase.fwd.cache is not None and len(phase.saved) == len(self.steps):
            masks, removed = zip(*phase.saved)
            self._states[phase.fwd.cache] = CacheState(masks, removed, phase.fwd.pad.shape[1])

    def _pre_rotary(self, module, args, kwargs):
        if isinstance(self._phase, NotStarted):
            self._phase = self._phase.with_rope_ids(kwargs.get("position_ids", args[1] if len(args) > 1 else None))

    def _make_layer_hook(self, i: int):
        def hook(module, args, kwargs):
            phase = self._phase
            if phase is None or isinstance(phase, Passthrough):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if isinstance(phase, NotStarted):
                phase = self._phase = start_forward(
                    phase, hidden, kwargs, decoder_name=type(self.decoder).__name__, positions=self.positions
                )
                if isinstance(phase, Passthrough):
                    return None
            if i in self._step_at:
                hidden, phase = self._run_step(phase, self._step_at[i], i, hidden, kwargs)
                self._phase = phase
            if isinstance(phase, Reduced):
                kwargs = self._reduced_layer_kwargs(phase, i, hidden, kwargs)
            if i in self._capture:
                self._capture_layer(phase, i, hidden, kwargs)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _reduced_layer_kwargs(self, phase: Reduced, i: int, hidden: torch.Tensor, kwargs: dict) -> dict:
        """Layer ``i``'s kwargs for the reduced sequence: its mask, rotary tables and position ids."""
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = self._mask_for(phase, i, hidden)
        kwargs["position_embeddings"] = phase.table(i)
        if phase.seq.layer_ids is not None:  # the model passes position_ids to its layers
            kwargs["position_ids"] = phase.layer_ids
        return kwargs

    @staticmethod
    def _capture_layer(phase: Reducing | Reduced, i: int, hidden: torch.Tensor, kwargs: dict) -> None:
        """Keep layer ``i``'s input for a later step reading its attention (``attention_layer="previous"``)."""
        cache = phase.fwd.cache
        past = cache.get_seq_length(i) if cache is not None else 0
        phase.fwd.captured[i] = (hidden, kwargs.get("position_embeddings"), past)

    def _mask_for(self, phase: Reduced, i: int, hidden: torch.Tensor):
        """The 4-D (or backend-specific) mask of layer ``i`` over the reduced cache, built once per step and type."""
        types = getattr(self.decoder.config, "layer_types", None)
        kind = types[i] if types is not None and i < len(types) else "full_attention"
        if kind not in phase.masks:
            blocks = phase.seq.blocks  # the kept slots' bidirectional runs; none in the cache
            if blocks is not None:
                blocks = torch.nn.functional.pad(blocks, (phase.mask2d.shape[1] - blocks.shape[1], 0), value=-1)
            phase.masks[kind] = compat.causal_mask(
                kind,
                config=self.decoder.config,
                inputs_embeds=hidden,
                attention_mask=phase.mask2d,
                cache=phase.fwd.cache,
                layer_idx=i if phase.fwd.cache is not None else None,
                block_ids=blocks,
            )
        return phase.masks[kind]

    # -- one step ------------------------------------------------------------------------------

    def _run_step(
        self, phase: Reducing | Reduced, j: int, layer_idx: int, hidden: torch.Tensor, kwargs: dict
    ) -> tuple[torch.Tensor, Reducing | Reduced]:
        """Step ``j`` at the input of layer ``layer_idx``: the (shortened) hidden states and the phase after it."""
        fwd = phase.fwd
        hidden, drop = self._apply_reducer(phase, j, layer_idx, hidden, kwargs)
        b, q, _ = hidden.shape
        if drop is not None:
            src = self._kept_slots(drop)
        elif isinstance(phase, Reducing) and fwd.cache_state is None:
            # Nothing removed yet: the stock computation goes on untouched; these layers
            # cache the full sequence.
            return hidden, Reducing(fwd, phase.seq, (*phase.saved, (fwd.pad, fwd.past_removed(j))))
        else:  # nothing removed here, on a reduced sequence: every slot stays, no host sync needed
            src = torch.arange(q, device=hidden.device).expand(b, q)
            drop = torch.zeros(b, q, dtype=torch.bool, device=hidden.device)
        seq = phase.seq.gather(src, drop)
        hidden = gather_rows(hidden, src).masked_fill(~(src >= 0).unsqueeze(-1), 0)
        return hidden, self._reduced_phase(phase, seq, j, layer_idx, hidden)

    def _apply_reducer(
        self, phase: Reducing | Reduced, j: int, layer_idx: int, hidden: torch.Tensor, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's reducer on the image tokens left, if any: hidden states with the kept features
        written back and the ``(B, q)`` tokens to remove (None when it removes none)."""
        if phase.fwd.image_input is None:  # a forward without image tokens (decoding)
            return hidden, None
        n_img = phase.seq.img.sum(dim=1)
        if int(n_img.max()) == 0:  # an earlier step removed them all
            return hidden, None
        hidden, drop = self._reduce(phase, j, layer_idx, hidden, kwargs, n_img)
        return hidden, drop if bool(drop.any()) else None

    @staticmethod
    def _kept_slots(drop: torch.Tensor) -> torch.Tensor:
        """``(B, q')`` kept slots in order, right-aligned: rows keeping fewer get padding slots (-1) on the left."""
        b, q = drop.shape
        pos = torch.arange(q, device=drop.device).expand(b, q)
        keep = ~drop
        length = int(keep.sum(dim=1).max())
        return torch.sort(torch.where(keep, pos, torch.full_like(pos, -1)), dim=1).values[:, q - length :]

    def _reduced_phase(self, phase: Reducing | Reduced, seq, j: int, layer_idx: int, hidden: torch.Tensor) -> Reduced:
        """The inputs of the layers >= step ``j``'s layer for the reduced sequence ``seq``."""
        fwd = phase.fwd
        shift = seq.shift(fwd, j)  # (B, q')
        if self.positions == "compact":
            cos_sin = self._rope(hidden, seq.rope_ids - shift)
            layer_ids = None if seq.layer_ids is None else seq.layer_ids - shift
        else:
            cos_sin, layer_ids = seq.cos_sin if self._kinds is None else self._rope(hidden, seq.rope_ids), seq.layer_ids
            if "flash" in str(getattr(self.decoder.config, "_attn_implementation", "")):
                layer_ids = None  # gapped ids would look like packed sequences to flash-attn
        # Padding mask of the reduced cache: what it held before + this forward's slots.
        past = fwd.past_mask(j)
        self._check_cache_length(fwd.cache, layer_idx, past.shape[1])
        mask2d = torch.cat([past.to(hidden.device), seq.valid], dim=1)
        saved = (*phase.saved, (mask2d, fwd.past_removed(j) + seq.total_dropped))
        return Reduced(fwd, seq, saved, step=j, cos_sin=cos_sin, layer_ids=layer_ids, mask2d=mask2d)

    def _rope(self, hidden: torch.Tensor, ids: torch.Tensor):
        """Rotary tables at ``ids``: one pair, or ``{layer: pair}`` for a rotary taking the layer type."""
        if self._kinds is None:
            return self.rotary(hidden, ids)
        by_kind = {k: self.rotary(hidden, ids, k) for k in set(self._kinds)}
        return {i: by_kind[k] for i, k in enumerate(self._kinds)}

    @staticmethod
    def _check_cache_length(cache: Any, layer_idx: int, expected: int) -> None:
        if cache is None:
            return
        held = cache.get_seq_length(layer_idx)
        if held != expected:
            raise InvalidInputError(
                f"layer {layer_idx} caches {held} tokens but the reduction state expects {expected}; "
                "was the cache built, cropped or reordered outside this adapter?"
            )

    def _reduce(self, phase: Reducing | Reduced, j: int, layer_idx: int, hidden: torch.Tensor, kwargs: dict, n_img: torch.Tensor):
        """Run the step's reducer on the image tokens; returns (hidden with kept features written back, drop mask)."""
        step = self.steps[j]
        img = phase.seq.img
        b, q, d = hidden.shape
        dev = hidden.device
        pos = torch.arange(q, device=dev).expand(b, q)
        n_max = int(n_img.max())
        # Image positions first, in order (stable sort), then the rest.
        img_pos = torch.sort(torch.where(img, pos, pos + q), dim=1).values[:, :n_max]
        img_valid = torch.arange(n_max, device=dev).unsqueeze(0) < n_img.unsqueeze(1)
        img_pos = img_pos.masked_fill(~img_valid, -1)
        tokens = gather_rows(hidden, img_pos).masked_fill(~img_valid.unsqueeze(-1), 0)
        site = StepSite(
            phase, j, step, layer_idx, hidden, kwargs, self.layers, self._step_layers, self.positions, self.apply_rotary
        )
        context = step_context(site, img_pos, img_valid)
        start = time.perf_counter()
        red = step.reducer(tokens, mask=img_valid, context=context)
        seconds = time.perf_counter() - start
        kept_pos = gather_rows(img_pos.unsqueeze(-1), red.indices).squeeze(-1).masked_fill(~red.valid, q)
        # Write the kept (possibly merged) features back; padded slots go to a spare row q.
        buf = torch.cat([hidden, hidden.new_zeros(b, 1, d)], dim=1)
        buf = buf.scatter(1, kept_pos.unsqueeze(-1).expand(-1, -1, d), red.tokens.to(hidden.dtype))
        keep_img = torch.zeros(b, q + 1, dtype=torch.bool, device=dev).scatter(1, kept_pos, True)[:, :q]
        if self.on_record is not None:
            self.on_record(step_record(step, n_img, red, seconds))
        return buf[:, :q], img & ~keep_img
