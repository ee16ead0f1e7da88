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

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenreduce.adapter import Adapter, StageRecord
from tokenreduce.context import ReductionContext
from tokenreduce.errors import InvalidInputError, MissingContextError
from tokenreduce.pipeline import Step
from tokenreduce.reduction import Reduction
from tokenreduce.stages import Stage

from . import compat
from .decoder import DecoderReduction, find_text_decoder
from .fast_prefill import FastPrefill, fast_generate, refusal
from .graphed_tower import GraphedTower
from .sequence import (
    apply_plan,
    item_rows,
    placeholder_keep,
    removed_before,
    shrink_plan,
    text_after_last,
)
from .units import ENCODER_STAGES, ContextSource, Units, call_reducer, encoder_steps, record
from .vision import VisionContext, has_cls

_MEDIA_ARGS = ("pixel_values", "pixel_values_videos", "image_sizes", "image_sizes_videos", "batch_num_images")


@dataclass
class Encoded:
    """One modality's reduced features.

    Attributes:
        keep: per item (image / video), ``(N_i,)`` bool over its stock placeholder sequence.
        pooler: what ``mm_encoder_outputs[modality].pooler_output`` must hold for the
            stock forward (a list of ``(T_i, D)`` for images, a tensor for videos).
    """

    keep: list[torch.Tensor]
    pooler: Any


def _wrapper(impl, original):
    """A plain function calling ``impl`` that looks like ``original`` (name, doc, signature)."""

    def call(*args, **kwargs):
        return impl(*args, **kwargs)

    return functools.update_wrapper(call, original)


def bind(fn, args: tuple, kwargs: dict) -> dict:
    """All arguments of a call to ``fn`` by name (``**kwargs`` flattened)."""
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    for name, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(out.pop(name, {}))
    return out


