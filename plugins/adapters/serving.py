"""Serving a reduced prompt per forward call, and continuing its cache (the engine's per-forward path).

For families whose ``generate()`` pre-encodes images (transformers 5.x hands the features to
the forward as ``mm_encoder_outputs``): the wrapped forward (of the ``*ForConditionalGeneration``
and of the inner model; only the outermost call acts) reduces at the prefill, where it has
the whole prompt, and

* cuts ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``labels`` and the position
  ids to the real tokens minus the dropped placeholders (:class:`~.sequence.Shrink`), so the
  stock forward's own check (placeholder count == feature count) passes; shortened rows
  are left-padded afresh (an attention mask is created when rows differ in length);
* keeps a :class:`~.sequence.DecodeState` per cache object it filled, so that later calls
  continuing that cache (``generate()`` steps, or a loop passing ``cache=out.cache``) get
  their full-length attention mask and position ids translated.

Positions: ``original`` gives each kept token the position id the stock model computes on
the unreduced prompt (the family's :meth:`ForwardServing.full_positions`, which may be 3-D
as with M-RoPE); decoding continues after the prompt's largest id, as the stock
``rope_deltas`` rule does. ``compact`` renumbers the shortened sequence ``0, 1, 2, ...`` on
every axis. A pipeline with ``compact`` and ``llm_layer`` steps renumbers from the prompt on
(also when no encoder-side step removed anything), because layer K renumbers by
subtracting the tokens removed before each token, which is only meaningful for 1-D ids.

A family gives :meth:`~ForwardServing.reduce_modality` (its features, through the engine's
units) and :meth:`~ForwardServing.full_positions`; the rest is here.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache

from tokenreduce.errors import InvalidInputError
from tokenreduce.validation import deferred_checks, flush_checks

from . import compat
from .engine import FamilyAdapter, bind, wrapper
from .fast_prefill import fast_generate, refusal, split_plan
from .sequence import DecodeState, Shrink, sequence_positions
from .units import ContextSource, Units, keep_mask


class Prompt:
    """The unreduced prompt of one prefill: ids, mask, original positions ``(A, B, L)``, lazy text embeddings."""

    def __init__(self, adapter: FamilyAdapter, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor):
        self.adapter = adapter
        self.ids = ids
        self.mask = mask
        self.positions = positions
        self._embeds: torch.Tensor | None = None

    def token_positions(self, token_mask: torch.Tensor) -> torch.Tensor:
        """``(S, A)`` original positions of the placeholder tokens, in flat (row-major) order."""
        return self.positions[:, token_mask].transpose(0, 1)

    @property
    def embeds(self) -> torch.Tensor:
        if self._embeds is None:
            self._embeds = self.adapter.inner.get_input_embeddings()(self.ids)
        return self._embeds

    @property
    def text_mask(self) -> torch.Tensor:
        text = ~self.adapter.media_mask(self.ids)
        return text if self.mask is None else text & self.mask.bool()


class ForwardServing(FamilyAdapter):
    """The per-forward path (see the module docs); a family implements the two hooks below."""

    def __init__(self, model: torch.nn.Module, pipeline: Any):
        super().__init__(model, pipeline)
        self._busy = False
        # Per cache object filled by a reduced prefill: how to continue it (several may be alive).
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- the family's hooks ------------------------------------------------------------------

    def full_positions(self, kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stock ``(A, B, L)`` position ids of the unreduced prompt, and a separate 1-D text row if given."""
        raise NotImplementedError

    def reduce_modality(self, modality: str, kw: dict[str, Any], prompt: Prompt) -> tuple[Any, torch.Tensor, torch.Tensor] | None:
        """Encode and reduce one modality: (its encoder output, its placeholder mask, kept placeholders), or None."""
        raise NotImplementedError

    def llm_grid(self, kw: dict[str, Any]) -> tuple[int, int] | None:
        """The token grid shared by every image of the call, if any (``context.grid`` at ``llm_layer``)."""
        return None

    def reduce_items(
        self,
        modality: str,
        items: list[torch.Tensor],
        prompt: Prompt,
        units_of: Callable[[torch.Tensor], Units],
        first: torch.Tensor | None = None,
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The encoder-side steps on one modality's per-item features ``items`` (each ``(N_i, D)``, in placeholder order).

        ``units_of(placeholder mask)``: their units; ``first``: what ``vision_encoder`` steps see
        (default: the items), ``project``: the projector on kept tokens (default: none, the
        items are already projected). Returns the reduced features per item, the original
        index of each kept token (None: none removed), the placeholder mask and the kept placeholders.
        """
        token_mask = prompt.ids == self.token_id(modality)
        flat = torch.cat(items, dim=0)
        if (total := int(token_mask.sum())) != flat.shape[0]:
            raise InvalidInputError(f"{modality} placeholder tokens and features do not match: {total} placeholder "
                                    f"tokens in input_ids, {flat.shape[0]} {modality} features")
        units = units_of(token_mask)
        text = self.needs("text_embeds", "text_mask")
        source = ContextSource(
            per_token={"positions": prompt.token_positions(token_mask)},
            per_row={"text_embeds": prompt.embeds, "text_mask": prompt.text_mask} if text else {},
            extra=lambda ids: {"modality": modality, "rows": units.row[ids], "items": units.item[ids]},
        )

        def projected(x: torch.Tensor, _units: Units, reduced: bool) -> torch.Tensor:
            if not reduced:
                return flat  # the stock features while nothing was removed
            return x if project is None else project(x)

        out, units, kept = self.reduce_units(first if first is not None else flat, units, source, projected,
                                             lambda item: {"modality": modality, "item": item})
        counts = units.item_lengths(len(items))
        return torch.split(out, counts), kept, token_mask, keep_mask(kept, total, out.device)

    # -- installing --------------------------------------------------------------------------

    def attach(self) -> None:
        for module in [self.model] if self.inner is self.model else [self.model, self.inner]:
            self.patches.set(module, "forward", self._wrap_forward(module.forward))
        if self.decoder is not None:
            self.decoder.attach()
        if self.start_fast(f"{type(self.model).__name__}'s decoder"):
            self._orig_generate = self.model.generate
            self.patches.set(self.model, "generate", wrapper(self._generate, self._orig_generate))

    def detach(self) -> None:
        if self.decoder is not None:
            self.decoder.detach()
        self.patches.restore()
        self._states = weakref.WeakKeyDictionary()
        if self.fast is not None:
            self.fast.done()
            self.fast = None

    # -- the fast path ---------------------------------------------------------------------------

    def graph_bytes(self) -> int:
        """GPU memory held by the fast path's captured graphs (0 without it); freed on removal."""
        return 0 if self.fast is None else self.fast.held_bytes()

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate()`` with the fast prefill and captured decoding where the call allows it."""
        kw = bind(self._orig_generate, args, kwargs)
        if kw.get("inputs") is not None and kw.get("input_ids") is None:
            kw["input_ids"] = kw.pop("inputs")
        if not self._has_vision(kw):
            return self._orig_generate(**kw)
        why = refusal(self.model, kw, self.family.pixel_args + self.family.media_args)
        if why is None and kw.get("position_ids") is not None:  # the family numbers the reduced prompt itself
            why = "caller-given position_ids are not supported by the fast prefill"
        if why is not None:
            warnings.warn(f"tokenreduce fast path: this generate() runs eagerly: {why}", stacklevel=3)
            return self._orig_generate(**kw)
        self.records.clear()
        prompt = kw["input_ids"]
        with deferred_checks():  # read once the prefill is queued (fast_generate), or before the eager call
            return self._fast_generate(kw, prompt)

    def _fast_generate(self, kw: dict[str, Any], prompt: torch.Tensor) -> Any:
        """The reduced prefill, then the fast path's prefill and decoding (or, where the call cannot
        take it, the stock ``generate()``), inside :meth:`_generate`'s deferred checks."""
        short, state, _, full = self._prefill(compat.canonical_kwargs(dict(kw)), takes_outputs=True)
        if state is None:  # nothing removed: the stock ids of the whole prompt
            positions, next_position = full, after_prompt(full, short.get("attention_mask"))
        else:
            positions, next_position = short["position_ids"], state.next_pos
        next_position = next_position.unsqueeze(0).expand(positions.shape[0], -1, -1)
        features = {self.token_id(m): torch.cat(list(out.pooler_output))
                    for m, out in (short.get("mm_encoder_outputs") or {}).items() if out is not None}
        plan, why = split_plan(self, short, self.llm_grid(kw))
        if why is not None:  # the stock call reduces again, eagerly
            warnings.warn(f"tokenreduce fast path: this generate() runs eagerly: {why}", stacklevel=4)
            flush_checks()
            return self._orig_generate(**kw)
        return fast_generate(self, short, prompt, features, positions, next_position, plan)

    def _wrap_forward(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(orig)
        var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._busy:  # the top-level forward calls the inner one: only the outermost call reduces
                return orig(*args, **kwargs)
            kw = dict(sig.bind(*args, **kwargs).arguments)
            if var_kw is not None:
                kw.update(kw.pop(var_kw, {}))
            self._busy = True
            try:
                return self._call(orig, compat.canonical_kwargs(kw))  # internally the cache is always ``cache``
            finally:
                self._busy = False

        return functools.wraps(orig)(forward)

    # -- one forward call ----------------------------------------------------------------------

    def _renumbers(self) -> bool:
        """``compact`` with llm_layer steps: 1-D ids from the start, so that layer K can renumber them."""
        return self.positions == "compact" and self.decoder is not None

    def _has_vision(self, kw: dict[str, Any]) -> bool:
        pre = kw.get("mm_encoder_outputs") or {}
        return any(kw.get(a) is not None for a in self.family.pixel_args) or any(pre.get(m) is not None for m in self.modalities)

    def _call(self, orig: Callable[..., Any], kw: dict[str, Any]) -> Any:
        has_vision = self._has_vision(kw)
        cache = kw.get("cache")
        state = self._states.get(cache) if cache is not None and not has_vision else None
        if state is not None and cache.get_seq_length() > 0:
            return self._forward(orig, state.translate(kw))
        if has_vision:  # a new prompt: its records replace the last one's (decoding steps add theirs)
            self.records.clear()
        encoder_side = any(s is not None for s in self._step.values())
        if not (has_vision and (encoder_side or self._renumbers())):
            return self._forward(orig, kw)
        kw, pending, served, _ = self._prefill(kw, compat.takes_encoder_outputs(orig))
        with compat.serving_features(self.inner, served):
            out = self._forward(orig, kw)
        if pending is not None:
            fields = out if isinstance(out, tuple) else (compat.output_cache(out),)
            cache = next((x for x in fields if isinstance(x, Cache)), kw.get("cache"))
            if cache is not None:
                self._states[cache] = pending
        return out

    def _forward(self, orig: Callable[..., Any], kw: dict[str, Any]) -> Any:
        """The stock forward, telling the decoder-layer reduction where the image tokens are."""
        kw = compat.native_kwargs(orig, kw)
        if self.decoder is None:
            return orig(**kw)
        ids = kw.get("input_ids")
        self.decoder.set_image_mask(None if ids is None else self.media_mask(ids), self.llm_grid(kw))
        labels = kw.pop("labels", None)
        out = orig(**kw)
        return out if labels is None else self.loss_after_layers(out, labels)

    # -- the prefill ---------------------------------------------------------------------------

    def _check(self, kw: dict[str, Any]) -> None:
        if kw.get("input_ids") is None:
            raise InvalidInputError(
                "reducing visual tokens needs input_ids (its placeholder tokens mark where each image's "
                "tokens go); got inputs_embeds only"
            )
        cache = kw.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            raise InvalidInputError(
                f"new images on top of a non-empty cache ({cache.get_seq_length()} tokens) are not supported "
                "while visual tokens are reduced; start from an empty cache"
            )
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise InvalidInputError(
                f"attention_mask must be 2-D (B, L) while visual tokens are reduced, got shape {tuple(mask.shape)} "
                "(static/compiled caches, which get 4-D masks, are not supported)"
            )
        if kw.get("inputs_embeds") is not None:
            raise InvalidInputError(
                "pass input_ids, not inputs_embeds, together with images while visual tokens are reduced"
            )

    def _prefill(
        self, kw: dict[str, Any], takes_outputs: bool
    ) -> tuple[dict[str, Any], DecodeState | None, dict[str, Any], torch.Tensor]:
        """The shortened call, how to continue its cache, what the feature getters must serve,
        and the unreduced prompt's position ids ``(A, B, L)``.

        ``takes_outputs``: the stock forward accepts the reduced features as
        ``mm_encoder_outputs``; otherwise the pixel inputs stay and the model's own feature
        getters serve the reduced features during the call (:func:`.compat.serving_features`).
        """
        self._check(kw)
        ids, mask = kw["input_ids"], kw.get("attention_mask")
        pos_full, text_row = self.full_positions(kw)
        prompt = Prompt(self, ids, mask, pos_full)
        # Kept columns: every real token but the dropped placeholders (old padding is dropped
        # too: the shortened rows are left-padded afresh).
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        dropped = False
        outputs = dict(kw.get("mm_encoder_outputs") or {})
        for modality in self.modalities:
            reduced = self.reduce_modality(modality, kw, prompt)
            if reduced is not None:
                outputs[modality], token_mask, keep_tokens = reduced
                keep[token_mask] = keep_tokens
                dropped = dropped or not bool(keep_tokens.all())
        served: dict[str, Any] = {}
        if takes_outputs:
            for name in self.family.pixel_args:
                kw[name] = None
            kw["mm_encoder_outputs"] = outputs
        else:
            served = outputs
        if not dropped and not self._renumbers():  # nothing removed: the stock forward does the rest
            return kw, None, served, pos_full

        shrink = Shrink.from_keep(keep)
        batch, red_len = shrink.index.shape
        axes = pos_full.shape[0]
        mask_red = shrink.mask(mask)
        kw.update(shrink.tokens(kw, self.pad_id()))
        kw["attention_mask"] = mask_red
        seq_red = sequence_positions(mask_red, batch, red_len, ids.device)
        pos_red = shrink.take(pos_full, 0) if self.positions == "original" else seq_red.expand(axes, batch, red_len)
        kw["position_ids"] = pos_red if text_row is None else torch.cat([seq_red.unsqueeze(0), pos_red], dim=0)

        # Where decoding continues, and how to shift caller-given ids of later steps.
        seq_full = text_row if text_row is not None else sequence_positions(mask, batch, ids.shape[1], ids.device)
        if self.positions == "original":
            next_pos = after_prompt(pos_full, mask)
            shift = torch.zeros(axes, batch, 1, dtype=pos_full.dtype, device=pos_full.device)
        else:
            next_pos = seq_red[:, -1:] + 1
            shift = pos_red[..., -1:] - pos_full[..., -1:]
        state = DecodeState(ids.shape[1], red_len, mask_red, next_pos, seq_red[:, -1:] - seq_full[:, -1:], shift)
        return kw, state, served, pos_full


def after_prompt(positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, 1)``: the position id after a prompt's largest (``positions (A, B, L)``, padding
    excluded), where the stock ``rope_deltas`` rule continues decoding."""
    valid = torch.ones(positions.shape[1:], dtype=torch.bool, device=positions.device) if mask is None else mask.bool()
    return positions.masked_fill(~valid, 0).amax(dim=(0, 2)).unsqueeze(1) + 1
