"""``tokenreduce run``: a pipeline on the embedded default workload, no download."""

from __future__ import annotations

import math

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


#: Timed runs of ``tokenreduce run`` after a warm-up: a single CPU timing of the tiny
#: model varies by an order of magnitude (13.6 to 971.7 ms in six identical runs).
DEFAULT_REPEATS = 10


@dataclass
class StageRow:
    """One line of the run table. ``milliseconds`` is the median over the timed runs and
    ``spread`` their 10th and 90th percentiles (``None`` for a single run)."""

    stage: str
    reducer: str
    layer: int | None
    tokens_before: int
    tokens_after: int
    milliseconds: float
    error: float | None
    spread: tuple[float, float] | None = None

    @property
    def time_text(self) -> str:
        """``"median (p10-p90)"`` in ms, or the one timing."""
        return timing_text(self.milliseconds, self.spread)


def summarize(milliseconds: list[float]) -> tuple[float, tuple[float, float] | None]:
    """Median and (10th, 90th) percentiles of timings; no spread for a single one."""
    t = torch.tensor(milliseconds, dtype=torch.float64)
    if t.numel() == 1:
        return float(t[0]), None
    p10, median, p90 = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return median, (p10, p90)


def timing_text(median: float, spread: tuple[float, float] | None, digits: int = 2) -> str:
    """``"median (p10–p90)"``, or the median alone when there is no spread."""
    return f"{median:.{digits}f}" if spread is None else f"{median:.{digits}f} ({spread[0]:.{digits}f}–{spread[1]:.{digits}f})"


def pipeline_from_arg(arg: str, budget: int | float | None, stage: str | None, layer: int | None) -> Pipeline:
    """A YAML path, or a reducer name turned into a one-step pipeline."""
    if Path(arg).suffix in {".yaml", ".yml", ".json"} or Path(arg).is_file():
        return Pipeline.coerce(arg)
    cls = get_registry().reducer_class(arg)
    st = Stage(stage) if stage else next(s for s in (Stage.PROJECTOR, Stage.VISION_ENCODER, Stage.LLM_LAYER) if s in cls.stages)
    if st is Stage.LLM_LAYER and layer is None:
        layer = 2
    return Pipeline([Step(st, create(arg, 64 if budget is None else budget, stage=st), layer)])


def run_synthetic(
    pipeline: Pipeline,
    *,
    seed: int = 0,
    side: int = 24,
    dims: dict[Stage, int] | None = None,
    repeats: int = 1,
    warmup: bool = False,
) -> list[StageRow]:
    """Run each step on seeded synthetic patch tokens, chaining the encoder-side steps.

    Used until a model is requested: tokens of a ``side x side`` grid at the vision
    width (1024) for ``vision_encoder``, the LLM width (4096 scaled down to 256 here,
    for speed) for later stages. Steps that need context a model would supply get
    a synthetic one (CLS = mean token, attention = softmax of similarity to it).

    Each step runs once untimed if ``warmup``, then ``repeats`` timed times (the same
    call: reducers are deterministic); its row holds the median time and the spread.
    """
    dims = dims or {Stage.VISION_ENCODER: 256, Stage.PROJECTOR: 256, Stage.LLM_LAYER: 256}
    rows: list[StageRow] = []
    tokens = None
    for step in pipeline:
        d = dims[step.stage]
        if tokens is None or tokens.shape[-1] != d:
            tokens = synthetic_tokens(1, side, d, seed=seed)
        ctx = _synthetic_context(tokens, step)
        if warmup:
            step.reducer(tokens, context=ctx)
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            out = step.reducer(tokens, context=ctx)
            times.append((time.perf_counter() - start) * 1e3)
        ms, spread = summarize(times)
        err = float(reconstruction_error(tokens, out)[0])
        rows.append(StageRow(step.stage.value, step.reducer.name, step.layer, tokens.shape[1], out.num_kept, ms, err, spread))
        tokens = out.tokens
    return rows


