"""The video row of the end-to-end suite: every video method on a LLaVA-OneVision-7B-shaped video.

One synthetic video per prompt (:data:`benchmarks.models.FULL_SPECS`
``llava-onevision-7b-video``: 32 frames of 384x384, 196 tokens per frame, 6,272 video
tokens plus the video's newline), timed exactly as the image rows (warm-up per setting,
interleaved rounds, p10 / median / p90, peak memory; :mod:`benchmarks.end_to_end`).

Settings (:func:`video_settings`), all under ``video_budget: per_video`` (each row of an
encoder-side step is one whole video; a ratio budget is a fraction of the video's tokens):

* no reduction (the reference);
* every registered *video method*, i.e. every reducer whose ``required_context`` has
  ``frames`` (:func:`video_methods`; whatever is registered when the suite runs), keeping
  ``ratio`` (default 0.1) of the video's tokens at its published stage
  (:func:`benchmarks.end_to_end.published_stage`). A method whose YAML example
  (``docs/examples/reducers/<name>.yaml``) has ``llm_layer`` steps runs that whole
  pipeline (:func:`method_plan`): its first step at ``ratio`` of the video, every later
  step as the example writes it (a ratio stays a ratio of the tokens it receives, a count
  is scaled by what the first step's change did to the example's count), at the example's
  decoder layers scaled from LLaVA-OneVision-7B's 28 layers to the model's depth, with the
  example's parameters. A reducer that such an example uses as a later step (an
  ``llm_layer`` companion such as ``<name>-llm``) is part of its method's setting, not a
  setting of its own (:func:`companions`);
* ``random`` and ``pool`` at the projector at the same ratio: baselines that use no time.

A setting is named ``<method>@<where>:<ratio>`` (``pool@projector:10%``,
``prunevid@projector+L10:10%``); its record adds ``video_ratio``, ``video_budget`` and ``plan``
(every step: stage, layer, reducer, budget as given to the pipeline, parameters). ``target``
is the token count of ``ratio`` of the video (627 of 6,272), the same for every setting;
``step_budgets`` are the tokens left after each step: the frame tokens after an encoder-side
step (the video's newline, which the adapter always keeps, comes on top), the decoder's video
tokens (the newline among them) after an ``llm_layer`` step (for a step that acts only while
decoding, ``acts_at: decode`` in its plan entry, the video tokens each decoded token attends
to); ``budget`` is the last.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import tokenreduce
from tokenreduce import Pipeline, Stage, Step
from tokenreduce.budget import resolve_budget
from tokenreduce.config_format import PipelineConfig, StepConfig, pydantic_lines, read_file, read_yaml
from tokenreduce.errors import ConfigError

from .end_to_end import Setting, published_stage

#: The share of the video's tokens every setting keeps.
VIDEO_RATIO = 0.1
#: Image methods run on the whole video as baselines (no use of time).
BASELINES = ("random", "pool")
#: Where the YAML examples live (the docs show them; the row runs them).
EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples" / "reducers"
#: Decoder depth the layers of the video methods' YAML examples refer to: LLaVA-OneVision-7B
#: (Qwen2-7B, 28 layers), the model the video papers report.
EXAMPLE_DEPTH = 28
VIDEO_BUDGET = "per_video"


@dataclass(frozen=True)
class PlanStep:
    """One step of a video setting's pipeline, as given to :class:`tokenreduce.Step`."""

    stage: str
    layer: int | None
    reducer: str
    budget: int | float
    params: tuple[tuple[str, Any], ...] = ()
    #: ``"decode"`` for a step that acts only while decoding (the reducer class's ``acts_at``,
    #: e.g. DyCoke's KV pruning): it leaves the prompt's tokens alone and records nothing there.
    acts_at: str = "prefill"

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "layer": self.layer,
            "reducer": self.reducer,
            "budget": self.budget,
            "params": dict(self.params),
            "acts_at": self.acts_at,
        }


def needs_frames(cls: type) -> bool:
    """Whether a reducer class uses the temporal context (a video method)."""
    return "frames" in getattr(cls, "required_context", frozenset())


