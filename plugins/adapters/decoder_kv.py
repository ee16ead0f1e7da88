"""Decode-time ``llm_layer`` steps: per decode step, which cached visual tokens layers ``>= K`` attend to.

A reducer class with ``acts_at = "decode"`` (DyCoke's dynamic KV pruning, ``dycoke-kv``)
does not remove tokens from the prompt: :class:`~.decoder.DecoderReduction` hands its step
to :class:`DecodePruning`, which leaves every prefill as stock and acts on decode steps.

Semantics
---------
* Prompt: a decoder forward whose input holds visual tokens (the adapter's image mask),
  with a cache. After it, the positions of the visual tokens in that cache are kept per
  cache object (several may be alive). A forward continuing a cache that no such
  forward filled under this patch (or one reset since) is stock: the pruning is active
  only for decode steps of prompts prefilled while the step was configured.
* Decode step: a forward of one new token (``q = 1``, the official condition) that
  continues such a cache. Before layer ``K``, the step's reducer gets the prompt's visual
  tokens: ``tokens (B, N, H_kv * d)`` their cached keys of layer ``K - 1``,
  ``context.attention (B, 1, N)`` the attention the new token pays them in layer ``K - 1``
  (recomputed from its q and the whole cache of that layer, heads averaged, softmax over
  the full causal row, padding excluded), ``context.extra["previous_attention"] (B, N)``
  the same of the previous decode step on this cache (``None`` at the first),
  ``extra["image_positions"]`` their cache positions. Layers ``>= K`` then attend only
  to the kept visual entries (and every other entry) in rows whose
  ``Reduction.info["refresh"]`` is true (absent: every row); other rows attend to all.
  Layers ``< K`` and the cache itself are never changed: every entry stays for later steps.
* Mechanism: no entry is gathered; layers ``>= K`` get the causal mask transformers builds
  for the forward's 2-D padding mask with the pruned entries zeroed. Keys are cached
  after RoPE, so this is the same attention as over the gathered entries; ``eager`` and
  ``sdpa`` work, FlashAttention (no per-entry mask here) is refused with a clear error.
* Recomputation: decode step ``t`` computes exactly what a full forward over the whole
  sequence computes for that token when, at layers ``>= K``, that token's row of the
  causal mask also excludes the visual tokens pruned at step ``t`` (each earlier token's
  row excluding those of its own step): ``generate()`` with the cache equals that
  recomputation (tests/test_dycoke.py checks it), not ``generate(use_cache=False)``,
  whose forwards are all prompts (no decode step, so nothing pruned).
* Batches: every row is decided on its own (its visual tokens, padding, attention). Beam
  search reorders the cache's rows between steps but not the previous attention kept here,
  so the refresh decision of a reordered beam may read another beam's last row.
* Limits: ``DynamicCache``-style caches whose layers ``K - 1`` and ``K`` hold every entry
  (no sliding-window or reduced layers there), a 2-D (or no) attention mask; a decode step
  reads the device a few times (the budget's resolution in the reducer call, the record).
* Records: one :class:`~tokenreduce.adapter.StageRecord` per decode step (units = rows;
  ``tokens_after`` counts the visual entries attended; ``info`` has ``refresh``).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from tokenreduce.adapter import StageRecord
from tokenreduce.context import ReductionContext
from tokenreduce.errors import ConfigError, InvalidInputError, MissingContextError
from tokenreduce.ops import gather_rows
from tokenreduce.pipeline import Step
from tokenreduce.stages import Stage

from . import compat
from .decoder_attention import attention_rows, reads

__all__ = ["DecodePruning", "acts_at_decode"]

#: Where the reducer finds the previous decode step's attention row.
PREVIOUS_ATTENTION = "previous_attention"
#: ``set_image_mask(padding=...)`` not given.
_NOT_GIVEN: Any = object()


def acts_at_decode(step: Step) -> bool:
    """Whether an ``llm_layer`` step acts on decode steps (its reducer class says ``acts_at = "decode"``)."""
    return step.stage is Stage.LLM_LAYER and getattr(step.reducer, "acts_at", "prefill") == "decode"


@dataclass(frozen=True, eq=False)
class PromptState:
    """What the decode steps of one cache need: its prompt's visual tokens and the last attention."""

    positions: torch.Tensor  # (B, N) cache position of each visual token, -1 = none
    valid: torch.Tensor  # (B, N) real entries of ``positions``
    length: int  # tokens in the cache once the prompt was in
    previous: torch.Tensor | None = None  # (B, N) float32 attention of the last decode step


