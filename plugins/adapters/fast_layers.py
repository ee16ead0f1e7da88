"""``llm_layer`` steps inside the fast path: the decoder split at each step's layer, captured whole.

A step at decoder layer ``K`` (FastV, PDrop, DART, SparseVLM ... at ``K``) splits the
decoder. Layers ``< K`` run on the whole (bucketed) prompt; at the input of layer ``K`` the
step's reducer picks image tokens, and layers ``>= K`` run on the shorter sequence. Stock
transformers runs this split eagerly (:class:`~.decoder.DecoderReduction`); here it runs
inside the fast path's captured prefill, with every shape known on the host before the
capture:

* every row of the prompt holds the same number of image tokens and each step keeps the
  same count in every row (its budget resolved on the host), so each layer group's length
  is the bucket minus what the steps before it removed: a :class:`Plan`, part of the graph
  key. A prompt whose rows hold different numbers of image tokens runs eagerly (the
  adapter warns);
* transformers' ``StaticCache`` keeps a write offset per layer, so the layers of each
  group fill their own slots ``0 .. length - 1`` of the same cache;
* forward pre-hooks on the decoder layers, installed only while the fast path runs the
  decoder (and captured with it), do what the eager hooks do: at a step's layer they
  gather the image tokens, build the reducer's context (recomputed attention rows and keys,
  :mod:`.decoder_attention`; the instruction; the image tokens' position ids), call the
  reducer without a mask (every row holds its tokens: no device read), write the kept
  features back and drop the rest; the layers after it get the group's 4-D mask, rotary
  tables and position ids (``compact``: minus the tokens removed before each slot, as
  eagerly);
* decoding steps give each group its own mask over its slots and its own positions, so a
  decoded token is cached at every group's next slot (:meth:`LayerSplit.decoding`).

Where eagerly the instruction context has exactly as many rows as the longest instruction,
here it has that many rounded up to a multiple of 16 (masked rows), so that a chat's
prompts share graphs; reducers read ``text_mask``. The records of a step run inside the
captured prefill carry ``seconds = nan``: its time is not measured on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenreduce import graphs
from tokenreduce.adapter import StageRecord
from tokenreduce.budget import resolve_budget
from tokenreduce.context import ReductionContext
from tokenreduce.ops import gather_rows
from tokenreduce.pipeline import Step
from tokenreduce.pipeline import reads_decoder_qk
from tokenreduce.stages import Stage

from . import compat
from .decoder import decoder_layers
from .decoder_attention import attention_rows, layer_keys, reads
from .decoder_kv import acts_at_decode
from .decoder_start import per_row
from .decoder_state import cos_gather, ids_gather
from .fast_prefill import prefill_mask
from .units import slice_info

__all__ = ["LayerSplit", "Plan", "split_refusal"]

TEXT_STEP = 16  # instruction rows are padded to a multiple of this (graphs shared across prompts)


@dataclass(frozen=True)
class Plan:
    """The host-known shape of one split prefill (part of its graph key)."""

    images: int  # image tokens in every row of the prompt
    kept: tuple[int, ...]  # image tokens every row keeps after each step
    text: int  # rows of the instruction context (a multiple of TEXT_STEP)
    grid: tuple[int, int] | None = None  # the token grid of every image (context.grid), if one

    def removed(self, j: int) -> int:
        """Tokens every row has lost after steps ``0 .. j`` (0 for ``j < 0``)."""
        return 0 if j < 0 else self.images - self.kept[j]


def split_refusal(decoder: nn.Module, steps: list[Step], positions: str) -> str | None:
    """Why these ``llm_layer`` steps cannot run inside the captured prefill (``None``: they can)."""
    for step in steps:
        name = step.reducer.name
        if acts_at_decode(step):
            return f"{name} prunes the cache while decoding, which the captured decoding steps do not do"
        if not getattr(step.reducer, "graph_safe", False):
            return f"{name} at llm_layer reads device values on the host, so it cannot be captured"
    rotary = getattr(decoder, "rotary_emb", None)
    if not isinstance(rotary, nn.Module):
        return f"{type(decoder).__name__} has no rotary_emb module to renumber the shortened sequence with"
    if "layer_type" in compat.parameters(rotary.forward):
        return "its rotary tables differ per layer type, which the split prefill does not rebuild"
    kinds = set(getattr(decoder.config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"its layers mix attention kinds ({', '.join(sorted(kinds))}); the split prefill builds full-attention masks"
    return None


@dataclass(eq=False)
class _Group:
    """The sequence the layers after a step see, for the rest of the prefill."""

    valid: torch.Tensor  # (B, q) real slots
    img: torch.Tensor  # (B, q) image tokens left
    src: torch.Tensor  # (B, q) slot of each token in the prompt
    rope_ids: torch.Tensor  # (..., B, q) the ids its rotary tables are made from
    layer_ids: torch.Tensor | None  # (..., B, q) the layers' position_ids kwarg (None: not passed)
    cos_sin: Any  # its rotary tables
    mask: torch.Tensor  # (B, 1, q, cache) its attention mask


@dataclass(eq=False)
class _Run:
    """One prefill's state while the hooks run."""

    media: torch.Tensor  # (B, P) image-token slots of the prompt
    valid: torch.Tensor  # (B, P) real slots of the prompt
    plan: Plan
    group: _Group | None = None  # None: the stock sequence (no step has run yet)
    stock: _Group | None = None  # the prompt as the stock forward gives it (set at the first step)
    captured: dict[int, tuple] = field(default_factory=dict)  # layer -> (its input, its rotary tables)
    reductions: list = field(default_factory=list)  # each step's Reduction
    valids: list[torch.Tensor] = field(default_factory=list)  # each step's group: its real slots