def example_steps(name: str) -> list[StepConfig] | None:
    """The steps of the reducer's YAML example (``docs/examples/reducers/<name>.yaml``), if it has one.

    Read as the format's fields only (the reducers are not built here): an example whose
    companion is not registered yet still names it, and its setting then fails with the
    registry's error instead of disappearing.
    """
    path = EXAMPLES / f"{name}.yaml"
    if not path.is_file():
        return None
    data, root = read_yaml(read_file(path), str(path))
    try:
        return PipelineConfig.model_validate(data).pipeline
    except ValidationError as err:  # as tokenreduce.load_config says it: file:line:col: field
        raise ConfigError("invalid pipeline config:\n" + "\n".join(pydantic_lines(err, str(path), root))) from None


def _video_reducers() -> list[str]:
    reg = tokenreduce.get_registry()
    return sorted(nm for nm, e in reg.reducers.items() if needs_frames(e.cls))


def companions() -> set[str]:
    """Registered reducers that a video method's YAML example runs as a later step (its
    ``llm_layer`` part): they are measured inside their method's setting."""
    out: set[str] = set()
    for name in _video_reducers():
        try:
            steps = example_steps(name) or []
        except ConfigError:  # a broken example: its method's setting reports it (setting_of)
            continue
        out |= {s.reducer for s in steps if s.reducer != name}
    return out


def video_methods() -> list[str]:
    """Every registered video method (needs ``frames``), companions left out, by name."""
    skip = companions()
    return [nm for nm in _video_reducers() if nm not in skip]


def video_only() -> set[str]:
    """Reducers the image rows leave out: the video methods and their companions (an image has no frames)."""
    return set(_video_reducers()) | companions()


def _scaled_layer(layer: int, n_layers: int) -> int:
    return max(1, min(n_layers - 1, round(layer * n_layers / EXAMPLE_DEPTH)))


def method_plan(name: str, n_layers: int, ratio: float = VIDEO_RATIO, ref_tokens: int = 6272) -> tuple[PlanStep, ...]:
    """The steps a video setting runs (see the module docstring).

    ``ref_tokens``: the video tokens an example's absolute counts were written for
    (LLaVA-OneVision, 32 x 196); it scales a later step's count when the first step is a ratio.
    """
    if name not in BASELINES:
        steps = example_steps(name)
        if steps is not None and any(s.stage is Stage.LLM_LAYER for s in steps[1:]):
            return _from_example(steps, n_layers, ratio, ref_tokens)
    cls = tokenreduce.get_registry().reducer_class(name)
    stage, layers = ("projector", ()) if name in BASELINES else published_stage(cls)
    layer = None
    if stage == Stage.LLM_LAYER.value:
        layer = max(1, min(n_layers - 1, round((layers or (2,))[0] * n_layers / 32)))
    return (PlanStep(stage, layer, name, ratio),)


def _from_example(steps: list[StepConfig], n_layers: int, ratio: float, ref_tokens: int) -> tuple[PlanStep, ...]:
    first = steps[0]
    b0 = first.budget
    # What the first step's change does to the example's kept count; later counts follow it.
    scale = ratio * ref_tokens / b0 if isinstance(b0, int) else ratio / b0
    out = [PlanStep(first.stage.value, _layer(first, n_layers), first.reducer, ratio, _params(first))]
    used: set[int] = set()
    for step in steps[1:]:
        b = step.budget
        budget = b if isinstance(b, float) else max(1, round(b * scale))
        layer = _layer(step, n_layers)
        if layer is not None:
            # Two example layers that land on one layer of a shallow decoder: the later one moves on.
            while layer in used and layer < n_layers - 1:
                layer += 1
            if layer in used:
                continue
            used.add(layer)
        out.append(PlanStep(step.stage.value, layer, step.reducer, budget, _params(step)))
    return tuple(out)


def _params(step: StepConfig) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(step.params.items()))


def _layer(step: StepConfig, n_layers: int) -> int | None:
    return None if step.layer is None else _scaled_layer(step.layer, n_layers)


