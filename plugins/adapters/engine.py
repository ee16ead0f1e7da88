"""What every model-family adapter shares: the family's data row, patching, the steps, the decoder stage.

A family is described by data first (:class:`Family`: its model classes, where its vision
tower and projector sit, its placeholder tokens, its default positions); its adapter class
adds only what is truly its own (how features become units, and how its prompt is
numbered). Everything else lives here and in the engine modules: :mod:`.units` (the
encoder-side steps), :mod:`.sequence` (shortening the prompt, continuing its cache),
:mod:`.patches` (restoring the model), :mod:`.decoder` (``llm_layer`` steps).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tokenreduce.adapter import Adapter
from tokenreduce.context import ReductionContext
from tokenreduce.errors import ConfigError
from tokenreduce.pipeline import Step
from tokenreduce.reduction import Reduction
from tokenreduce.requirements import LAYERS, QUERIES, Provision
from tokenreduce.stages import Stage

from . import compat
from .decoder import DecoderReduction
from .fast_layers import LayerSplit, split_refusal
from .fast_prefill import FastPrefill
from .patches import Patches
from .units import ENCODER_STAGES, ContextSource, Recorder, Units, call_reducer, encoder_steps, record
from .vision import has_cls


@dataclass(frozen=True)
class Family:
    """One model family as data (a row of the adapter table; see the docs' "Model adapters" page).

    Attributes:
        name: the adapter's registry name.
        model_classes: class names matched against the model's MRO.
        tower: attribute path of the vision tower in the multimodal model (``model.model``).
        projector: attribute path of the projector (``visual.merger`` for Qwen).
        language_model: attribute path of the text decoder.
        placeholders: modality -> config attribute holding its placeholder token id.
        pixel_args: the forward's pixel arguments (a call holding one has visual input).
        media_args: its other per-call media arguments (grids, sizes, timings).
        positions: the default ``positions`` (``compact`` or ``original``).
        cls: whether the tower has a [CLS] token whose output and attention reach reducers
            (``None``: a CLIP-style class embedding in the tower says so).
        vision_keys: whether encoder-side steps get the tower's keys.
        token_positions: whether encoder-side steps get each token's position ids.
        early_layers: ``(dotted config attribute, name)`` of the decoder layers that receive vision
            features after the prompt's (Qwen3-VL's DeepStack): ``llm_layer`` steps come after them.
        fast_prefill: the stock forward is "embed, scatter the features, run the decoder",
            so the fast path may replay that.
    """

    name: str
    model_classes: tuple[str, ...]
    tower: str = "vision_tower"
    projector: str = "multi_modal_projector"
    language_model: str = "language_model"
    placeholders: tuple[tuple[str, str], ...] = (("image", "image_token_id"),)
    pixel_args: tuple[str, ...] = ("pixel_values",)
    media_args: tuple[str, ...] = ()
    positions: str = "compact"
    cls: bool | None = None
    vision_keys: bool = True
    token_positions: bool = False
    early_layers: tuple[str, str] | None = None
    fast_prefill: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.model_classes:
            raise ConfigError(f"Family row {self.name!r}: name and model_classes must be non-empty")
        if self.positions not in ("compact", "original"):
            raise ConfigError(f"Family row {self.name!r}: positions={self.positions!r}; allowed: 'compact', 'original'")
        if not self.placeholders or any(len(p) != 2 for p in self.placeholders):
            raise ConfigError(f"Family row {self.name!r}: placeholders must be (modality, config attribute) pairs, "
                              f"got {self.placeholders!r}")


# What an llm_layer step gets: the decoder's hidden states, recomputed attention rows and keys.
LLM_FIELDS = frozenset({"attention", "keys", "text_keys", "text_embeds", "text_mask", "positions", "grid"})


def bind(fn: Callable[..., Any], args: tuple, kwargs: dict) -> dict:
    """All arguments of a call to ``fn`` by name (``**kwargs`` flattened)."""
    sig = compat.signature(fn)
    bound = sig.bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    for name, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(out.pop(name, {}))
    return out


def wrapper(impl: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """A plain function calling ``impl`` that looks like ``original`` (name, doc, signature)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return impl(*args, **kwargs)

    return functools.update_wrapper(call, original)


def path(root: Any, dotted: str) -> Any:
    """``root.a.b`` for ``"a.b"``."""
    return functools.reduce(getattr, dotted.split("."), root)