def _synthetic_context(tokens: torch.Tensor, step: Step) -> ReductionContext:
    # Attention: a softmax of each token's scaled similarity to the mean token.
    sim = torch.einsum("bnd,bd->bn", tokens, tokens.mean(dim=1)) / tokens.shape[-1] ** 0.5
    n = tokens.shape[1]
    frames = None
    if "frames" in step.reducer.required_context:  # a video method: the tokens as a few equal square frames
        fits = [t for t in (8, 4, 2, 1) if n % t == 0]
        frames = next((t for t in fits if math.isqrt(n // t) ** 2 == n // t), fits[0])
    side = math.isqrt(n // (frames or 1))
    grid = (side * (frames or 1), side) if side * side * (frames or 1) == n else None
    return token_context(tokens, sim.softmax(dim=-1), stage=step.stage, layer=step.layer, grid=grid, frames=frames)


def run_model(pipeline: Pipeline, builder: Callable, *, seed: int = 0, repeats: int = DEFAULT_REPEATS) -> tuple[str, list[StageRow]]:
    """Prefills of the embedded default model under ``pipeline``, with per-step figures.

    One warm-up prefill unreduced and one reduced (first-call allocations and kernel
    selection are not prefill time; the reduced one also gives the token counts and the
    reconstruction error of each step, measured on the exact tokens the reducer saw,
    through :func:`observe`), then ``repeats`` timed prefills of each, alternating so
    that both see the same machine load. Times are medians with their 10th-90th
    percentile spread; step times come from the adapter's records.
    """
    from .adapter import apply

    model, inputs = builder(seed)
    errors: dict[tuple[str, int | None], list[float]] = {}

    def measure(reducer, tokens, valid, context, out) -> None:
        key = (str(context.stage), context.layer if context.stage is Stage.LLM_LAYER else None)
        errors.setdefault(key, []).extend(reconstruction_error(tokens, out, valid).tolist())

    def timed() -> float:
        start = time.perf_counter()
        model(**inputs)
        return (time.perf_counter() - start) * 1e3

    repeats = max(1, repeats)
    full_ms: list[float] = []
    reduced_ms: list[float] = []
    with torch.no_grad():
        model(**inputs)  # warm-up
        with apply(model, pipeline) as handle, observe(measure):
            model(**inputs)  # warm-up; its records give the counts, the observer the errors
            records = list(handle.records)
        step_ms: list[list[float]] = [[] for _ in records]
        for _ in range(repeats):
            full_ms.append(timed())
            with apply(model, pipeline) as handle:
                reduced_ms.append(timed())
                for times, rec in zip(step_ms, handle.records):
                    times.append(rec.seconds * 1e3)
    rows = []
    for rec, times in zip(records, step_ms):
        key = (rec.stage.value, rec.layer)
        errs = errors.get(key, [])
        ms, spread = summarize(times)
        rows.append(
            StageRow(
                rec.stage.value,
                rec.reducer,
                rec.layer,
                sum(rec.tokens_before),
                sum(rec.tokens_after),
                ms,
                sum(errs) / len(errs) if errs else None,
                spread,
            )
        )
    name = type(model).__name__
    length = inputs["input_ids"].shape[1]
    how = f"median (p10–p90) of {repeats} runs after a warm-up" if repeats > 1 else "one run after a warm-up"
    title = (
        f"embedded default: tiny seeded {name}, prompt of {length} tokens; prefill "
        f"{timing_text(*summarize(full_ms), digits=1)} ms unreduced, {timing_text(*summarize(reduced_ms), digits=1)} ms "
        f"reduced; times: {how} (CPU, untuned)"
    )
    return title, rows


def run_default(
    pipeline: Pipeline, *, seed: int = 0, synthetic: bool = False, repeats: int = DEFAULT_REPEATS
) -> tuple[str, list[StageRow]]:
    """Run on the embedded default model (or the synthetic workload); returns a title and rows.

    Times are the median and 10th-90th percentiles of ``repeats`` runs after a warm-up.
    """
    if not len(pipeline):
        raise ConfigError("the pipeline has no steps")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats={repeats!r}: give an int >= 1 (the number of timed runs)")
    builder = None if synthetic else get_registry().pm.hook.tokenreduce_default_model()
    if builder is None:
        how = f"median (p10–p90) of {repeats} calls after a warm-up" if repeats > 1 else "one call after a warm-up"
        title = f"synthetic workload: 1 x 576 tokens (24 x 24 grid); times: {how}"
        return title, run_synthetic(pipeline, seed=seed, repeats=repeats, warmup=True)
    return run_model(pipeline, builder, seed=seed, repeats=repeats)