@dataclass(eq=False)
class _Decode:
    """One decode forward in progress."""

    cache: Any
    state: PromptState
    padding: torch.Tensor | None  # (B, P + 1) 2-D padding mask, None: no padding
    captured: tuple | None = None  # layer K-1's input, rotary tables, cached length
    attention: torch.Tensor | None = None  # (B, N) this step's attention row
    masks: dict | None = None  # per layer type, the mask of layers >= K


class DecodePruning:
    """Runs one decode-time step (see the module docstring) with forward (pre-)hooks on the decoder."""

    def __init__(
        self,
        decoder: nn.Module,
        layers: nn.ModuleList,
        step: Step,
        *,
        on_record: Callable[[StageRecord], None] | None = None,
        apply_rotary: Callable | None = None,
    ):
        self.decoder, self.layers, self.step = decoder, layers, step
        self.on_record, self.apply_rotary = on_record, apply_rotary
        self.layer = step.layer
        self._handles: list[Any] = []
        self._pending: tuple = (None, _NOT_GIVEN)
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._fwd: _Decode | None = None
        self._prompt: tuple | None = None  # (cache, visual mask of the whole cache) of a prefill in progress
        self.validate()

    @classmethod
    def build(cls, decoder: nn.Module, layers: nn.ModuleList, steps: list[Step], prefill_steps: list[Step], **kw):
        """The decode-time step of ``steps`` (None if there is none); raises ConfigError for what it cannot run."""
        if not steps:
            return None
        names = ", ".join(repr(s.reducer.name) for s in steps)
        if len(steps) > 1:
            raise ConfigError(f"at most one decode-time llm_layer step is supported, got {len(steps)} ({names})")
        if prefill_steps:
            raise ConfigError(
                f"decode-time step {names} cannot share a pipeline with prefill llm_layer steps "
                f"({', '.join(repr(s.reducer.name) for s in prefill_steps)}): it reads the prompt's whole cache"
            )
        return cls(decoder, layers, steps[0], **kw)

    def validate(self) -> None:
        r, k, n = self.step.reducer, self.layer, len(self.layers)
        if k is None or not 1 <= k < n:
            raise ConfigError(
                f"decode-time step {r.name!r}: layer={k} is out of range; it reads layer K-1's attention, so "
                f"K must be in 1..{n - 1} for this decoder"
            )
        if reads(self.step) != ("last", "previous"):
            raise ConfigError(
                f"decode-time step {r.name!r} needs AttentionRows(query='last', layer='previous') "
                f"(the new token's row in layer K-1), got {reads(self.step)}"
            )
        prev = self.layers[k - 1]
        if not hasattr(prev, "input_layernorm") or not hasattr(getattr(prev, "self_attn", None), "q_proj"):
            raise ConfigError(f"cannot recompute attention rows for {type(prev).__name__} (needs input_layernorm, self_attn.q_proj/k_proj)")
        self._check_backend(ConfigError)
        types = getattr(self.decoder.config, "layer_types", None) or ()
        if any("sliding" in str(t) for t in types[k - 1 :]):
            raise MissingContextError(
                f"decode-time step {r.name!r} needs context {type(self.decoder).__name__} cannot give: whole "
                "caches (its sliding-window layers from K-1 on hold the last window only)"
            )

    def _check_backend(self, error: type[Exception]) -> None:
        impl = str(getattr(self.decoder.config, "_attn_implementation", ""))
        if "flash" in impl:
            raise error(
                f"decode-time step {self.step.reducer.name!r} masks pruned cache entries at every decode step, "
                f"which attn_implementation={impl!r} cannot take; use 'sdpa' or 'eager'"
            )

    # -- installing ------------------------------------------------------------------------

    def attach(self) -> None:
        if self._handles:
            return
        self._handles.append(self.decoder.register_forward_pre_hook(self._pre_decoder, with_kwargs=True))
        self._handles.append(self.decoder.register_forward_hook(self._post_decoder))
        for i in range(self.layer - 1, len(self.layers)):
            self._handles.append(self.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._fwd = self._prompt = None
        self._states = weakref.WeakKeyDictionary()

    def set_image_mask(self, mask: torch.Tensor | None, padding: Any = _NOT_GIVEN) -> None:
        """Visual-token positions ``(B, L)`` of the next forward's input; ``padding``: its 2-D mask
        (None: no padding) when the decoder is handed a prebuilt mask mapping (Gemma 3)."""
        self._pending = (mask, padding)

    # -- hooks -----------------------------------------------------------------------------

    def _pre_decoder(self, module, args, kwargs):
        mask, padding = self._pending
        self._pending = (None, _NOT_GIVEN)
        self._fwd = self._prompt = None
        cache = compat.get_cache(kwargs)
        if cache is not None and not hasattr(cache, "get_seq_length"):
            return
        past = 0 if cache is None else cache.get_seq_length()
        am = kwargs.get("attention_mask")
        am = padding if isinstance(am, dict) and padding is not _NOT_GIVEN else am
        if mask is not None and bool(mask.any()):  # a prompt (one host read per forward)
            # Visual tokens already in the cache (an earlier prompt on it) stay visual.
            old = self._states.get(cache) if past > 0 else None
            before = torch.zeros(mask.shape[0], past + 1, dtype=torch.bool, device=mask.device)
            if old is not None and old.length <= past and old.positions.shape[0] == mask.shape[0]:
                at = torch.where(old.valid, old.positions, torch.full_like(old.positions, past)).to(mask.device)
                before = before.scatter(1, at, True)
            before = before[:, :past]
            if isinstance(am, torch.Tensor) and am.dim() == 2:
                mask = mask & am[:, -mask.shape[1]:].to(mask.device).bool()
            self._prompt = (cache, torch.cat([before, mask.bool()], dim=1))
            return
        state = None if cache is None else self._states.get(cache)
        if state is None:
            return
        if past < state.length:  # cropped or reset since: a new sequence
            del self._states[cache]
            return
        if isinstance(am, dict) or (isinstance(am, torch.Tensor) and am.dim() != 2):
            raise InvalidInputError(
                f"decode-time step {self.step.reducer.name!r} needs a 2-D (B, L) attention_mask (or None) while "
                "decoding; static/compiled caches are not supported"
            )
        self._fwd = _Decode(cache, state, am)

    def _post_decoder(self, module, args, output):
        fwd, prompt = self._fwd, self._prompt
        self._fwd = self._prompt = None
        if prompt is not None:
            cache, visual = prompt
            cache = cache if cache is not None else compat.output_cache(output)  # made inside the forward
            if cache is None or not hasattr(cache, "get_seq_length"):
                return
            state = _prompt_state(visual, cache.get_seq_length())
            if state is not None:
                self._states[cache] = state
            else:
                self._states.pop(cache, None)
        elif fwd is not None and fwd.attention is not None:
            self._states[fwd.cache] = replace(fwd.state, previous=fwd.attention)

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            fwd = self._fwd
            if fwd is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == self.layer - 1:
                if hidden.shape[1] != 1:  # not a decode step: several new tokens (official: q == 1 only)
                    self._fwd = None
                    return None
                self._start(fwd, hidden, kwargs)
                return None
            if fwd.masks is None:
                self._select(fwd, hidden)
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = self._mask(fwd, i, hidden)
            return args, kwargs

        return hook

    def _start(self, fwd: _Decode, hidden: torch.Tensor, kwargs: dict) -> None:
        """At layer K-1's input: check the forward and keep that layer's input for its attention row."""
        self._check_backend(InvalidInputError)
        b = hidden.shape[0]
        past = fwd.cache.get_seq_length(self.layer - 1)
        if fwd.state.positions.shape[0] != b:
            raise InvalidInputError(
                f"the cache holds {fwd.state.positions.shape[0]} rows but this forward has {b}; beam search / "
                f"batch reordering is not supported with decode-time step {self.step.reducer.name!r}"
            )
        if fwd.padding is not None and fwd.padding.shape[1] != past + 1:
            raise InvalidInputError(
                f"attention_mask has length {fwd.padding.shape[1]} but the cache holds {past} tokens and the input 1"
            )
        fwd.captured = (hidden, kwargs.get("position_embeddings"), past)

    def _select(self, fwd: _Decode, hidden: torch.Tensor) -> None:
        """At layer K's input: the reducer's choice among the visual entries, as a 2-D mask of the cache."""
        h, cos_sin, past = fwd.captured
        b, dev = h.shape[0], h.device
        li = self.layer - 1
        pad = torch.ones(b, past + 1, dtype=torch.bool, device=dev) if fwd.padding is None else fwd.padding.to(dev).bool()
        keys = fwd.cache.layers[li].keys  # (B, H_kv, past + 1, d): layer K-1 has cached this token already
        if keys.shape[2] != past + 1 or fwd.cache.get_seq_length(self.layer) != past:
            raise InvalidInputError(
                f"decode-time step {self.step.reducer.name!r} needs full caches at layers {li} and {self.layer} "
                f"(they hold {keys.shape[2]} and {fwd.cache.get_seq_length(self.layer)} entries, expected "
                f"{past + 1} and {past}); sliding-window or reduced caches are not supported"
            )
        probs = attention_rows(
            self.layers[li], h, cos_sin, torch.zeros(b, 1, dtype=torch.long, device=dev), pad[:, past:],
            past_keys=keys[:, :, :past], past_valid=pad[:, :past], apply_rotary=self.apply_rotary,
        )
        pos, valid = fwd.state.positions.to(dev), fwd.state.valid.to(dev)
        attention = torch.gather(probs, 2, pos.clamp(min=0).unsqueeze(1)).masked_fill(~valid.unsqueeze(1), 0)
        tokens = gather_rows(keys.transpose(1, 2).reshape(b, keys.shape[2], -1), pos).masked_fill(~valid.unsqueeze(-1), 0)
        context = ReductionContext(
            stage=Stage.LLM_LAYER,
            layer=self.layer,
            attention=attention.to(h.dtype),
            extra={PREVIOUS_ATTENTION: fwd.state.previous, "image_positions": pos},
        )
        start = time.perf_counter()
        red = self.step.reducer(tokens, mask=valid, context=context)
        seconds = time.perf_counter() - start
        refresh = red.info.get("refresh")
        refresh = torch.ones(b, dtype=torch.bool, device=dev) if refresh is None else refresh.to(dev).bool()
        pruned = valid & ~red.keep_mask & refresh.unsqueeze(1)
        spare = torch.full_like(pos, past + 1)
        drop = torch.zeros(b, past + 2, dtype=torch.bool, device=dev).scatter(1, torch.where(pruned, pos, spare), True)
        fwd.attention = attention[:, 0].float()
        fwd.masks = {"mask2d": pad & ~drop[:, : past + 1]}
        if self.on_record is not None:
            self.on_record(_record(self.step, pos, valid, pruned, refresh, seconds))

    def _mask(self, fwd: _Decode, i: int, hidden: torch.Tensor) -> Any:
        """Layer ``i``'s mask: transformers' causal mask over the 2-D mask with the pruned entries zeroed."""
        types = getattr(self.decoder.config, "layer_types", None)
        kind = types[i] if types is not None and i < len(types) else "full_attention"
        if kind not in fwd.masks:
            fwd.masks[kind] = compat.causal_mask(
                kind, config=self.decoder.config, inputs_embeds=hidden, attention_mask=fwd.masks["mask2d"],
                cache=fwd.cache, layer_idx=i,
            )
        return fwd.masks[kind]


def _prompt_state(visual: torch.Tensor, length: int) -> PromptState | None:
    """The visual tokens ``(B, L)`` of a filled cache as left-aligned positions."""
    b, n_all = visual.shape
    counts = visual.sum(dim=1)
    n = int(counts.max())
    if n == 0:  # no visual token survived the prompt: nothing to prune
        return None
    pos = torch.arange(n_all, device=visual.device).expand(b, n_all)
    positions = torch.sort(torch.where(visual, pos, pos + n_all), dim=1).values[:, :n]
    valid = torch.arange(n, device=visual.device).unsqueeze(0) < counts.unsqueeze(1)
    return PromptState(positions.masked_fill(~valid, -1), valid, length)


def _record(step: Step, pos, valid, pruned, refresh, seconds: float) -> StageRecord:
    """One decode step's record, one entry per row: visual entries before and attended (indices into
    the row's visual tokens); ``info``: ``refresh`` and the cache positions of the pruned entries."""
    kept = valid & ~pruned
    return StageRecord(
        stage=Stage.LLM_LAYER,
        reducer=step.reducer.name,
        layer=step.layer,
        tokens_before=valid.sum(1).tolist(),
        tokens_after=kept.sum(1).tolist(),
        indices=[row.nonzero()[:, 0] for row in kept],
        info=[
            {"refresh": bool(r), "decode": True, "pruned_positions": p[m]}
            for r, p, m in zip(refresh.tolist(), pos, pruned)
        ],
        seconds=seconds,
    )