@dataclass(frozen=True)
class VideoSetting(Setting):
    """A setting of the video row: ``plan`` is its pipeline (possibly several reducers),
    run under ``video_budget: per_video``; ``budgets`` are the frame tokens left after each
    step for a video of ``n`` tokens (what the records' ``step_budgets`` list)."""

    plan: tuple[PlanStep, ...] = ()
    ratio: float = VIDEO_RATIO
    #: Why the plan could not be made (a broken YAML example): the setting then fails with it.
    error: str | None = None

    @property
    def name(self) -> str:
        where = self.stage
        if self.layers:
            where = ("" if self.stage == "llm_layer" else f"{self.stage}+") + "L" + "/".join(map(str, self.layers))
        return f"{self.reducer}@{where}:{self.ratio:.0%}"

    def pipeline(self) -> Pipeline:
        if self.error is not None:
            raise ConfigError(self.error)
        steps = [
            Step(Stage(p.stage), tokenreduce.create(p.reducer, p.budget, stage=Stage(p.stage), **dict(p.params)), layer=p.layer)
            for p in self.plan
        ]
        return Pipeline(steps, video_budget=VIDEO_BUDGET)

    def image_tokens_per_layer(self, n: int, n_layers: int) -> list[int]:
        """Video tokens entering each decoder layer for ``n`` placeholders (frame tokens + the
        newline): an encoder-side step's frame tokens plus the newline, which the adapter
        keeps; an ``llm_layer`` step's budget counts the decoder's video tokens, newline included."""
        cur, at_layer = n, {}
        for p, b in zip(self.plan, self.budgets):
            if p.acts_at == "decode":
                continue  # the prompt keeps every token; only decode steps attend to fewer
            if p.layer is None:
                cur = min(cur, b + 1)
            else:
                at_layer[p.layer] = b
        out = []
        for i in range(n_layers):
            cur = min(cur, at_layer.get(i, cur))
            out.append(cur)
        return out

    def record_fields(self) -> dict[str, Any]:
        return {"video_ratio": self.ratio, "video_budget": VIDEO_BUDGET, "plan": [p.as_dict() for p in self.plan]}


def setting_of(name: str, n: int, n_layers: int, ratio: float = VIDEO_RATIO) -> VideoSetting:
    """The video setting of one method (or baseline) for a video of ``n`` frame tokens.

    A method whose YAML example cannot be read still gets its setting, which then fails with
    the example's error when it is run (the suite records it and goes on).
    """
    error = None
    try:
        plan = method_plan(name, n_layers, ratio)
    except ConfigError as err:
        error, plan = f"the YAML example of {name!r}: {err}", (PlanStep("projector", None, name, ratio),)
    reg = tokenreduce.get_registry()
    plan = tuple(
        replace(p, acts_at=getattr(reg.reducers[p.reducer].cls, "acts_at", "prefill")) if p.reducer in reg.reducers else p
        for p in plan
    )
    budgets, cur = [], n
    for i, p in enumerate(plan):
        # A companion not registered yet: the default rounding (building its step will say what is missing).
        rounding = reg.reducers[p.reducer].cls.ratio_rounding if p.reducer in reg.reducers else "half_up"
        if p.stage == Stage.LLM_LAYER.value and i > 0 and plan[i - 1].stage != Stage.LLM_LAYER.value:
            cur += 1  # in the decoder, the video's newline is one of its tokens
        cur = resolve_budget(p.budget, cur, rounding=rounding)
        budgets.append(cur)
    return VideoSetting(
        reducer=name,
        stage=plan[0].stage,
        budgets=tuple(budgets),
        layers=tuple(p.layer for p in plan if p.layer is not None),
        params=plan[0].params,
        target=resolve_budget(ratio, n),
        plan=plan,
        ratio=ratio,
        error=error,
    )


def video_settings(n: int, n_layers: int, ratio: float = VIDEO_RATIO) -> list[Setting]:
    """No reduction, every registered video method, then the baselines (the order a time
    budget measures a prefix of), for a video of ``n`` frame tokens."""
    reg = tokenreduce.get_registry()
    names = video_methods() + [b for b in BASELINES if b in reg.reducers]
    return [Setting(None)] + [setting_of(nm, n, n_layers, ratio) for nm in names]
