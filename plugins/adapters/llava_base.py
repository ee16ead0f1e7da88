"""Shared machinery of the LLaVA-family adapters (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision).

How a pipeline runs on a stock model, without touching its modeling code:

* Encoder-side stages (``vision_encoder``, ``projector``): the instance's ``forward`` and
  ``generate`` are wrapped. When pixel inputs arrive, the adapter runs the model's own
  vision tower and projector (:meth:`LlavaFamilyAdapter.encode`, per model), reduces every
  image / frame on its own budget, and calls the stock forward with the reduced features
  as ``mm_encoder_outputs`` and with input ids, attention mask, labels, position ids and
  token type ids shortened consistently (each image's placeholder run keeps one
  placeholder per kept feature), so transformers' own placeholder checks pass.
  ``generate`` shortens the prompt before decoding starts (the cache then only ever holds
  the kept tokens) and returns sequences with the caller's original prompt in front.
* ``llm_layer`` steps: a :class:`~tokenreduce_plugins.adapters.decoder.DecoderReduction` on
  the text decoder; the wrapper tells it where the image tokens are at every forward.
* Positions: ``compact`` (default) renumbers the shortened sequence (what LLaVA-style
  pruning does: position ids are computed on the shortened inputs); ``original`` passes
  the kept tokens' original position ids (and ``generate`` continues after the original
  prompt length).
* After every forward with pixel inputs (or ``generate`` call), :attr:`records` holds one
  :class:`~tokenreduce.adapter.StageRecord` per step: tokens per image (or frame) before
  and after, kept indices into the item's stock placeholder sequence, reducer info, time.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenreduce.errors import InvalidInputError
from tokenreduce.validation import deferred_checks

from . import compat
from .engine import FamilyAdapter, bind, wrapper
from .fast_prefill import fast_generate, refusal, split_plan
from .graphed_tower import GraphedTower
from .sequence import PromptFacts, Shrink, item_rows, placeholder_keep, removed_before, text_after_last
from .units import ContextSource
from .vision import VisionContext

_MEDIA_ARGS = ("pixel_values", "pixel_values_videos", "image_sizes", "image_sizes_videos", "batch_num_images")


@dataclass
class Encoded:
    """One modality's reduced features.

    Attributes:
        keep: per item (image / video), ``(N_i,)`` bool over its stock placeholder sequence.
        pooler: what ``mm_encoder_outputs[modality].pooler_output`` must hold for the
            stock forward (a list of ``(T_i, D)`` for images, a tensor for videos).
        kept: per item, how many of its placeholders stay (``keep[i].sum()``) where the family
            knows it on the host (the engine's unit lengths); ``None``: read back when needed.
    """

    keep: list[torch.Tensor]
    pooler: Any
    kept: list[int] | None = None


class LlavaFamilyAdapter(FamilyAdapter):
    """Base of the LLaVA-style adapters (the ``generate()``-first path, see the module docs);
    subclasses give a :class:`~.engine.Family` row and implement :meth:`encode`."""

    def __init__(self, model: torch.nn.Module, pipeline):
        super().__init__(model, pipeline)
        # After an encoder-side reduction: per modality, per item, the (N_i,) bool mask of
        # its stock placeholder tokens that were kept (for plots and debugging).
        self.last_keep: dict[str, list[torch.Tensor]] = {}
        self._kw: dict | None = None
        self._serving = False  # inside a generate() whose getters serve reduced features
        self.last_features: dict[int, torch.Tensor] = {}  # per placeholder id: the last reduction's features

    # -- patching ------------------------------------------------------------------------

    def attach(self) -> None:
        self._orig_forward = self.model.forward
        self._orig_generate = self.model.generate
        self.patches.set(self.model, "forward", wrapper(self._forward, self._orig_forward))
        self.patches.set(self.model, "generate", wrapper(self._generate, self._orig_generate))
        if self.decoder is not None:
            self.decoder.attach()
        if self.start_fast(type(self.model).__name__):
            self._graphed_tower = GraphedTower(self.tower, self.fast.tower_graphs)

    def fast_refusal(self) -> str | None:
        if self.positions != "compact":
            return f"positions={self.positions!r}: the fast prefill numbers the reduced prompt compactly"
        return super().fast_refusal()

    def detach(self) -> None:
        self.patches.restore()
        if self.decoder is not None:
            self.decoder.detach()
        if self.fast is not None:
            self._graphed_tower.remove()  # its graphs go with self.fast
            self.fast.done()
            self.fast = None

    def graph_bytes(self) -> int:
        """GPU memory held by the fast path's captured graphs (0 without it); freed on removal."""
        return 0 if self.fast is None else self.fast.held_bytes() + self._graphed_tower.held_bytes()

    # -- wrappers ------------------------------------------------------------------------

    def _has_pixels(self, kw: dict) -> bool:
        return any(kw.get(k) is not None for k in self.family.pixel_args)

    def _encoder_side(self, kw: dict) -> bool:
        return (
            self._has_pixels(kw)
            and not self._serving
            and kw.get("mm_encoder_outputs") is None
            and any(s is not None for s in self._step.values())
        )

    def _forward(self, *args, **kwargs):
        kw = bind(self._orig_forward, args, kwargs)
        if self._has_pixels(kw) and not self._serving:
            self.records.clear()
        served: dict[str, Any] = {}
        if self._encoder_side(kw):
            kw, served = self.reduce_inputs(kw, for_generate=False)
        kw = compat.native_kwargs(self._orig_forward, kw)
        if self.decoder is None:
            with compat.serving_features(self.inner, served):
                return self._orig_forward(**kw)
        self.decoder.set_image_mask(self._media_mask(kw), self.llm_grid())
        labels = kw.pop("labels", None)
        with compat.serving_features(self.inner, served):
            out = self._orig_forward(**kw)
        # Logits cover the reduced sequence: score them against the labels of the kept positions.
        return out if labels is None else self.loss_after_layers(out, labels)

    def _generate(self, *args, **kwargs):
        kw = bind(self._orig_generate, args, kwargs)
        if kw.get("inputs") is not None and kw.get("input_ids") is None:
            kw["input_ids"] = kw.pop("inputs")
        encoder_side = self._encoder_side(kw)
        if self._has_pixels(kw) and not self._serving:
            self.records.clear()  # a new prompt: the records are this call's (decoding forwards add none)
        # llm_layer steps alone: the fast path encodes the images itself (nothing removed there).
        split = self.fast is not None and self.fast.split is not None and self._has_pixels(kw) and not self._serving
        if not encoder_side and not (split and kw.get("mm_encoder_outputs") is None):
            return self._orig_generate(**kw)
        if not encoder_side and (why := refusal(self.model, kw)) is not None:
            warnings.warn(f"tokenreduce fast path: this generate() runs eagerly: {why}", stacklevel=3)
            return self._orig_generate(**kw)
        prompt = kw["input_ids"]
        # The fast path reads the reducers' finiteness checks once the prefill is queued (fast_generate).
        with deferred_checks() if self.fast is not None else nullcontext():
            kw, served = self.reduce_inputs(kw, for_generate=True)
            if self.fast is not None:
                why = refusal(self.model, kw)
                plan, why = split_plan(self, kw, self.llm_grid()) if why is None else (None, why)
                if why is None:
                    return fast_generate(self, kw, prompt, self.last_features, plan=plan)
                warnings.warn(f"tokenreduce fast path: this generate() runs eagerly: {why}", stacklevel=3)
        short = kw["input_ids"].shape[1]
        # The pixel inputs may stay in the call (see reduce_inputs): its forwards must not
        # reduce them again.
        self._serving = bool(served)
        try:
            with compat.serving_features(self.inner, served):
                out = self._orig_generate(**kw)
        finally:
            self._serving = False
        # Give the caller back its own prompt, so `out[:, prompt_len:]` is still the answer.
        if isinstance(out, torch.Tensor):
            return torch.cat([prompt.to(out.device), out[:, short:]], dim=1)
        out.sequences = torch.cat([prompt.to(out.sequences.device), out.sequences[:, short:]], dim=1)
        return out

    def _media_mask(self, kw: dict) -> torch.Tensor | None:
        ids = kw.get("input_ids")
        if ids is not None:
            return self.media_mask(ids)
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            return None
        # Placeholders by their embedding: rows equal to a placeholder token's.
        ref = self.model.get_input_embeddings()(torch.tensor([self.token_id(m) for m in self.modalities], device=embeds.device))
        return (embeds.unsqueeze(-2) == ref).all(dim=-1).any(dim=-1)

    def llm_grid(self) -> tuple[int, int] | None:
        """Patch grid of one unreduced image in the LLM sequence, when it is a plain grid."""
        return None

    # -- encoder side --------------------------------------------------------------------

    def encode(self, kw: dict) -> dict[str, Encoded]:
        """Run the vision tower + projector with the encoder-side steps; one entry per modality present."""
        raise NotImplementedError

    def reduce_inputs(self, kw: dict, *, for_generate: bool) -> tuple[dict, dict[str, Any]]:
        """Encode and reduce the pixel inputs; shorten every per-token input consistently.

        Returns the new call arguments and, for releases whose forward cannot take
        pre-encoded features, what the model's feature getters must serve during the call
        (see :func:`.compat.serving_features`; empty otherwise).
        """
        ids = kw.get("input_ids")
        if ids is None:
            raise InvalidInputError(
                "encoder-side reduction needs input_ids (the image placeholder tokens), got inputs_embeds only"
            )
        self._kw = kw
        am = kw.get("attention_mask")
        # Read before the tower is queued: then nothing after it waits for the GPU (see PromptFacts).
        facts = PromptFacts.read(ids, am, [self.token_id(m) for m in self.modalities])
        encoded = self.encode(kw)
        self.last_keep = {m: e.keep for m, e in encoded.items()}
        self.last_features = {self.token_id(m): _flat(e.pooler) for m, e in encoded.items()}
        keep = torch.ones_like(ids, dtype=torch.bool)
        for modality, enc in encoded.items():
            keep &= placeholder_keep(ids, self.token_id(modality), enc.keep, modality, facts.count(self.token_id(modality)))
        known = all(e.kept is not None for e in encoded.values())
        lengths = facts.lengths({self.token_id(m): e.kept for m, e in encoded.items()},
                                {self.token_id(m): [k.numel() for k in e.keep] for m, e in encoded.items()}) if known else None
        # Old padding goes too: the shortened rows are padded afresh to the longest one.
        shrink = Shrink.from_keep(keep if am is None else keep & am.bool(), right=facts.right, lengths=lengths)
        new = {**kw, **shrink.tokens(kw, self.pad_id())}
        if am is not None or shrink.padded or self.positions == "original":
            new["attention_mask"] = shrink.take(am if am is not None else torch.ones_like(ids), 0)
        pos = kw.get("position_ids")
        if self.positions == "original":
            if pos is None:
                pos = self._stock_positions(ids, am, kw, for_generate)
            new["position_ids"] = shrink.take(pos, 0)
        elif pos is not None:
            new["position_ids"] = shrink.take(pos - removed_before(keep), 0)
        self._kw = None
        if compat.takes_encoder_outputs(self._orig_forward):
            for name in _MEDIA_ARGS:
                new.pop(name, None)
            new["mm_encoder_outputs"] = {m: BaseModelOutputWithPooling(pooler_output=e.pooler) for m, e in encoded.items()}
            return new, {}
        # The pixel inputs stay, so the stock forward asks its own getters, which serve these.
        return new, {m: BaseModelOutputWithPooling(pooler_output=self.native_pooler(m, e.pooler)) for m, e in encoded.items()}

    def native_pooler(self, modality: str, pooler: Any) -> Any:
        """``pooler`` (the features the LLM sequence gets) as this release's feature getter returns them."""
        return pooler

    def _stock_positions(self, ids, am, kw, for_generate: bool) -> torch.Tensor:
        """The position ids the stock model would use for the full prompt."""
        if for_generate and am is not None:
            return self.model._prepare_position_ids_for_generation(ids, {"attention_mask": am})
        cache = compat.get_cache(kw)
        past = cache.get_seq_length() if cache is not None else 0
        return (torch.arange(ids.shape[1], device=ids.device) + past).expand_as(ids)

    # -- helpers for encode() -----------------------------------------------------------------

    def feature_selection(self, kw: dict) -> tuple[Any, str, int]:
        """``(layer, strategy, start)``: the call's vision feature layer and select strategy
        (the config's where the call gives none), and the first patch column they select
        (1 under ``default``, which drops [CLS])."""
        cfg = self.model.config
        layer = kw.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        strategy = kw.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        return layer, strategy, 1 if strategy == "default" else 0

    def text_context(self, modality: str, lengths: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per item: embeddings of its sample's instruction (text after the last image), if a step needs them."""
        if not self.needs("text_embeds", "text_mask"):
            return None, None
        kw = self._kw
        ids = kw["input_ids"]
        am = kw.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if am is None else am.bool()
        media = self._media_mask(kw)
        embeds = self.model.get_input_embeddings()(ids)
        text, mask = text_after_last(ids, embeds, media, valid)
        rows = item_rows(ids, self.token_id(modality), lengths)
        return text[rows], mask[rows]

    @staticmethod
    def unit_context(vctx: VisionContext | None, text: torch.Tensor | None, text_mask: torch.Tensor | None) -> ContextSource:
        """The context source of one unit per image: the vision context's rows and each image's instruction."""
        return (vctx or VisionContext(None, None, None)).source({"text_embeds": text, "text_mask": text_mask})



def _flat(pooler: Any) -> torch.Tensor:
    """``(T, D)``: an encoder output's features in sequence order (a list per image, or one tensor)."""
    if isinstance(pooler, (list, tuple)):
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in pooler])
    return pooler.reshape(-1, pooler.shape[-1])
