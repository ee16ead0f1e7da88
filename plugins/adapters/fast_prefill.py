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
* decoding continues in the stock ``generate()`` on the filled static cache, eagerly:
  transformers' automatic compilation of decoding steps is turned off there (its CUDA-graph
  trees, alternating with the graphs captured here, crashed on an H200); captured decoding
  steps are not built yet.

On CPU (no graphs) the same calls run eagerly, so the CPU tests cover everything but the
capture. A capture that fails is remembered and that shape runs eagerly.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

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
    allowed = allowed.unsqueeze(1)
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


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


class FastPrefill:
    """Graph-replayed prefills of one model's text decoder (see the module docs)."""

    def __init__(self, model: torch.nn.Module, decoder: torch.nn.Module):
        self.model = model
        self.decoder = decoder
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.failed: set[tuple] = set()
        self.tower_graphs: OrderedDict = OrderedDict()  # the GraphedTower's, kept with these
        self.cache_kw = compat.cache_name(decoder.forward)  # "cache" or "past_key_values", by release

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

    def run(self, embeds: torch.Tensor, valid: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, Any, int]:
        """Prefill ``embeds (B, L, D)`` (left-padded, ``valid (B, L)``) for ``new_tokens`` more tokens.

        Returns the last position's logits ``(B, V)`` (a static buffer: read it before the
        next call), the filled static cache (slots ``0 .. bucket-1``) and the bucket length.
        """
        b, length, _ = embeds.shape
        padded = bucket(length)
        cache_len = padded + 64 * math.ceil(max(new_tokens, 1) / 64)
        key = (b, padded, cache_len, embeds.dtype, embeds.device)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._new_entry(key, embeds)
        self.entries.move_to_end(key)
        extra = padded - length
        entry.embeds.zero_()
        entry.embeds[:, extra:].copy_(embeds)
        full_valid = torch.nn.functional.pad(valid.bool(), (extra, 0), value=False)
        entry.mask.copy_(prefill_mask(full_valid, cache_len, entry.mask.dtype, entry.mask.dtype != torch.bool))
        entry.positions.copy_(generation_positions(full_valid))
        if entry.graph is None and key not in self.failed and embeds.is_cuda:
            self._capture(key, entry)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            self._prefill(entry)
        return entry.logits, entry.cache, padded

    def _new_entry(self, key: tuple, embeds: torch.Tensor) -> _Entry:
        from transformers import StaticCache

        b, padded, cache_len, dtype, device = key
        additive = self.decoder.config._attn_implementation != "sdpa"
        mask_dtype = dtype if additive else torch.bool
        entry = _Entry(
            embeds=torch.zeros(b, padded, embeds.shape[-1], dtype=dtype, device=device),
            mask=torch.zeros(b, 1, padded, cache_len, dtype=mask_dtype, device=device),
            positions=torch.zeros(b, padded, dtype=torch.long, device=device),
            cache=StaticCache(config=self.model.config, max_cache_len=cache_len),
        )
        self.entries[key] = entry
        while len(self.entries) > MAX_GRAPHS:
            self.entries.popitem(last=False)
        return entry

    def _prefill(self, entry: _Entry) -> None:
        """One prefill on the static buffers (the call that is captured)."""
        for layer in entry.cache.layers:  # the cache is written from slot 0 at every replay
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.zero_()
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

    def _capture(self, key: tuple, entry: _Entry) -> None:
        before = torch.cuda.memory_allocated(entry.embeds.device)
        try:
            stream = torch.cuda.Stream(entry.embeds.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: allocates the cache, picks the kernels
                self._prefill(entry)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._prefill(entry)
            entry.graph = graph
        except Exception:  # noqa: BLE001 - a shape that cannot be captured runs eagerly from now on
            self.failed.add(key)
            entry.graph = None
        entry.nbytes = max(torch.cuda.memory_allocated(entry.embeds.device) - before, 0)


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


# Generation options the fast path hands to the stock ``generate()`` unchanged; anything
# else decides the path (see :func:`refusal`) or was consumed by the reduction.
_CONSUMED = frozenset(
    {
        "input_ids", "inputs", "attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids", "labels",
        "pixel_values", "pixel_values_videos", "image_sizes", "image_sizes_videos", "batch_num_images",
        "mm_encoder_outputs", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
        "max_new_tokens", "min_new_tokens", "disable_compile",
    }
)


def refusal(model: torch.nn.Module, kw: dict[str, Any]) -> str | None:
    """Why this ``generate()`` call cannot take the fast prefill (``None``: it can)."""
    config = kw.get("generation_config") or model.generation_config
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


def fast_generate(adapter: Any, kw: dict[str, Any], prompt: torch.Tensor, features: dict[int, torch.Tensor]) -> torch.Tensor:
    """``generate()`` on a reduced prompt: graph-replayed prefill, first token greedy, stock decoding after.

    ``kw``: the shortened call (reduced ids and mask); ``features``: per placeholder id, its
    kept features in order; ``prompt``: the caller's ids, put back in front of the answer.
    """
    model = adapter.model
    ids = kw["input_ids"]
    mask = kw.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    config = kw.get("generation_config") or model.generation_config
    new = int(kw.get("max_new_tokens", config.max_new_tokens))
    embeds = scatter_features(model.get_input_embeddings()(ids), ids, features)
    logits, cache, padded = adapter.fast.run(embeds, valid, new)
    eos = kw.get("eos_token_id", config.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    at_least = kw.get("min_new_tokens", config.min_new_tokens) or 0
    if at_least >= 1 and eos:  # as generate()'s MinNewTokensLengthLogitsProcessor: no end token yet
        logits = logits.clone()
        logits[:, eos] = float("-inf")
    first = logits.argmax(-1, keepdim=True).to(ids.dtype)
    if new == 1 or (eos and bool(torch.isin(first, torch.tensor(eos, device=first.device)).all())):
        return torch.cat([prompt.to(first.device), first], dim=1)
    extra = padded - ids.shape[1]
    pad = model.config.get_text_config().pad_token_id
    ids_p = torch.nn.functional.pad(ids, (extra, 0), value=0 if pad is None else pad)
    mask_p = torch.nn.functional.pad(valid.long(), (extra, 0), value=0)
    rest = {k: v for k, v in kw.items() if k not in _CONSUMED}
    if at_least:
        rest["min_new_tokens"] = at_least - 1
    # Decoding runs on the static cache without transformers' automatic compilation: its
    # CUDA-graph trees and the graphs captured here, used in turn, gave "unspecified launch
    # failure" on an H200 (torch 2.11); with compilation off the same runs were clean.
    rest["disable_compile"] = True
    saved = model.__dict__.pop("forward", None)  # decoding needs no reduction: the stock forward (compilable)
    try:
        out = adapter._orig_generate(
            input_ids=torch.cat([ids_p, first], dim=1),
            attention_mask=torch.cat([mask_p, torch.ones_like(first)], dim=1),
            max_new_tokens=new - 1,
            **{compat.cache_name(adapter._orig_forward): cache},
            **rest,
        )
    finally:
        if saved is not None:
            model.__dict__["forward"] = saved
    answer = out[:, padded:]
    if eos:  # a row that ended at the first token: as stock generate() pads it and stops
        answer = _finish_like_stock(answer, eos, config.pad_token_id if config.pad_token_id is not None else eos[0])
    return torch.cat([prompt.to(out.device), answer], dim=1)


def _finish_like_stock(tokens: torch.Tensor, eos: list[int], pad: int) -> torch.Tensor:
    """Pad each row after its first end token and stop once every row has ended, as ``generate()`` does."""
    ended = torch.isin(tokens, torch.tensor(eos, device=tokens.device))
    after = (ended.long().cumsum(1) - ended.long()) > 0  # strictly after the first end token
    tokens = tokens.masked_fill(after, pad)
    done = ended.any(1)
    if bool(done.all()):
        last = int(ended.long().argmax(1).max())
        tokens = tokens[:, : last + 1]
    return tokens