class FamilyAdapter(Adapter):
    """Base of every family adapter: reads its :class:`Family` row, holds the shared machinery."""

    family: ClassVar[Family]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fam = cls.__dict__.get("family")
        if fam is not None:  # the registry and Adapter read these class attributes
            cls.name, cls.model_classes, cls.default_positions = fam.name, fam.model_classes, fam.positions

    def __init__(self, model: torch.nn.Module, pipeline: Any):
        super().__init__(model, pipeline)
        # ``*ForConditionalGeneration`` holds the multimodal model in ``.model``.
        self.inner = model.model if hasattr(model, "lm_head") else model
        self.patches = Patches()
        self.decoder: DecoderReduction | None = None
        self.fast: FastPrefill | None = None  # the fast path's captured prefills and decoding steps
        self._step: dict[Stage, Step | None] = {st: next(iter(self.steps(st)), None) for st in ENCODER_STAGES}

    # -- the family's parts ------------------------------------------------------------

    @property
    def modalities(self) -> dict[str, str]:
        return dict(self.family.placeholders)

    @property
    def tower(self) -> torch.nn.Module:
        return path(self.inner, self.family.tower)

    @property
    def projector(self) -> torch.nn.Module:
        return path(self.inner, self.family.projector)

    @property
    def language_model(self) -> torch.nn.Module:
        return path(self.inner, self.family.language_model)

    def early_layers(self) -> int:
        """How many decoder layers receive vision features after the prompt's (the row's ``early_layers``)."""
        if self.family.early_layers is None:
            return 0
        owner, attr = self.family.early_layers[0].rsplit(".", 1)
        return len(getattr(path(self.inner.config, owner), attr, None) or ())

    def token_id(self, modality: str) -> int:
        return int(getattr(self.inner.config, self.modalities[modality]))

    def media_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` bool: the placeholder tokens of every modality."""
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for modality in self.modalities:
            mask |= ids == self.token_id(modality)
        return mask

    def pad_id(self) -> int:
        """The id that fills new padding: the text config's pad token, unless absent or a placeholder (then 0)."""
        pad = self.inner.config.get_text_config().pad_token_id
        return 0 if pad is None or pad in {self.token_id(m) for m in self.modalities} else int(pad)

    # -- the context contract -----------------------------------------------------------------

    def encoder_context_fields(self) -> set[str]:
        """The context encoder-side steps get (from the family row and the pipeline)."""
        fields = {"text_embeds", "text_mask", "grid"}
        fields |= {"keys"} if self.family.vision_keys else set()
        fields |= {"positions"} if self.family.token_positions else set()
        has = self.family.cls if self.family.cls is not None else has_cls(self.tower)
        fields |= {"cls_token", "cls_attention"} if has else set()
        # A whole video per unit (per_video) has frames; images and single frames have none.
        if "video" in self.modalities and self.pipeline.video_budget == "per_video":
            fields |= {"frames", "frame_index"}
        return fields

    def provides(self, stage: Stage) -> Provision:
        if stage is Stage.LLM_LAYER:
            return Provision(fields=LLM_FIELDS, queries=QUERIES, layers=LAYERS)
        no_cls = f"the {type(self.tower).__name__} vision tower has no [CLS] token"
        no_frames = ("only whole videos have frames: a video model with the pipeline's video_budget: per_video"
                     if "video" in self.modalities else f"the {self.name} adapter takes no whole videos")
        reasons = {
            "cls_token": no_cls, "cls_attention": no_cls, "frames": no_frames, "frame_index": no_frames,
            "keys": f"the {self.name} adapter does not expose vision-tower keys",
            "text_keys": "keys of text tokens exist only inside the decoder (llm_layer stage)",
            "attention": "decoder attention exists only at the llm_layer stage",
            "positions": "position ids exist only inside the decoder (llm_layer stage)",
        }
        given = self.encoder_context_fields()
        return Provision(fields=given, reasons={k: v for k, v in reasons.items() if k not in given})

    def validate(self) -> None:
        compat.check_supported()
        if self.positions not in ("original", "compact"):
            raise ConfigError(f"positions={self.positions!r} is not supported; use 'original' or 'compact'")
        early = self.early_layers()
        if early:
            what = self.family.early_layers[1]
            for step in self.steps(Stage.LLM_LAYER):
                if step.layer is not None and step.layer < early:
                    raise ConfigError(
                        f"llm_layer step {step.reducer.name!r}: layer={step.layer} is out of range for "
                        f"{type(self.model).__name__}: its {what} adds vision features after decoder layers "
                        f"0..{early - 1}, so image tokens can be removed from layer {early} on"
                    )
        self.check_context()
        self.build_decoder()

    # -- steps -------------------------------------------------------------------------------

    def step(self, stage: Stage) -> Step | None:
        """The pipeline's step at an encoder-side stage (at most one), or None."""
        return self._step[stage]

    def needs(self, *fields: str) -> bool:
        """Whether an encoder-side step needs any of these context fields."""
        return any(s is not None and set(fields) & set(s.reducer.required_context) for s in self._step.values())

    def run_step(self, step: Step, tokens: torch.Tensor, valid: torch.Tensor | None, context: ReductionContext,
                 budget: Any = None) -> tuple[Reduction, float]:
        """Call a step's reducer, timed (the engine's reducer call; a hook for tests and subclasses)."""
        return call_reducer(step, tokens, valid, context, budget)

    def reduce_units(
        self,
        tokens: torch.Tensor,
        units: Units,
        source: ContextSource,
        project: Callable[[torch.Tensor, Units, bool], torch.Tensor],
        info: Callable[[int], dict] | None = None,
        *,
        plan: Callable[[Step, Units], Units] | None = None,
        recorder: Recorder | None = None,
    ) -> tuple[torch.Tensor, Units, torch.Tensor | None]:
        """The encoder-side steps on the units of ``tokens (S, D_v)``, recorded (see :func:`.units.encoder_steps`).

        Returns the kept, projected features (unit after unit), their units and the original
        flat index of each (``None``: nothing was removed, the features are the stock ones).
        ``recorder`` defaults to one record entry per unit (``info(item)`` added to each).
        """
        recorder = recorder or record(self.records, units.offsets(tokens.device), info)
        return encoder_steps(self._step, self.run_step, tokens, units, project, source, recorder, plan)

    # -- the fast path --------------------------------------------------------------------------

    def start_fast(self, what: str) -> bool:
        """The fast prefill, where the pipeline asks for it and :meth:`fast_refusal` has no reason
        against it (then ``self.fast`` holds it); otherwise a one-line warning that ``what`` runs eagerly."""
        if not self.pipeline.fast:
            return False
        why = self.fast_refusal()
        if why is not None:
            warnings.warn(f"tokenreduce fast path: {what} runs eagerly: {why}", stacklevel=5)
            return False
        self.fast = FastPrefill.for_model(self.model, self.language_model)
        llm = self.steps(Stage.LLM_LAYER)
        # Run inside the captured prefill (the eager DecoderReduction sits out those calls). Set on
        # every pipeline: graphs kept across pipelines (keep_graphs) must not keep another's steps.
        self.fast.split = LayerSplit(self.language_model, llm, self.positions, self.records.append) if llm else None
        return True

    def fast_refusal(self) -> str | None:
        """Why this pipeline on this model cannot take the fast prefill (``None``: it can)."""
        if not self.family.fast_prefill:
            return f"the {self.name} adapter has no fast prefill yet"
        if not hasattr(self.model, "lm_head"):
            return f"{type(self.model).__name__} has no LM head to replay (use the *ForConditionalGeneration model)"
        llm = self.steps(Stage.LLM_LAYER)
        why = split_refusal(self.language_model, llm, self.positions) if llm else None
        if why is not None:
            return why
        if self.early_layers():
            return f"its {self.family.early_layers[1]} features enter decoder layers, which the fast prefill does not replay yet"
        implementation = self.language_model.config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            return f"attn_implementation={implementation!r}: the fast prefill passes a 4-D mask (sdpa or eager)"
        return None

    # -- the decoder stage -------------------------------------------------------------------

    def build_decoder(self) -> None:
        """The ``llm_layer`` machinery, built (and so validated) at patch time, not mid-forward."""
        llm = self.steps(Stage.LLM_LAYER)
        if llm:
            self.decoder = DecoderReduction(
                self.language_model, llm, positions=self.positions, on_record=self.records.append
            )

    def loss_after_layers(self, out: Any, labels: torch.Tensor) -> Any:
        """The stock loss on the logits of a sequence shortened inside the decoder (labels follow the kept tokens)."""
        kept = self.decoder.last_kept if self.decoder is not None else None
        if kept is not None:
            labels = torch.gather(labels.to(kept.device), 1, kept.clamp(min=0)).masked_fill(kept < 0, -100)
        loss = self.model.loss_function(
            logits=out.logits, labels=labels, vocab_size=self.model.config.get_text_config().vocab_size
        )
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