class LayerSplit:
    """The ``llm_layer`` steps of a pipeline, run inside the fast path's prefill and decoding steps."""

    def __init__(self, decoder: nn.Module, steps: list[Step], positions: str, on_record: Callable[[StageRecord], None]):
        self.decoder = decoder
        self.layers = decoder_layers(decoder)
        self.steps = sorted(steps, key=lambda s: s.layer)
        self.positions = positions
        self.on_record = on_record
        self.rotary = decoder.rotary_emb
        self._at = {s.layer: j for j, s in enumerate(self.steps)}
        self._previous = {s.layer - 1 for s in self.steps if reads_decoder_qk(s.reducer) and reads(s)[1] == "previous"}
        self._first = min([s.layer for s in self.steps] + list(self._previous))
        self._run: _Run | None = None
        self._decode: tuple | None = None
        self._rope_ids: torch.Tensor | None = None  # what the stock forward gave rotary_emb (this forward)

    def group_of(self, layer: int) -> int:
        """How many steps run at or before ``layer`` (0: the layer sees the whole prompt)."""
        return sum(s.layer <= layer for s in self.steps)

    # -- the plan (host) -----------------------------------------------------------------------

    def plan(self, media: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int] | None = None) -> Plan | str:
        """The shapes of a prompt's split (``media``/``valid``: ``(B, L)``; ``grid``: every image's token
        grid, if they share one), or why it cannot be captured.

        Reads the prompt's image-token counts on the host (once per ``generate()``)."""
        media = media & valid
        counts = media.sum(dim=1).tolist()
        if len(set(counts)) > 1:
            return f"its rows hold different numbers of image tokens ({sorted(set(counts))})"
        n = counts[0] if counts else 0
        kept, left = [], n
        for step in self.steps:
            r = step.reducer
            if left > 0:
                left = resolve_budget(r.budget, left, rounding=r.ratio_rounding)
            kept.append(left)
        # Instruction rows: the text after a row's first image token bounds it after any step.
        b, length = media.shape
        pos = torch.arange(length, device=media.device).expand(b, length)
        first = torch.where(media, pos, length).min(dim=1).values
        text = int((valid & ~media & (pos > first.unsqueeze(1))).sum(dim=1).max()) if n else 0
        return Plan(n, tuple(kept), TEXT_STEP * max(1, math.ceil(text / TEXT_STEP)), grid)

    # -- the prefill ----------------------------------------------------------------------------

    @contextmanager
    def prefill(self, media: torch.Tensor, valid: torch.Tensor, plan: Plan) -> Iterator[_Run]:
        """Within the block, a decoder forward over the prompt (``media``/``valid``: ``(B, P)``, its image
        and real slots) runs split; the run's reductions and groups stay readable afterwards."""
        run = self._run = _Run(media & valid, valid, plan)
        self._rope_ids = None
        handles = [self.rotary.register_forward_pre_hook(self._rotary_hook, with_kwargs=True)]
        handles += [self.layers[i].register_forward_pre_hook(self._prefill_hook(i), with_kwargs=True)
                    for i in range(self._first, len(self.layers))]
        try:
            yield run
        finally:
            for h in handles:
                h.remove()
            self._run = self._rope_ids = None

    def record(self, run: _Run) -> None:
        """The records of the steps of ``run``, once it ran or was replayed (its outputs are current)."""
        before = run.plan.images
        for step, red, after in zip(self.steps, run.reductions, run.plan.kept):
            b = red.indices.shape[0]
            info = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in red.info.items()}
            self.on_record(StageRecord(
                stage=Stage.LLM_LAYER, reducer=step.reducer.name, layer=step.layer,
                tokens_before=[before] * b, tokens_after=[after] * b,
                indices=[red.indices[row, :after].clone() for row in range(b)],
                info=[slice_info(info, row, b) for row in range(b)],
                seconds=float("nan"),
            ))
            before = after

    def _rotary_hook(self, module, args, kwargs):
        # The stock forward calls rotary_emb first; the calls made here for renumbered ids come later.
        if self._rope_ids is None:
            self._rope_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)

    def _prefill_hook(self, i: int):
        def hook(module, args, kwargs):
            run = self._run
            if run is None or run.plan.images == 0:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if i in self._at:
                hidden = self._step(run, self._at[i], i, hidden, kwargs)
            if run.group is not None:
                kwargs = _with_group(kwargs, run.group.mask, run.group.cos_sin, run.group.layer_ids)
            if i in self._previous:
                run.captured[i] = (hidden, kwargs["position_embeddings"])
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _stock(self, run: _Run, hidden: torch.Tensor, kwargs: dict) -> _Group:
        """The prompt as the stock forward hands it to the layers (kept in ``run`` for the later steps)."""
        b, q = hidden.shape[:2]
        layer_ids = kwargs.get("position_ids")
        rope = self._rope_ids if self._rope_ids is not None else layer_ids
        run.stock = _Group(
            valid=run.valid, img=run.media, src=torch.arange(q, device=hidden.device).expand(b, q),
            rope_ids=per_row(rope, b, q), layer_ids=None if layer_ids is None else per_row(layer_ids, b, q),
            cos_sin=kwargs["position_embeddings"], mask=kwargs["attention_mask"],
        )
        return run.stock

    def _step(self, run: _Run, j: int, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Step ``j`` at the input of ``layer``: the reducer on the image tokens left, the others dropped."""
        step = self.steps[j]
        group = run.group if run.group is not None else self._stock(run, hidden, kwargs)
        n, keep = (run.plan.kept[j - 1] if j else run.plan.images), run.plan.kept[j]
        b, q, d = hidden.shape
        pos = torch.arange(q, device=hidden.device).expand(b, q)
        # Image slots in order: every row holds exactly n of them (the plan), so the reducer gets no mask.
        img_pos = torch.sort(torch.where(group.img, pos, pos + q), dim=1).values[:, :n]
        context = self._context(run, group, j, layer, hidden, kwargs, img_pos)
        tokens = gather_rows(hidden, img_pos)
        with graphs.eager():  # captured with the prefill, not as a graph of its own
            if tokens.is_cuda and torch.cuda.is_current_stream_capturing():  # checked in the warm-up run before
                red = step.reducer.call_unchecked(tokens, context)
            else:
                red = step.reducer(tokens, context=context)
        run.reductions.append(red)
        kept_pos = torch.gather(img_pos, 1, red.indices)  # (B, keep): every slot real
        hidden = hidden.scatter(1, kept_pos.unsqueeze(-1).expand(-1, -1, d), red.tokens.to(hidden.dtype))
        kept_img = torch.zeros_like(group.img).scatter(1, kept_pos, True)
        length = q - (n - keep)
        src = torch.sort(torch.where(~group.img | kept_img, pos, pos + q), dim=1).values[:, :length]
        run.group = self._after(run, group.src.gather(1, src), group.img.gather(1, src), hidden, kwargs)
        run.valids.append(run.group.valid)
        return gather_rows(hidden, src)

    def _after(self, run: _Run, src: torch.Tensor, img: torch.Tensor, hidden: torch.Tensor, kwargs: dict) -> _Group:
        """What the layers after a step see: ``src (B, q')``, the prompt slots kept, in order."""
        stock = run.stock
        b, length = src.shape
        valid = stock.valid.gather(1, src)
        rope_ids = ids_gather(stock.rope_ids, src)
        layer_ids = None if stock.layer_ids is None else ids_gather(stock.layer_ids, src)
        if self.positions == "compact":
            # Tokens removed before each kept one: its prompt slot minus its slot now (padding slots
            # come first and are never removed), as the eager path counts them.
            shift = src - torch.arange(length, device=src.device)
            rope_ids = rope_ids - shift
            layer_ids = None if layer_ids is None else layer_ids - shift
            cos_sin = self.rotary(hidden[:, :length], rope_ids)
        else:  # the stock tables of the kept slots, as the eager path gathers them
            cos_sin = tuple(cos_gather(t, src) for t in stock.cos_sin)
        stock_mask = stock.mask
        mask = prefill_mask(valid, stock_mask.shape[-1], stock_mask.dtype, stock_mask.dtype != torch.bool)
        return _Group(valid, img, src, rope_ids, layer_ids, cos_sin, mask)

    # -- the reducer's context ------------------------------------------------------------------

    def _context(self, run: _Run, group: _Group, j: int, layer: int, hidden: torch.Tensor, kwargs: dict,
                 img_pos: torch.Tensor) -> ReductionContext:
        """What the eager path's :func:`.decoder_context.step_context` gives, on the static shapes of the plan."""
        reducer = self.steps[j].reducer
        b, q, _ = hidden.shape
        pos = torch.arange(q, device=hidden.device).expand(b, q)
        # The instruction: text after the row's last image token, left-aligned in plan.text rows.
        last_img = torch.where(group.img, pos, -1).max(dim=1).values
        is_text = group.valid & ~group.img & (pos > last_img.unsqueeze(1)) & (last_img >= 0).unsqueeze(1)
        width = min(run.plan.text, q)
        text_pos = torch.sort(torch.where(is_text, pos, pos + q), dim=1).values[:, :width]
        text_mask = torch.arange(width, device=hidden.device) < is_text.sum(dim=1, keepdim=True)
        text_pos = text_pos.masked_fill(~text_mask, -1)
        needs = set(reducer.required_context)
        attention = keys = text_keys = None
        if needs & {"attention", "keys", "text_keys"}:
            if reads(self.steps[j])[1] == "previous":
                li, (h, cos_sin) = layer - 1, run.captured[layer - 1]
            else:
                li, h, cos_sin = layer, hidden, group.cos_sin
            if "attention" in needs:
                if reads(self.steps[j])[0] == "last":
                    query = torch.where(group.valid, pos, -1).max(dim=1, keepdim=True).values
                else:
                    query = text_pos
                probs = attention_rows(self.layers[li], h, cos_sin, query, group.valid)
                attention = torch.gather(probs, 2, img_pos.unsqueeze(1).expand(-1, query.shape[1], -1)).to(hidden.dtype)
            if needs & {"keys", "text_keys"}:
                k = layer_keys(self.layers[li], h, cos_sin)
                keys = gather_rows(k, img_pos)
                text_keys = gather_rows(k, text_pos).masked_fill(~text_mask.unsqueeze(-1), 0)
        ids = group.rope_ids
        positions = ids_gather(ids, img_pos)
        if positions.dim() > 2:  # M-RoPE axes last, as the eager path gives them
            positions = positions.movedim(0, -1).reshape(b, img_pos.shape[1], -1)
        # The caller's grid while every row still holds that grid's tokens, unreduced (as eagerly).
        whole = all(k == run.plan.images for k in run.plan.kept[:j])
        grid = run.plan.grid
        grid = grid if whole and grid is not None and grid[0] * grid[1] == run.plan.images else None
        return ReductionContext(
            stage=Stage.LLM_LAYER,
            layer=layer,
            text_embeds=gather_rows(hidden, text_pos).masked_fill(~text_mask.unsqueeze(-1), 0),
            text_mask=text_mask,
            attention=attention,
            keys=keys,
            text_keys=text_keys,
            positions=positions,
            grid=grid,
            extra={"image_positions": img_pos},
        )

    # -- decoding -------------------------------------------------------------------------------

    @contextmanager
    def decoding(self, masks: list[torch.Tensor], removed: list[int]) -> Iterator[None]:
        """Within the block, a one-token decoder forward gives the layers of group ``g >= 1`` the mask
        ``masks[g - 1]`` over that group's slots and (``compact``) position ids minus ``removed[g - 1]``."""
        self._decode, self._rope_ids = (masks, removed, {}), None
        handles = [self.rotary.register_forward_pre_hook(self._rotary_hook, with_kwargs=True)]
        handles += [self.layers[i].register_forward_pre_hook(self._decode_hook(i), with_kwargs=True)
                    for i in range(self.steps[0].layer, len(self.layers))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._decode = self._rope_ids = None

    def _decode_hook(self, i: int):
        g = self.group_of(i)

        def hook(module, args, kwargs):
            masks, removed, tables = self._decode
            if g not in tables:  # once per group and forward: the renumbered ids and their tables
                layer_ids = kwargs.get("position_ids")
                if self.positions == "compact":
                    rope = self._rope_ids if self._rope_ids is not None else layer_ids
                    hidden = args[0] if args else kwargs["hidden_states"]
                    cos_sin = self.rotary(hidden, rope - removed[g - 1])
                    layer_ids = None if layer_ids is None else layer_ids - removed[g - 1]
                else:
                    cos_sin = kwargs["position_embeddings"]
                tables[g] = (cos_sin, layer_ids)
            cos_sin, layer_ids = tables[g]
            return args, _with_group(kwargs, masks[g - 1], cos_sin, layer_ids)

        return hook


def _with_group(kwargs: dict, mask: torch.Tensor, cos_sin: Any, layer_ids: torch.Tensor | None) -> dict:
    """A layer's kwargs with a group's mask, rotary tables and (where the model passes them) position ids."""
    kwargs = {**kwargs, "attention_mask": mask, "position_embeddings": cos_sin}
    if kwargs.get("position_ids") is not None and layer_ids is not None:
        kwargs["position_ids"] = layer_ids
    return kwargs
