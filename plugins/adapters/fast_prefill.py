"""The fast path's prefill: the text decoder over a reduced prompt, replayed from a CUDA graph.

At batch 1 a 7B decoder in eager transformers is bound by the host: launching its
kernels one by one takes longer than running them (20.7 ms eager vs 8.3 ms replayed for
128 tokens on an H200). Token reduction shortens the prompt, which only pays once the
launches are gone. Here, as transformers' own static cache and ``torch.compile`` do for
decoding:

* the reduced prompt's embeddings (text embeddings with the kept visual features
  scattered into their placeholders, exactly as the stock forward does) are left-padded
  to a **bucket** length, so that a chat's prompts of similar lengths share one graph;
* the decoder runs on a transformers ``StaticCache`` (fixed addresses) with a 4-D mask
  built here (causal, padding masked, padding rows attending to themselves only, so
  they stay finite), and the LM head on the last position;
* that call is captured once per (batch, bucket, cache length, dtype) and replayed; a
  bounded LRU keeps the graphs, their cache and static buffers; :meth:`FastPrefill.held_bytes`
  reports the memory they hold and :meth:`FastPrefill.release` frees it;
* ``llm_layer`` steps run inside the same captured prefill, the decoder split at each step's
  layer (:mod:`.fast_layers`; the entry's key holds the split's :class:`~.fast_layers.Plan`);
* decoding continues greedily on the filled static cache, one token per step, each step
  replayed from a CUDA graph captured once per prefill shape (:meth:`FastPrefill.decode`:
  the new token's embedding, the decoder on one slot more, the LM head); end tokens and
  ``min_new_tokens`` as ``generate()`` applies them. A call asking for an option only the
  stock loop has (``stop_strings``, ``max_time``, sampling, beams, anything unknown) runs
  eagerly, with a one-line warning naming it (:func:`refusal`). (Transformers' own
  compiled decoding is not used: its CUDA-graph trees, alternating with the graphs captured
  here, crashed on an H200.)

On CPU (no graphs) the same calls run eagerly, so the CPU tests cover everything but the
capture. A capture that fails is remembered and that shape runs eagerly.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenreduce.sync import device_list
from tokenreduce.validation import flush_checks

from . import compat

MAX_GRAPHS = 8  # (batch, bucket) shapes kept per model; each holds a static cache


def bucket(length: int) -> int:
    """The padded prompt length: a multiple of 32 up to 512 tokens, of 128 above."""
    step = 32 if length <= 512 else 128
    return step * math.ceil(length / step)


def prefill_mask(valid: torch.Tensor, cache_len: int, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """``(B, 1, L, cache_len)`` mask of a left-padded prompt ``valid (B, L)`` written at cache slots ``0..L-1``.

    Causal over the prompt, padding keys masked, cache slots after the prompt masked;
    padding queries attend to themselves only (a fully masked row would give NaN keys and
    values that reach real tokens through ``0 * NaN``). Bool for SDPA, additive otherwise.
    """
    b, length = valid.shape
    q = torch.arange(length, device=valid.device).unsqueeze(1)
    k = torch.arange(cache_len, device=valid.device).unsqueeze(0)
    keys = torch.nn.functional.pad(valid, (0, cache_len - length), value=False)
    allowed = (k <= q).unsqueeze(0) & keys.unsqueeze(1)
    allowed = allowed | (k == q).unsqueeze(0)
    return as_mask(allowed.unsqueeze(1), dtype if additive else torch.bool)


def as_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool ``allowed`` mask as the attention takes it: bool (SDPA) or additive in ``dtype``."""
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def capture(run: Callable[[], Any], device: torch.device, restore: Callable[[], None] = lambda: None) -> tuple[Any, Any, int]:
    """Warm ``run`` up on a side stream (allocations, kernel choice), then capture it in a CUDA graph.

    ``restore`` puts back what the warm-up changed (it runs after the warm-up and after the
    capture, which records without running). Returns the graph (``None`` when the capture
    failed: the caller runs eagerly from then on), what ``run`` returned while captured (its
    static outputs) and the GPU memory the capture took.
    """
    before = torch.cuda.memory_allocated(device)
    graph = out = None
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        restore()
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            out = run()
        graph = captured
    except Exception:  # noqa: BLE001 - what cannot be captured runs eagerly
        graph = None
    finally:
        restore()
    return graph, out, max(torch.cuda.memory_allocated(device) - before, 0)


