"""``tokenreduce run``: a pipeline on the embedded default workload, no download."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .context import ReductionContext, token_context
from .errors import ConfigError
from .metrics import reconstruction_error
from .pipeline import Pipeline, Step
from .reducer import observe
from .registry import create, get_registry
from .stages import Stage
from .workload import synthetic_tokens


@dataclass
class StageRow:
    """One line of the run table."""

    stage: str
    reducer: str
    layer: int | None
    tokens_before: int
    tokens_after: int
    milliseconds: float
    error: float | None


def pipeline_from_arg(arg: str, budget: int | float | None, stage: str | None, layer: int | None) -> Pipeline:
    """A YAML path, or a reducer name turned into a one-step pipeline."""
    if Path(arg).suffix in {".yaml", ".yml", ".json"} or Path(arg).is_file():
        return Pipeline.coerce(arg)
    cls = get_registry().reducer_class(arg)
    st = Stage(stage) if stage else next(s for s in (Stage.PROJECTOR, Stage.VISION_ENCODER, Stage.LLM_LAYER) if s in cls.stages)
    if st is Stage.LLM_LAYER and layer is None:
        layer = 2
    return Pipeline([Step(st, create(arg, 64 if budget is None else budget, stage=st), layer)])


def run_synthetic(pipeline: Pipeline, *, seed: int = 0, side: int = 24, dims: dict[Stage, int] | None = None) -> list[StageRow]:
    """Run each step on seeded synthetic patch tokens, chaining the encoder-side steps.

    Used until a model is requested: tokens of a ``side x side`` grid at the vision
    width (1024) for ``vision_encoder``, the LLM width (4096 scaled down to 256 here,
    for speed) for later stages. Steps that need context a model would supply get
    a synthetic one (CLS = mean token, attention = softmax of similarity to it).
    """
    dims = dims or {Stage.VISION_ENCODER: 256, Stage.PROJECTOR: 256, Stage.LLM_LAYER: 256}
    rows: list[StageRow] = []
    tokens = None
    for step in pipeline:
        d = dims[step.stage]
        if tokens is None or tokens.shape[-1] != d:
            tokens = synthetic_tokens(1, side, d, seed=seed)
        ctx = _synthetic_context(tokens, step)
        start = time.perf_counter()
        out = step.reducer(tokens, context=ctx)
        ms = (time.perf_counter() - start) * 1e3
        err = float(reconstruction_error(tokens, out)[0])
        rows.append(StageRow(step.stage.value, step.reducer.name, step.layer, tokens.shape[1], out.num_kept, ms, err))
        tokens = out.tokens
    return rows


def _synthetic_context(tokens: torch.Tensor, step: Step) -> ReductionContext:
    # Attention: a softmax of each token's scaled similarity to the mean token.
    sim = torch.einsum("bnd,bd->bn", tokens, tokens.mean(dim=1)) / tokens.shape[-1] ** 0.5
    side = int(tokens.shape[1] ** 0.5)
    grid = (side, side) if side * side == tokens.shape[1] else None
    return token_context(tokens, sim.softmax(dim=-1), stage=step.stage, layer=step.layer, grid=grid)


def run_model(pipeline: Pipeline, builder: Callable, *, seed: int = 0) -> tuple[str, list[StageRow]]:
    """One prefill of the embedded default model under ``pipeline``, with per-step figures.

    Token counts and times come from the adapter's records; the reconstruction error of
    each step is measured on the exact tokens the reducer saw, through :func:`observe`.
    """
    from .adapter import apply

    model, inputs = builder(seed)
    errors: dict[tuple[str, int | None], list[float]] = {}

    def measure(reducer, tokens, valid, context, out) -> None:
        key = (str(context.stage), context.layer if context.stage is Stage.LLM_LAYER else None)
        errors.setdefault(key, []).extend(reconstruction_error(tokens, out, valid).tolist())

    with torch.no_grad():
        model(**inputs)  # warm-up: first-call allocations and kernel selection are not prefill time
        start = time.perf_counter()
        model(**inputs)
        full_ms = (time.perf_counter() - start) * 1e3
        with apply(model, pipeline) as handle, observe(measure):
            start = time.perf_counter()
            model(**inputs)
            reduced_ms = (time.perf_counter() - start) * 1e3
            records = list(handle.records)
    rows = []
    for rec in records:
        key = (rec.stage.value, rec.layer)
        errs = errors.get(key, [])
        rows.append(
            StageRow(
                rec.stage.value,
                rec.reducer,
                rec.layer,
                sum(rec.tokens_before),
                sum(rec.tokens_after),
                rec.seconds * 1e3,
                sum(errs) / len(errs) if errs else None,
            )
        )
    name = type(model).__name__
    length = inputs["input_ids"].shape[1]
    title = (
        f"embedded default: tiny seeded {name}, prompt of {length} tokens; "
        f"prefill {full_ms:.1f} ms unreduced, {reduced_ms:.1f} ms reduced (CPU, untuned)"
    )
    return title, rows


def run_default(pipeline: Pipeline, *, seed: int = 0, synthetic: bool = False) -> tuple[str, list[StageRow]]:
    """Run on the embedded default model (or the synthetic workload); returns a title and rows."""
    if not len(pipeline):
        raise ConfigError("the pipeline has no steps")
    builder = None if synthetic else get_registry().pm.hook.tokenreduce_default_model()
    if builder is None:
        return "synthetic workload: 1 x 576 tokens (24 x 24 grid)", run_synthetic(pipeline, seed=seed)
    return run_model(pipeline, builder, seed=seed)