class LlavaFamilyAdapter(Adapter):
    """Base of the LLaVA adapters; subclasses implement :meth:`encode`."""

    default_positions = "compact"
    # modality -> name of the config attribute holding its placeholder token id
    modalities: ClassVar[dict[str, str]] = {"image": "image_token_id"}
    pixel_args: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # Whether the stock forward is "embed the ids, scatter the features into their
    # placeholders, run the text decoder" and nothing else, so the fast path may replay that.
    fast_prefill: ClassVar[bool] = False

    def __init__(self, model: torch.nn.Module, pipeline):
        super().__init__(model, pipeline)
        self.decoder: DecoderReduction | None = None
        # After an encoder-side reduction: per modality, per item, the (N_i,) bool mask of
        # its stock placeholder tokens that were kept (for plots and debugging).
        self.last_keep: dict[str, list[torch.Tensor]] = {}
        self._kw: dict | None = None
        self._saved: dict[str, Any] = {}
        self._serving = False  # inside a generate() whose getters serve reduced features
        self.fast: FastPrefill | None = None  # the fast path's captured prefills (pipeline.fast)
        self.last_features: dict[int, torch.Tensor] = {}  # per placeholder id: the last reduction's features
        self._cur_step: dict[Stage, Step | None] = {st: (self.steps(st) or [None])[0] for st in ENCODER_STAGES}

    # -- description ---------------------------------------------------------------------

    @property
    def inner(self) -> torch.nn.Module:
        """The ``Llava*Model`` inside the ``...ForConditionalGeneration``."""
        return self.model.model

    def token_id(self, modality: str) -> int:
        return int(getattr(self.model.config, self.modalities[modality]))

    def encoder_context_fields(self) -> set[str]:
        fields = {"keys", "text_embeds", "text_mask", "grid"}
        if has_cls(self.inner.vision_tower):
            fields |= {"cls_token", "cls_attention"}
        return fields

    def llm_context_fields(self) -> set[str]:
        return {"attention", "keys", "text_keys", "text_embeds", "text_mask", "positions", "grid"}

    def step(self, stage: Stage) -> Step | None:
        return self._cur_step[stage]

    def needs(self, *fields: str) -> bool:
        """Whether an encoder-side step needs any of these context fields."""
        return any(
            s is not None and set(fields) & set(s.reducer.required_context) for s in self._cur_step.values()
        )

    # -- patching ------------------------------------------------------------------------

    def validate(self) -> None:
        compat.check_supported()
        for step in self.pipeline:
            avail = self.llm_context_fields() if step.stage is Stage.LLM_LAYER else self.encoder_context_fields()
            missing = sorted(set(step.reducer.required_context) - avail)
            if missing:
                raise MissingContextError(
                    f"reducer {step.reducer.name!r} at stage {step.stage.value} needs context {', '.join(missing)}, "
                    f"which the {self.name} adapter cannot provide for {type(self.model).__name__} "
                    f"(available there: {', '.join(sorted(avail))})"
                    + ("; only whole videos have frames: a video model with the pipeline's video_budget: per_video"
                       if {"frames", "frame_index"} & set(missing) and "video" in self.modalities else "")
                )
        llm = self.steps(Stage.LLM_LAYER)
        if llm:  # builds (and so validates) the decoder machinery now, not mid-forward
            self.decoder = DecoderReduction(
                find_text_decoder(self.model), llm, positions=self.positions, on_record=self.records.append
            )

    def attach(self) -> None:
        d = self.model.__dict__
        self._saved = {k: d[k] for k in ("forward", "generate") if k in d}
        self._orig_forward = self.model.forward
        self._orig_generate = self.model.generate
        self.model.forward = _wrapper(self._forward, self._orig_forward)
        self.model.generate = _wrapper(self._generate, self._orig_generate)
        if self.decoder is not None:
            self.decoder.attach()
        if self.pipeline.fast:
            why = self._fast_refusal()
            if why is None:
                self.fast = FastPrefill.for_model(self.model, find_text_decoder(self.model))
                self._graphed_tower = GraphedTower(self.inner.vision_tower, self.fast.tower_graphs)
            else:
                warnings.warn(f"tokenreduce fast path: {type(self.model).__name__} runs eagerly: {why}", stacklevel=4)

    def _fast_refusal(self) -> str | None:
        """Why this pipeline on this model cannot take the fast prefill (``None``: it can)."""
        if not self.fast_prefill:
            return f"the {self.name} adapter has no fast prefill yet"
        if self.steps(Stage.LLM_LAYER):
            return "llm_layer steps are not captured yet (the layers before and after K)"
        if self.positions != "compact":
            return f"positions={self.positions!r}: the fast prefill numbers the reduced prompt compactly"
        implementation = find_text_decoder(self.model).config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            return f"attn_implementation={implementation!r}: the fast prefill passes a 4-D mask (sdpa or eager)"
        return None

    def detach(self) -> None:
        d = self.model.__dict__
        for k in ("forward", "generate"):
            d.pop(k, None)
            if k in self._saved:
                d[k] = self._saved[k]
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
        return any(kw.get(k) is not None for k in self.pixel_args)

    def _encoder_side(self, kw: dict) -> bool:
        return (
            self._has_pixels(kw)
            and not self._serving
            and kw.get("mm_encoder_outputs") is None
            and any(s is not None for s in self._cur_step.values())
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
        if labels is not None:
            # Logits cover the reduced sequence: score them against the labels of the kept positions.
            kept = self.decoder.last_kept
            if kept is not None:
                labels = torch.gather(labels.to(kept.device), 1, kept.clamp(min=0)).masked_fill(kept < 0, -100)
            out.loss = self.model.loss_function(
                logits=out.logits, labels=labels, vocab_size=self.model.config.get_text_config().vocab_size
            )
        return out

    def _generate(self, *args, **kwargs):
        kw = bind(self._orig_generate, args, kwargs)
        if kw.get("inputs") is not None and kw.get("input_ids") is None:
            kw["input_ids"] = kw.pop("inputs")
        if not self._encoder_side(kw):
            return self._orig_generate(**kw)
        self.records.clear()
        prompt = kw["input_ids"]
        kw, served = self.reduce_inputs(kw, for_generate=True)
        if self.fast is not None:
            why = refusal(self.model, kw)
            if why is None:
                return fast_generate(self, kw, prompt, self.last_features)
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
        embeds = kw.get("inputs_embeds")
        mask = None
        for modality in self.modalities:
            tid = self.token_id(modality)
            if ids is not None:
                m = ids == tid
            elif embeds is not None:
                ref = self.model.get_input_embeddings()(torch.tensor(tid, device=embeds.device))
                m = (embeds == ref).all(dim=-1)
            else:
                return None
            mask = m if mask is None else mask | m
        return mask

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
        encoded = self.encode(kw)
        self.last_keep = {m: e.keep for m, e in encoded.items()}
        self.last_features = {self.token_id(m): _flat(e.pooler) for m, e in encoded.items()}
        keep = torch.ones_like(ids, dtype=torch.bool)
        for modality, enc in encoded.items():
            keep &= placeholder_keep(ids, self.token_id(modality), enc.keep, modality)
        am = kw.get("attention_mask")
        # Old padding goes too: the shortened rows are padded afresh to the longest one.
        src, slot = shrink_plan(keep if am is None else keep & am.bool(), am)
        new = dict(kw)
        pad_id = self.model.config.get_text_config().pad_token_id
        new["input_ids"] = apply_plan(ids, src, slot, 0 if pad_id is None else pad_id)
        full_mask = am if am is not None else torch.ones_like(ids)
        new_mask = apply_plan(full_mask, src, slot, 0)
        if am is not None or not bool(slot.all()) or self.positions == "original":
            new["attention_mask"] = new_mask
        if kw.get("labels") is not None:
            new["labels"] = apply_plan(kw["labels"], src, slot, -100)
        for name in ("token_type_ids", "mm_token_type_ids"):
            if kw.get(name) is not None:  # may be shorter than the ids (the stock model accepts it): padded
                types = torch.nn.functional.pad(kw[name], (0, ids.shape[1] - kw[name].shape[-1]))
                new[name] = apply_plan(types, src, slot, 0)
        pos = kw.get("position_ids")
        if self.positions == "original":
            if pos is None:
                pos = self._stock_positions(ids, am, kw, for_generate)
            new["position_ids"] = apply_plan(pos, src, slot, 0)
        elif pos is not None:
            new["position_ids"] = apply_plan(pos - removed_before(keep), src, slot, 0)
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

    def run_step(self, step: Step, tokens: torch.Tensor, valid: torch.Tensor | None, context: ReductionContext,
                 budget=None) -> tuple[Reduction, float]:
        """Call a step's reducer, timed (the engine's reducer call; a hook for tests and subclasses)."""
        return call_reducer(step, tokens, valid, context, budget)

    def reduce_units(
        self,
        tokens: torch.Tensor,
        units: Units,
        source: ContextSource,
        project: Callable[[torch.Tensor, Units, bool], torch.Tensor],
    ) -> tuple[torch.Tensor, Units, torch.Tensor | None]:
        """The encoder-side steps on the units of ``tokens (S, D_v)``, recorded (see :func:`.units.encoder_steps`).

        Returns the kept, projected features (unit after unit), their units and the original
        flat index of each (``None``: nothing was removed, the features are the stock ones).
        """
        recorder = record(self.records, units.offsets(tokens.device))
        return encoder_steps(self._cur_step, self.run_step, tokens, units, project, source, recorder)

    @staticmethod
    def unit_context(vctx: VisionContext | None, text: torch.Tensor | None, text_mask: torch.Tensor | None) -> ContextSource:
        """The context source of one unit per image: the vision context's rows and each image's instruction."""
        return (vctx or VisionContext(None, None, None)).source({"text_embeds": text, "text_mask": text_mask})

    def add_record(self, step: Step, before: list[int], after: list[int], indices: list[torch.Tensor],
                   info: list[dict], seconds: float) -> None:
        """Append the record of one encoder-side step (one entry per unit: image, frame or video)."""
        self.records.append(StageRecord(step.stage, step.reducer.name, None, before, after, indices, info, seconds))


def _flat(pooler: Any) -> torch.Tensor:
    """``(T, D)``: an encoder output's features in sequence order (a list per image, or one tensor)."""
    if isinstance(pooler, (list, tuple)):
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in pooler])
    return pooler.reshape(-1, pooler.shape[-1])