def generation_positions(valid: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate()`` numbers a left-padded prompt (padding gets 1, as it does)."""
    pos = valid.long().cumsum(-1) - 1
    return pos.masked_fill(~valid, 1)


@dataclass
class _Entry:
    """One captured shape: its static inputs and outputs, cache and graph (``None``: runs eagerly)."""

    embeds: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: Any
    logits: torch.Tensor | None = None
    graph: Any = None
    nbytes: int = 0
    step: _Step | None = None  # the captured decoding step on this entry's cache
    # llm_layer steps (:mod:`.fast_layers`): the plan of the split, the prompt's image and real
    # slots (static) and the captured run's reductions and group slots (current after a replay).
    plan: Any = None
    media: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    split_run: Any = None


@dataclass
class _Step:
    """One decoding step on an entry's static cache: static inputs, logits, graph (``None``: eager)."""

    ids: torch.Tensor  # (B, 1) the token to feed
    positions: torch.Tensor  # (B, 1) its position id
    mask: torch.Tensor  # (B, 1, 1, cache_len): the cache slots it attends to
    group_masks: list[torch.Tensor] = field(default_factory=list)  # the same for each later layer group
    logits: torch.Tensor | None = None
    graph: Any = None
    nbytes: int = 0


class FastPrefill:
    """Graph-replayed prefills of one model's text decoder (see the module docs)."""

    def __init__(self, model: torch.nn.Module, decoder: torch.nn.Module):
        self.model = model
        self.decoder = decoder
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.failed: set[tuple] = set()
        self.tower_graphs: OrderedDict = OrderedDict()  # the GraphedTower's, kept with these
        self.cache_kw = compat.cache_name(decoder.forward)  # "cache" or "past_key_values", by release
        self.last_key: tuple | None = None  # the entry the last run() filled (decode() continues it)
        self.split: Any = None  # the pipeline's llm_layer steps (a fast_layers.LayerSplit), if any

    @classmethod
    def for_model(cls, model: torch.nn.Module, decoder: torch.nn.Module) -> FastPrefill:
        """The graphs kept for ``model`` by :func:`keep_graphs`, or new ones."""
        kept = _kept.get(model)
        return kept if kept is not None else cls(model, decoder)

    def done(self) -> bool:
        """The pipeline is removed: release the graphs, unless :func:`keep_graphs` keeps them; True if released."""
        if model_kept(self.model):
            _kept[self.model] = self
            return False
        self.release()
        return True

    # -- memory ------------------------------------------------------------------------

    def held_bytes(self) -> int:
        """GPU memory held by the captured graphs, their static caches and buffers."""
        return sum(e.nbytes for e in self.entries.values())

    def release(self) -> None:
        """Drop every graph and cache (the pipeline is removed or the shapes are done with)."""
        self.entries.clear()
        self.tower_graphs.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- running -------------------------------------------------------------------------

    def run(self, embeds: torch.Tensor, valid: torch.Tensor, new_tokens: int,
            positions: torch.Tensor | None = None, plan: Any = None,
            media: torch.Tensor | None = None) -> tuple[torch.Tensor, Any, int]:
        """Prefill ``embeds (B, L, D)`` (left-padded, ``valid (B, L)``) for ``new_tokens`` more tokens.

        ``positions``: the prompt's position ids, ``(B, L)`` or ``(A, B, L)`` (M-RoPE's axes);
        default: as ``generate()`` numbers a left-padded prompt. ``plan``: the split of the
        pipeline's ``llm_layer`` steps for this prompt (:meth:`.fast_layers.LayerSplit.plan`),
        ``media (B, L)`` its image tokens; ``None``: no split. Returns the last position's
        logits ``(B, V)`` (a static buffer: read it before the next call), the filled static
        cache (slots ``0 .. bucket-1``) and the bucket length.
        """
        b, length, _ = embeds.shape
        padded = bucket(length)
        cache_len = padded + 64 * math.ceil(max(new_tokens, 1) / 64)
        axes = () if positions is None or positions.dim() == 2 else tuple(positions.shape[:-2])
        key = (b, padded, cache_len, embeds.dtype, embeds.device, axes, plan)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._new_entry(key, embeds)
        self.entries.move_to_end(key)
        extra = padded - length
        entry.embeds.zero_()
        entry.embeds[:, extra:].copy_(embeds)
        full_valid = torch.nn.functional.pad(valid.bool(), (extra, 0), value=False)
        entry.mask.copy_(prefill_mask(full_valid, cache_len, entry.mask.dtype, entry.mask.dtype != torch.bool))
        if positions is None:
            entry.positions.copy_(generation_positions(full_valid))
        else:  # padding slots get 1, as generate() gives them
            entry.positions.fill_(1)
            entry.positions[..., extra:].copy_(positions)
        if plan is not None:
            entry.valid.copy_(full_valid)
            entry.media.zero_()
            entry.media[:, extra:].copy_(media)
        if entry.graph is None and key not in self.failed and embeds.is_cuda:
            self._capture(key, entry)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            self._prefill(entry)
        if plan is not None:
            self.split.record(entry.split_run)
        self.last_key = key
        return entry.logits, entry.cache, padded

    def decode(self, entry_key: tuple, first: torch.Tensor, valid: torch.Tensor, new: int, ends: torch.Tensor, pad: int,
               at_least: int = 0, position: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding after :meth:`run`: ``new - 1`` tokens after ``first (B, 1)``, each step replayed.

        ``valid (B, bucket)``: the prompt's real slots (left-padded to the bucket); ``ends``: the
        end token ids, ``int64`` on the device (the caller's copy; none: empty); ``position``:
        ``(B, 1)`` or ``(A, B, 1)`` the position id of the first decoded token's input (default:
        after the prompt's real tokens, as ``generate()`` numbers them). As
        ``generate()``: a row that emitted an end token gets ``pad`` afterwards, decoding
        stops once every row has ended (the one host read per step, as ``generate()`` has),
        and no end token is picked before ``at_least`` new tokens.
        """
        entry = self.entries[entry_key]
        b, padded = valid.shape
        cache_len = entry.mask.shape[-1]
        step = entry.step if entry.step is not None else self._new_step(entry)
        slots = torch.nn.functional.pad(valid.bool(), (0, cache_len - padded), value=False)
        # Each later layer group caches its own (shorter) prompt: its slots, then the decoded ones.
        groups = [] if entry.plan is None else [
            (torch.nn.functional.pad(v, (0, cache_len - v.shape[1]), value=False), v.shape[1])
            for v in entry.split_run.valids
        ]
        if position is None:  # as generate() numbers a left-padded prompt
            position = valid.long().sum(dim=1, keepdim=True)
        eos = ends.numel() > 0  # a host-known size
        done = torch.isin(first, ends).squeeze(1) if eos else torch.zeros(b, dtype=torch.bool, device=first.device)
        token, out = first, []
        for t in range(new - 1):
            slots[:, padded + t] = True
            step.mask.copy_(as_mask(slots[:, None, None, :], step.mask.dtype))
            for (group_slots, length), group_mask in zip(groups, step.group_masks):
                group_slots[:, length + t] = True
                group_mask.copy_(as_mask(group_slots[:, None, None, :], step.mask.dtype))
            step.ids.copy_(token)
            step.positions.copy_(position)
            if step.graph is None and (entry_key, "step") not in self.failed and first.is_cuda:
                self._capture_step(entry_key, entry, step)
            if step.graph is not None:
                step.graph.replay()
            else:
                self._step(entry, step)
            logits = step.logits
            if eos and t + 2 <= at_least:  # t + 2 tokens so far, counting this one: no end yet
                logits = logits.index_fill(1, ends, float("-inf"))
            token = logits.argmax(-1, keepdim=True).to(first.dtype)
            token = token.masked_fill(done.unsqueeze(1), pad)
            out.append(token)
            position = position + 1
            if eos:
                done = done | torch.isin(token, ends).squeeze(1)
                if bool(done.all()):
                    break
        return torch.cat(out, dim=1) if out else first[:, :0]

    def _new_step(self, entry: _Entry) -> _Step:
        b = entry.embeds.shape[0]
        device = entry.embeds.device
        mask = torch.zeros(b, 1, 1, entry.mask.shape[-1], dtype=entry.mask.dtype, device=device)
        entry.step = _Step(
            ids=torch.zeros(b, 1, dtype=torch.long, device=device),
            positions=torch.zeros(*entry.positions.shape[:-1], 1, dtype=torch.long, device=device),
            mask=mask,
            group_masks=[torch.zeros_like(mask) for _ in ([] if entry.plan is None else entry.plan.kept)],
        )
        return entry.step

    def _step(self, entry: _Entry, step: _Step) -> None:
        """One decoding step on the static buffers (the call that is captured): the cache advances by one slot."""
        embeds = self.model.get_input_embeddings()(step.ids)
        with self._decoding(entry, step):
            out = self.decoder(inputs_embeds=embeds, attention_mask=step.mask, position_ids=step.positions,
                               use_cache=True, **{self.cache_kw: entry.cache})
        logits = self.model.lm_head(out.last_hidden_state[:, -1])
        if step.logits is None:
            step.logits = logits
        else:
            step.logits.copy_(logits)

    def _capture_step(self, key: tuple, entry: _Entry, step: _Step) -> None:
        """Capture the step; warming it up writes one cache slot, so the slot counters are put back."""
        lengths = [layer.cumulative_length.clone() for layer in entry.cache.layers]

        def restore() -> None:
            for layer, n in zip(entry.cache.layers, lengths):
                layer.cumulative_length.copy_(n)

        step.graph, _, step.nbytes = capture(lambda: self._step(entry, step), step.ids.device, restore)
        if step.graph is None:
            self.failed.add((key, "step"))
        entry.nbytes += step.nbytes

    def _new_entry(self, key: tuple, embeds: torch.Tensor) -> _Entry:
        from transformers import StaticCache

        b, padded, cache_len, dtype, device, axes, plan = key
        additive = self.decoder.config._attn_implementation != "sdpa"
        mask_dtype = dtype if additive else torch.bool
        entry = _Entry(
            embeds=torch.zeros(b, padded, embeds.shape[-1], dtype=dtype, device=device),
            mask=torch.zeros(b, 1, padded, cache_len, dtype=mask_dtype, device=device),
            positions=torch.zeros(*axes, b, padded, dtype=torch.long, device=device),
            cache=StaticCache(config=self.model.config, max_cache_len=cache_len),
            plan=plan,
        )
        if plan is not None:
            entry.media = torch.zeros(b, padded, dtype=torch.bool, device=device)
            entry.valid = torch.zeros(b, padded, dtype=torch.bool, device=device)
        self.entries[key] = entry
        while len(self.entries) > MAX_GRAPHS:
            self.entries.popitem(last=False)
        return entry

    def _prefill(self, entry: _Entry) -> None:
        """One prefill on the static buffers (the call that is captured)."""
        for layer in entry.cache.layers:  # the cache is written from slot 0 at every replay
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.zero_()
        with self._split(entry):
            out = self.decoder(
                inputs_embeds=entry.embeds,
                attention_mask=entry.mask,
                position_ids=entry.positions,
                use_cache=True,
                **{self.cache_kw: entry.cache},
            )
        logits = self.model.lm_head(out.last_hidden_state[:, -1])
        if entry.logits is None:
            entry.logits = logits
        else:
            entry.logits.copy_(logits)

    @contextmanager
    def _split(self, entry: _Entry) -> Iterator[None]:
        """The prefill's decoder forward, split at the llm_layer steps' layers where the entry has a plan."""
        if entry.plan is None:
            yield
            return
        with self.split.prefill(entry.media, entry.valid, entry.plan) as run:
            yield
        entry.split_run = run

    @contextmanager
    def _decoding(self, entry: _Entry, step: _Step) -> Iterator[None]:
        """A decoding step's forward, each layer group on its own slots, where the entry has a plan."""
        if entry.plan is None:
            yield
            return
        removed = [entry.plan.removed(j) for j in range(len(entry.plan.kept))]
        with self.split.decoding(step.group_masks, removed):
            yield

    def _capture(self, key: tuple, entry: _Entry) -> None:
        entry.graph, _, entry.nbytes = capture(lambda: self._prefill(entry), entry.embeds.device)
        if entry.graph is None:
            self.failed.add(key)


# Models whose graphs outlive a pipeline's removal (inside keep_graphs): model -> FastPrefill or None.
_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_kept(model: torch.nn.Module) -> bool:
    return model in _kept


@contextmanager
def keep_graphs(model: torch.nn.Module) -> Iterator[None]:
    """Keep ``model``'s fast-path graphs across pipeline removals until the block ends.

    The captured graphs depend on the model and the shapes only, not on the reducer, so
    code that alternates pipelines on one model (a benchmark interleaving settings) can
    reuse them instead of capturing again after every removal. On exit they are released.
    """
    _kept[model] = _kept.get(model)
    try:
        yield
    finally:
        state = _kept.pop(model, None)
        if state is not None:
            state.release()


def scatter_features(embeds: torch.Tensor, ids: torch.Tensor, features: dict[int, torch.Tensor]) -> torch.Tensor:
    """The stock forward's splice: each placeholder id's features, in order, into its positions."""
    for token_id, feats in features.items():
        mask = (ids == token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
    return embeds


# Call arguments the reduction consumed (or the fast path sizes itself from); any other option
# must be one the captured decoding honours (_DECODE_OPTIONS, checked by refusal()).
_CONSUMED = frozenset(
    {
        "input_ids", "inputs", "attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids", "labels",
        "pixel_values", "pixel_values_videos", "image_sizes", "image_sizes_videos", "batch_num_images",
        "mm_encoder_outputs", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
        "max_new_tokens", "min_new_tokens", "disable_compile",
    }
)


def refusal(model: torch.nn.Module, kw: dict[str, Any], media: tuple[str, ...] = ()) -> str | None:
    """Why this ``generate()`` call cannot take the fast prefill (``None``: it can); ``media``: the
    family's own media arguments (consumed by the reduction, like the pixels)."""
    config = kw.get("generation_config") or model.generation_config
    unknown = sorted(k for k, v in kw.items() if k not in _CONSUMED | _DECODE_OPTIONS | set(media) and v is not None)
    if unknown:
        return f"{unknown[0]} is not supported by the fast path's greedy decoding"
    for name in ("stop_strings", "max_time"):  # stopping rules only the stock loop applies
        if getattr(config, name, None):
            return f"generation_config.{name} is not supported by the fast path's greedy decoding"
    sampled = kw.get("do_sample", config.do_sample)
    beams = kw.get("num_beams", config.num_beams) or 1
    if sampled or beams > 1:
        return "the fast prefill picks the first token greedily (do_sample=False, num_beams=1)"
    if kw.get("return_dict_in_generate", config.return_dict_in_generate):
        return "return_dict_in_generate=True is not supported by the fast prefill"
    for name in ("streamer", "assistant_model", "prefix_allowed_tokens_fn"):
        if kw.get(name) is not None:
            return f"{name} is not supported by the fast prefill"
    if compat.get_cache(kw) is not None:
        return "a caller's cache is not supported by the fast prefill (it fills its own static cache)"
    if kw.get("max_new_tokens", config.max_new_tokens) is None:
        return "the fast prefill needs max_new_tokens (its static cache is sized from it)"
    if kw.get("logits_processor"):
        return "a caller's logits_processor is not supported by the fast prefill"
    for name, neutral in _FIRST_TOKEN_RULES:  # rules that could change the greedy first token
        value = kw.get(name, getattr(config, name, neutral))
        if value not in (neutral, None):
            return f"{name}={value!r} is not supported by the fast prefill (it picks the first token by argmax)"
    return None


# Generation options that alter the first token's logits, with their neutral values.
_FIRST_TOKEN_RULES = (
    ("repetition_penalty", 1.0),
    ("no_repeat_ngram_size", 0),
    ("bad_words_ids", None),
    ("suppress_tokens", None),
    ("begin_suppress_tokens", None),
    ("sequence_bias", None),
    ("forced_bos_token_id", None),
    ("forced_eos_token_id", None),
    ("encoder_repetition_penalty", 1.0),
)

# Options the captured decoding honours (greedy, end tokens, padding) or that cannot change it:
# sampling knobs that greedy decoding ignores (as generate() does) and the rules refusal() checks neutral.
_DECODE_OPTIONS = frozenset(
    {"do_sample", "num_beams", "eos_token_id", "pad_token_id", "generation_config", "use_cache", "max_length",
     "temperature", "top_k", "top_p", "min_p", "typical_p", "return_dict_in_generate", "output_scores",
     "output_logits", "output_attentions", "output_hidden_states", "streamer", "assistant_model",
     "prefix_allowed_tokens_fn", "logits_processor", "cache", "past_key_values"}
    | {name for name, _ in _FIRST_TOKEN_RULES}
)


@contextmanager
def paused(decoder: Any) -> Iterator[None]:
    """Within the block, the eager llm_layer machinery (a :class:`.decoder.DecoderReduction`, or None) does nothing."""
    if decoder is None:
        yield
        return
    decoder.paused = True
    try:
        yield
    finally:
        decoder.paused = False


def split_plan(adapter: Any, kw: dict[str, Any], grid: tuple[int, int] | None) -> tuple[Any, str | None]:
    """``(plan, why not)``: the split of the adapter's ``llm_layer`` steps for this (reduced) call
    (``grid``: the token grid of its images, ``context.grid`` of a step seeing them whole).

    ``(None, None)``: no split (no such steps, or no image tokens left); ``(None, reason)``: the
    call cannot be captured (its rows hold different numbers of image tokens) and runs eagerly.
    """
    split = adapter.fast.split
    if split is None:
        return None, None
    ids = kw["input_ids"]
    mask = kw.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    plan = split.plan(adapter.media_mask(ids), valid, grid)
    if isinstance(plan, str):
        return None, f"llm_layer steps: {plan}"
    return (plan if plan.images else None), None


def fast_generate(adapter: Any, kw: dict[str, Any], prompt: torch.Tensor, features: dict[int, torch.Tensor],
                  positions: torch.Tensor | None = None, next_position: torch.Tensor | None = None,
                  plan: Any = None) -> torch.Tensor:
    """``generate()`` on a reduced prompt: graph-replayed prefill and greedy decoding steps.

    ``kw``: the shortened call (reduced ids and mask, options :func:`refusal` accepted);
    ``features``: per placeholder id, its kept features in order; ``prompt``: the caller's ids,
    put back in front of the answer; ``positions`` / ``next_position``: the reduced prompt's
    position ids and the first new token's, where the family numbers them itself (M-RoPE);
    ``plan``: the split of the ``llm_layer`` steps (:func:`split_plan`).
    """
    model = adapter.model
    ids = kw["input_ids"]
    mask = kw.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    config = kw.get("generation_config") or model.generation_config
    new = int(kw.get("max_new_tokens", config.max_new_tokens))
    embeds = scatter_features(model.get_input_embeddings()(ids), ids, features)
    media = adapter.media_mask(ids) if plan is not None else None
    with paused(adapter.decoder):  # the eager llm_layer hooks sit out the captured calls
        logits, _, padded = adapter.fast.run(embeds, valid, new, positions, plan, media)
    flush_checks()  # the reducers' deferred finiteness reads: the prefill is queued, so they stall nothing
    eos = kw.get("eos_token_id", config.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    at_least = kw.get("min_new_tokens", config.min_new_tokens) or 0
    ends = device_list(eos, logits.device)
    if at_least >= 1 and eos:  # as generate()'s MinNewTokensLengthLogitsProcessor: no end token yet
        logits = logits.index_fill(1, ends, float("-inf"))  # (indexing by a list would copy it in, waiting)
    first = logits.argmax(-1, keepdim=True).to(ids.dtype)
    if new == 1 or (eos and bool(torch.isin(first, ends).all())):
        return torch.cat([prompt.to(first.device), first], dim=1)
    pad = kw.get("pad_token_id", config.pad_token_id)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    full_valid = torch.nn.functional.pad(valid, (padded - ids.shape[1], 0), value=False)
    with paused(adapter.decoder):
        answer = adapter.fast.decode(adapter.fast.last_key, first, full_valid, new, ends, pad, at_least, next_position)
    return torch.cat([prompt.to(first.device), first, answer], dim=1)
