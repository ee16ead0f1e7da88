"""End to end: what each reducer buys on real model classes at 7B sizes (random weights).

For every model of :mod:`benchmarks.models`, every batch size and every setting (no
reduction; each registered reducer at its published stage and budgets 192 / 128 / 64,
scaled by the model's image-token count over 576), one run measures:

* ``ttft_ms``: time to first token = one prefill forward (vision tower, projector,
  reduction, decoder with the KV cache, LM head on the last token), timed with CUDA
  events; ``ttft`` holds its median, p10, p90 and the number of rounds;
* ``decode_tok_s``: ``batch x (new_tokens - 1)`` over the time ``generate()`` spends after
  its prefill (``generate()`` minus the median TTFT), for ``new_tokens`` greedy tokens
  (``min_new_tokens`` forces no early EOS); ``decode`` holds median, p10 and p90;
* ``peak_gib``: peak allocated GPU memory during ``generate()`` (weights included;
  ``weights_gib`` is listed per model), the largest over the rounds;
* ``kv_prefill_bytes`` / ``kv_final_bytes``: bytes of the KV cache after the prefill and
  after ``generate()``, read off the cache objects;
* ``samples``: every round's TTFT and ``generate()`` time, in round order;
* the roofline-ideal prefill (:mod:`benchmarks.roofline`) for the tokens each component
  actually processed (decoder lengths read per layer from the prefill's KV cache), and
  ``speedup`` / ``ideal_speedup`` / ``ratio`` against the unreduced run (ratios of
  medians; ``speedup_rounds``: p10 / median / p90 of the per-round ratios).

Timing is honest about warm-up and drift: the model runs one untimed ``generate()`` per
batch first (the process's first one is several times slower), every setting is warmed up
(prefill and ``generate()``) before it is timed, and the timed calls run in rounds, every
setting once per round, ``reps`` rounds (default 10), rather than all of one setting's
repetitions in a row. Every record names its execution ``path`` (``eager``: stock
transformers with the pipeline patched in).

Published forms (:data:`PUBLISHED`; layers of a 32-layer decoder, scaled to the model's
depth except FastV's and DART's K=2): FastV and DART at ``llm_layer`` K=2; PyramidDrop at
layers 8/16/24 with per-step budgets ``N r, N r^2, T`` (``r = (T/N)^(1/3)``, the published
50% per step for 576 -> 64); VisPruner and MustDrop's first step before the projector;
the multi-step methods as their papers run them: VScan ``1.5 T`` after the projector, then
``0.5 T`` from the middle decoder layer (a mean of ``T`` over the layers); SparseVLM its
official per-layer counts at layers 3/7/16; MustDrop a window merge in the encoder, then
filters at layers 3/7/11/15; every other method after the projector. A setting is labelled
with the token count its paper reports it under (``target``; the mean over the decoder
layers for VScan and SparseVLM, the tokens left at the end otherwise); ``budget`` is
always the tokens left after the last step.

A model spec with ``frames`` is the video row (:mod:`benchmarks.video`): no reduction, every
registered video method and the ``random`` / ``pool`` baselines, all keeping
``E2EConfig.video_ratio`` of the video's tokens under ``video_budget: per_video``. The image
rows leave the video methods out (an image has no frames).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

import tokenreduce
from tokenreduce import Pipeline, Stage, Step
from tokenreduce.errors import MissingContextError
from tokenreduce_plugins.adapters import compat
from tokenreduce_plugins.adapters.fast_prefill import keep_graphs

from .common import Deadline, Reporter, free_device_memory, peak_memory, summarize, sync, time_call
from .models import LLAVA, LLAVA_NEXT, QWEN, Inputs, ModelSpec, make_inputs, parameter_bytes, text_model
from .roofline import Peaks, kv_cache_bytes_analytic, prefill_components, summarize_components, token_profile

#: Budgets for 576 image tokens (LLaVA-1.5); other models scale them by N / 576.
BASE_BUDGETS = (192, 128, 64)
#: The decoder depth the published layers refer to (LLaVA-1.5-7B).
PUBLISHED_DEPTH = 32


@dataclass(frozen=True)
class Schedule:
    """Where a method's steps run and what each keeps.

    The first step runs at ``stage``; at an encoder-side ``stage`` it keeps ``budgets[0]``
    and one ``llm_layer`` step per entry of ``layers`` follows with ``budgets[1:]``; at
    ``llm_layer`` every step is a decoder layer (``budgets`` pairs with ``layers``).
    """

    stage: str
    layers: tuple[int, ...] = ()
    budgets: tuple[int, ...] = ()


def _scaled_layers(layers: tuple[int, ...], n_layers: int) -> list[int]:
    """Published layers of a 32-layer decoder at the same relative depth of ``n_layers`` (1 .. n_layers - 1)."""
    return [max(1, min(n_layers - 1, round(k * n_layers / PUBLISHED_DEPTH))) for k in layers]


def _pdrop(n: int, n_layers: int, t: int) -> Schedule:
    layers = _scaled_layers((8, 16, 24), n_layers)
    k = len(set(layers))
    r = (t / n) ** (1 / k)
    budgets = [max(t, round(n * r ** (i + 1))) for i in range(k - 1)] + [t]
    return Schedule("llm_layer", tuple(sorted(set(layers))), tuple(budgets))


def _vscan(n: int, n_layers: int, t: int) -> Schedule:
    # Published (README, scripts/llava1_5): 96 after the projector, 32 from layer 16 of 32,
    # "an average of 64"; Qwen2.5-VL: 1/6 of the tokens, then 1/3 of those from layer 14 of
    # 28: the same 1.5 T then 0.5 T from the middle layer.
    from tokenreduce_plugins.vscan import PUBLISHED_ENCODER_BUDGET, PUBLISHED_LLM_BUDGET, PUBLISHED_LLM_LAYER

    k = PUBLISHED_LLM_LAYER
    mean = (PUBLISHED_ENCODER_BUDGET * k + PUBLISHED_LLM_BUDGET * (PUBLISHED_DEPTH - k)) / PUBLISHED_DEPTH
    budgets = (round(t * PUBLISHED_ENCODER_BUDGET / mean), round(t * PUBLISHED_LLM_BUDGET / mean))
    return Schedule("projector", tuple(_scaled_layers((k,), n_layers)), budgets)


def _sparsevlm(n: int, n_layers: int, t: int) -> Schedule:
    # The official per-layer selected counts (score.py) of the setting nearest T (at 576
    # image tokens, scaled to N), plus the recycled clusters each step adds (SparseVLM's own
    # arithmetic): "64" = 576 -> 82 -> 32 -> 18 at layers 3/7/16.
    from tokenreduce_plugins.sparsevlm import PUBLISHED_LAYERS, PUBLISHED_SELECTED, step_budgets

    at576 = t * 576 / n
    key = min(PUBLISHED_SELECTED, key=lambda r: abs(math.log(r / at576)))
    selected = [max(1, round(s * n / 576)) for s in PUBLISHED_SELECTED[key]]
    return Schedule("llm_layer", tuple(_scaled_layers(PUBLISHED_LAYERS, n_layers)), step_budgets(selected, n))


def _mustdrop(n: int, n_layers: int, t: int) -> Schedule:
    # The documented example (docs/examples/reducers/mustdrop.yaml): 3x3 window merging to
    # 432 of 576, then filters after layers 2/6/10/14 down to 192/128/96/64, scaled to T.
    # (The official code sets thresholds, so its counts vary per image.)
    from tokenreduce_plugins.mustdrop import EXAMPLE_ENCODER_BUDGET, EXAMPLE_LLM_BUDGETS, OFFICIAL_PRUNING_LAYERS

    layers = _scaled_layers(tuple(k + 1 for k in OFFICIAL_PRUNING_LAYERS), n_layers)
    scale = t / EXAMPLE_LLM_BUDGETS[-1]
    budgets = (round(EXAMPLE_ENCODER_BUDGET * n / 576), *(round(b * scale) for b in EXAMPLE_LLM_BUDGETS))
    return Schedule("vision_encoder", tuple(layers), budgets)


#: Each method's published form, where it is not one step after the projector: a fixed
#: schedule ``(stage, layers of a 32-layer decoder, used as they are)``, or a function of
#: ``(N image tokens, decoder depth, target T)``.
PUBLISHED: dict[str, tuple[str, tuple[int, ...]] | Callable[[int, int, int], Schedule]] = {
    "fastv": ("llm_layer", (2,)),
    "dart": ("llm_layer", (2,)),
    "vispruner": ("vision_encoder", ()),  # official: selects on the vision features, before the projector
    "pdrop": _pdrop,
    "vscan": _vscan,
    "sparsevlm": _sparsevlm,
    "mustdrop": _mustdrop,
}
#: Model-specific variants of a method: only the one matching the model family runs.
VARIANTS = {"apet": {LLAVA: "apet-llava", LLAVA_NEXT: "apet-llava", QWEN: "apet-qwen"}}
#: Documented alternative parameters, used when an adapter cannot supply the context of a
#: method's published configuration (DART's key-norm pivots need the decoder keys).
FALLBACK_PARAMS: dict[str, dict[str, Any]] = {"dart": {"pivot_by": "token_norm"}}


@dataclass(frozen=True)
class Setting:
    """One reduction configuration (``reducer=None``: no reduction).

    Steps as in :class:`Schedule`: ``budgets`` has one entry per step: the encoder-side
    step's first (``stage`` ``vision_encoder`` / ``projector``), then one per decoder layer
    of ``layers``. ``target`` is the token count the setting is labelled with (default:
    the last step's budget).
    """

    reducer: str | None
    stage: str | None = None
    budgets: tuple[int, ...] = ()
    layers: tuple[int, ...] = ()
    params: tuple[tuple[str, Any], ...] = ()
    target: int | None = None

    @property
    def budget(self) -> int | None:
        """Image tokens kept at the end."""
        return self.budgets[-1] if self.budgets else None

    @property
    def label(self) -> int | None:
        """The token count the method's paper reports this setting under."""
        return self.budget if self.target is None else self.target

    @property
    def name(self) -> str:
        if self.reducer is None:
            return "none"
        where = self.stage
        if self.layers:
            where = ("" if self.stage == "llm_layer" else f"{self.stage}+") + "L" + "/".join(map(str, self.layers))
        params = "[" + ",".join(f"{k}={v}" for k, v in self.params) + "]" if self.params else ""
        return f"{self.reducer}{params}@{where}:{self.label}"

    def steps(self) -> list[tuple[str, int | None, int]]:
        """``(stage, decoder layer or None, budget)`` of each step, in order."""
        if self.reducer is None:
            return []
        if self.stage == Stage.LLM_LAYER.value:
            return [(self.stage, k, b) for k, b in zip(self.layers, self.budgets)]
        first = [(self.stage, None, self.budgets[0])]
        return first + [(Stage.LLM_LAYER.value, k, b) for k, b in zip(self.layers, self.budgets[1:])]

    def pipeline(self) -> Pipeline | None:
        if self.reducer is None:
            return None
        kw = dict(self.params)
        return Pipeline(
            [Step(Stage(st), tokenreduce.create(self.reducer, b, stage=Stage(st), **kw), layer=k) for st, k, b in self.steps()]
        )

    def record_fields(self) -> dict[str, Any]:
        """What a record adds about the setting beyond :func:`_base` (the video row's plan)."""
        return {}

    def image_tokens_per_layer(self, n: int, n_layers: int) -> list[int]:
        """Image tokens entering each decoder layer (analytic; the run measures them too)."""
        cur, at_layer = n, {}
        for _, k, b in self.steps():
            if k is None:
                cur = min(cur, b)
            else:
                at_layer[k] = b
        out = []
        for i in range(n_layers):
            cur = min(cur, at_layer.get(i, cur))
            out.append(cur)
        return out


def published_schedule(cls: type, n: int, n_layers: int, t: int) -> Schedule:
    """A method's steps for ``n`` image tokens, an ``n_layers`` decoder and target ``t``.

    Layers beyond the decoder are left out; two steps that land on one layer (a shallow
    decoder) keep the later budget; every budget is at most the tokens the step receives.
    """
    form = PUBLISHED.get(cls.name)
    if callable(form):
        sched = form(n, n_layers, t)
    else:
        stage, layers = form if form is not None else published_stage(cls)
        sched = Schedule(stage, layers, (t,) * (len(layers) if stage == Stage.LLM_LAYER.value else 1 + len(layers)))
    first = [] if sched.stage == Stage.LLM_LAYER.value else [sched.budgets[0]]
    per_layer: dict[int, int] = {}
    for k, b in zip(sched.layers, sched.budgets[len(first) :]):
        if 0 < k < n_layers:
            per_layer[k] = b
    layers = tuple(sorted(per_layer))
    budgets, cur = [], n
    for b in first + [per_layer[k] for k in layers]:
        cur = max(1, min(cur, b))
        budgets.append(cur)
    return Schedule(sched.stage, layers, tuple(budgets))


def published_stage(cls: type) -> tuple[str, tuple[int, ...]]:
    """Where a method's (first) step runs in the benchmark, and the decoder layers of its
    ``llm_layer`` steps (for a 32-layer decoder): its published form, else the first
    supported encoder-side stage."""
    form = PUBLISHED.get(cls.name)
    if callable(form):
        sched = form(576, PUBLISHED_DEPTH, 64)
        return sched.stage, sched.layers
    if form is not None:
        return form
    for st in (Stage.PROJECTOR, Stage.VISION_ENCODER):
        if st in cls.stages:
            return st.value, ()
    return Stage.LLM_LAYER.value, (2,)


def scaled_budgets(n: int, base: tuple[int, ...] = BASE_BUDGETS) -> list[int]:
    return [max(1, round(b * n / 576)) for b in base]


def settings_for(family: str, n: int, n_layers: int, budgets: list[int]) -> list[Setting]:
    """Every registered reducer (the family's variant of a method) at each budget, in priority order.

    Order (a run under a time budget measures a prefix): no reduction; ApET at every
    budget; every other method at the smallest budget; the other budgets. The video
    methods (and their companions) are left out: they run in the video row.
    """
    from .video import video_only

    reg = tokenreduce.get_registry()
    skip = {v for fam in VARIANTS.values() for v in fam.values()} | set(VARIANTS) | video_only()
    first = []
    for base, by_family in VARIANTS.items():
        variant = by_family.get(family)
        first.append(variant if variant in reg.reducers else base)
    rest = [nm for nm in sorted(reg.reducers) if nm not in skip]
    per_method: dict[str, list[Setting]] = {}
    for nm in first + rest:
        if nm not in reg.reducers:
            continue
        cls = reg.reducers[nm].cls
        per_method[nm] = []
        for t in sorted(budgets):
            sched = published_schedule(cls, n, n_layers, t)
            if not sched.budgets:  # every step's layer is beyond this decoder
                continue
            per_method[nm].append(Setting(nm, sched.stage, sched.budgets, sched.layers, target=t))
    per_method = {nm: s for nm, s in per_method.items() if s}
    out = [Setting(None)]
    out += [s for nm in first if nm in per_method for s in per_method[nm]]
    others = [nm for nm in rest if nm in per_method]
    out += [per_method[nm][0] for nm in others]
    out += [s for nm in others for s in per_method[nm][1:]]
    return out


# -- measuring -----------------------------------------------------------------------------


def cache_nbytes(cache: Any) -> int | None:
    """Bytes held by a KV cache object (``DynamicCache`` layers, legacy lists or tuples)."""
    if cache is None:
        return None
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    if hasattr(cache, "key_cache"):
        return sum(
            t.numel() * t.element_size() for t in [*cache.key_cache, *cache.value_cache] if isinstance(t, torch.Tensor)
        )
    stack = [cache]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def cache_lengths(cache: Any) -> list[int] | None:
    """Sequence length held by each layer of a KV cache (tokens that entered that layer)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    out = []
    for layer in layers:
        k = getattr(layer, "keys", None)
        if not isinstance(k, torch.Tensor) or k.dim() < 3:
            return None
        out.append(int(k.shape[-2]))
    return out


#: Prefix of the profiler ranges put around each reducer call of a profiled run.
REDUCER_RANGE = "tokenreduce."


def _attr(evt: Any, *names: str) -> float:
    for n in names:  # newer torch says "device", older "cuda"
        v = getattr(evt, n, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_prefill(fn: Callable[[], Any], device: str, top: int = 12) -> dict[str, Any]:
    """One profiled call: the top operators by self device time (host time without a GPU),
    and the total time inside ``tokenreduce.<reducer>`` ranges (the reducers' own cost in the model).
    """
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    rows, reducers = [], {}
    for evt in prof.key_averages():
        if evt.key.startswith(REDUCER_RANGE):
            reducers[evt.key[len(REDUCER_RANGE) :]] = {
                "calls": evt.count,
                "device_ms": _attr(evt, "device_time_total", "cuda_time_total") / 1e3,
                "cpu_ms": evt.cpu_time_total / 1e3,
            }
            continue
        rows.append(
            {
                "op": evt.key,
                "calls": evt.count,
                "self_device_ms": _attr(evt, "self_device_time_total", "self_cuda_time_total") / 1e3,
                "self_cpu_ms": evt.self_cpu_time_total / 1e3,
            }
        )
    key = "self_device_ms" if device.startswith("cuda") else "self_cpu_ms"
    rows.sort(key=lambda r: -r[key])
    return {
        "sort_key": key,
        "total_device_ms": sum(r["self_device_ms"] for r in rows),
        "total_cpu_ms": sum(r["self_cpu_ms"] for r in rows),
        "reducers": reducers,
        "top": rows[:top],
    }


@contextmanager
def reducer_ranges(pipeline: Pipeline | None) -> Iterator[None]:
    """Wrap each step's ``reduce`` in a profiler range named ``tokenreduce.<reducer>`` (for one profiled call)."""
    patched = []
    for step in pipeline or []:
        red = step.reducer
        orig = red.reduce

        def wrapped(*args: Any, _orig: Callable = orig, _name: str = red.name, **kwargs: Any) -> Any:
            with torch.profiler.record_function(REDUCER_RANGE + _name):
                return _orig(*args, **kwargs)

        red.reduce = wrapped  # type: ignore[method-assign]
        patched.append(red)
    try:
        yield
    finally:
        for red in patched:
            del red.reduce  # back to the class method


#: Execution paths a record can measure. ``eager``: stock transformers with the pipeline
#: patched in. ``fast``: the same pipeline with ``fast=True`` (tokenreduce's fast path, see
#: the docs' Speed page); its TTFT is a one-token ``generate()``, where the fast prefill runs
#: (the eager TTFT is a plain forward, which has no ``generate()`` overhead: the comparison
#: errs against the fast path), and its unreduced setting is the identity pipeline.
PATHS = ("eager", "fast")


@dataclass
class E2EConfig:
    """Knobs of the end-to-end suite."""

    batches: tuple[int, ...] = (1, 8)
    base_budgets: tuple[int, ...] = BASE_BUDGETS
    new_tokens: int = 64
    #: Timed rounds: each round measures every setting once (one prefill, one ``generate()``).
    reps: int = 10
    #: Untimed prefill + ``generate()`` calls of each setting before the rounds.
    warmup: int = 1
    #: Settings profiled once (largest batch, first model): where the prefill time goes.
    profile: tuple[str, ...] = ("none", "apet")
    reducers: tuple[str, ...] | None = None  # restrict to these reducer names (None = all)
    #: Execution paths measured, every setting on each, interleaved in the same rounds.
    paths: tuple[str, ...] = ("eager",)
    #: The video row: every setting keeps this share of the video's tokens (per video).
    video_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.reps < 1:
            raise ValueError(f"reps must be >= 1 (timed rounds), got {self.reps}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (a cold generate() is 3-6x slower), got {self.warmup}")
        bad = [p for p in self.paths if p not in PATHS]
        if bad or not self.paths:
            raise ValueError(f"paths must be among {', '.join(PATHS)}, got {list(self.paths)!r}")
        if not 0.0 < self.video_ratio <= 1.0:
            raise ValueError(f"video_ratio must be in (0, 1] (share of the video's tokens kept), got {self.video_ratio}")


@dataclass
class _Unit:
    """One setting at one batch size, admitted to the timed rounds."""

    setting: Setting
    inputs: Inputs
    rec: dict[str, Any]
    round_s: float  # wall time of one warm untimed prefill + generate(): the cost of a round
    path: str = "eager"
    ttft_ms: list[float] = dataclasses.field(default_factory=list)
    ttft_wall_ms: list[float] = dataclasses.field(default_factory=list)  # host clock, synced both ends
    generate_ms: list[float] = dataclasses.field(default_factory=list)
    peak_gib: list[float] = dataclasses.field(default_factory=list)


def run_model(
    model: torch.nn.Module,
    spec: ModelSpec,
    *,
    device: str,
    dtype: torch.dtype,
    peaks: Peaks,
    cfg: E2EConfig,
    deadline: Deadline,
    reporter: Reporter,
    profile_target: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    previous: dict[tuple[str, int, str], dict[str, Any]] | None = None,
    trace: list[tuple[Any, ...]] | None = None,
) -> list[dict[str, Any]]:
    """Every setting x batch on one built model; returns one record per run (errors and skips included).

    Two phases. **Warm-up**, in priority order: each setting is applied, run untimed
    (``cfg.warmup`` prefills and ``generate()`` calls, after one model-wide warm-up so that
    no setting pays the process's first ``generate()``), measured once for what does not
    vary (tokens per layer, KV bytes, stage records, the optional profile), and admitted to
    the rounds if its rounds still fit in ``deadline`` (else it and every later setting are
    recorded as skipped). **Rounds**: ``cfg.reps`` times, every admitted setting in turn
    (rotated by one each round) times one prefill (TTFT) and one ``generate()``; a round
    not started before the deadline is dropped (records say how many ran). Interleaving
    spreads clock and thermal drift over all settings alike, and pairs each reduced
    setting's round with the unreduced one for the speed-up's spread.

    ``on_result`` gets a record whenever it changes (after the warm-up, after every round):
    callers replace by ``(record["requested"] or record["setting"], record["batch"], record["path"])``.
    Every setting runs on each of ``cfg.paths``, as its own unit of the rounds.
    ``previous`` maps ``(setting name, batch, path)`` to records of an earlier run on the same
    kind of device (``--resume``): those are kept instead of measured again. ``trace``, when
    given, receives ``(phase, setting name, batch, round)`` for every call, in order.
    """
    previous = previous or {}
    emit = on_result or (lambda rec: None)
    config = model.config
    n_layers = config.text_config.num_hidden_layers
    probe = make_inputs(spec, config, batch=1, device="cpu", dtype=torch.float32)
    if spec.video:
        from .video import video_settings

        settings = video_settings(probe.extra["video_tokens"], n_layers, cfg.video_ratio)
        budgets = [s.label for s in settings if s.reducer is not None][:1]
    else:
        n = probe.image_tokens
        budgets = scaled_budgets(n, cfg.base_budgets)
        settings = settings_for(spec.family, n, n_layers, budgets)
    if cfg.reducers is not None:
        settings = [
            s
            for s in settings
            if s.reducer is None or s.reducer in cfg.reducers or s.reducer.split("-")[0] in cfg.reducers
        ]
    per_unit = 1 + cfg.reps
    task = reporter.task(f"e2e {spec.key}", total=len(settings) * len(cfg.paths) * len(cfg.batches) * per_unit)
    inputs = {b: make_inputs(spec, config, batch=b, device=device, dtype=dtype) for b in cfg.batches}
    if not all((s.name, b, p) in previous for s in settings for b in cfg.batches for p in cfg.paths):
        _model_warmup(model, inputs, cfg, trace)

    results: list[dict[str, Any]] = []
    units: list[_Unit] = []
    committed_s = 0.0  # estimated wall time of the admitted units' rounds
    closed = False  # once one setting does not fit, later ones are skipped too (a prefix is measured)
    # The fast path's graphs depend on the model and shapes only: kept across the settings'
    # patches (each round applies every setting anew) and released after the rounds.
    with keep_graphs(model) if "fast" in cfg.paths else nullcontext():
        for setting in settings:
            for path in cfg.paths:
                for b in cfg.batches:
                    unit = None
                    if (setting.name, b, path) in previous:
                        rec = {**previous[(setting.name, b, path)], "resumed": True}
                    elif closed or deadline.expired():
                        rec = {**_skipped(spec, b, setting), "path": path}
                    else:
                        want_profile = (
                            profile_target and path == "eager" and b == max(cfg.batches)
                            and _wants_profile(setting, cfg, budgets)
                        )
                        rec, unit = _prepare_with_fallback(
                            model, spec, inputs[b], setting, device, cfg, peaks, want_profile, trace, path
                        )
                        if unit is not None and deadline.remaining() < (committed_s + unit.round_s) * cfg.reps:
                            closed, unit = True, None
                            rec = {
                                **_skipped(spec, b, setting),
                                "path": path,
                                **{k: rec[k] for k in ("requested", "fallback_from") if k in rec},
                            }
                    results.append(rec)
                    what = f"B={b} {rec['setting']}" + ("" if path == "eager" else f" ({path})")
                    if unit is not None:
                        units.append(unit)
                        committed_s += unit.round_s
                        reporter.advance(task, item=f"{what}: warmed up")
                    else:
                        reporter.advance(task, item=f"{what}: {_short(rec)}", steps=per_unit)
                    emit(rec)
        _rounds(model, units, device, cfg, deadline, reporter, task, spec, trace, emit)
    return results


def _rounds(model, units, device, cfg: E2EConfig, deadline, reporter, task, spec, trace, emit) -> None:
    """The timed rounds: every admitted unit once per round, the start rotated by one each round."""
    for r in range(cfg.reps):
        if r > 0 and deadline.expired():
            reporter.log(f"e2e {spec.key}: time budget used up after {r} of {cfg.reps} rounds")
            break
        start = r % len(units) if units else 0
        for unit in units[start:] + units[:start]:
            if unit.rec["status"] not in ("pending", "ok"):
                continue  # failed in an earlier round
            _sample(model, unit, device, cfg, trace, r)
            reporter.advance(task, item=f"B={unit.inputs.batch} {unit.setting.name} ({unit.path}): round {r + 1}")
        _finish_round(units, cfg)
        for unit in units:
            emit(unit.rec)


def _skipped(spec: ModelSpec, batch: int, setting: Setting) -> dict[str, Any]:
    return {**_base(spec, batch, setting), "status": "skipped", "error": "time budget of the suite used up"}


def _model_warmup(model, inputs: dict[int, Inputs], cfg: E2EConfig, trace) -> None:
    """One unreduced prefill and ``generate()`` per batch size, untimed: the process's first
    ``generate()`` is several times slower than later ones, and no setting should pay it."""
    with torch.inference_mode():
        for b, inp in inputs.items():
            model(**inp.kwargs, use_cache=True, logits_to_keep=1)
            _generate(model, inp, cfg)
            if trace is not None:
                trace.append(("model-warmup", None, b, None))


def _generate(model, inputs: Inputs, cfg: E2EConfig, path: str = "eager", new_tokens: int | None = None) -> Any:
    """Greedy ``generate()`` of exactly ``new_tokens`` (default ``cfg.new_tokens``); the result has
    ``sequences`` and, on the eager path, the cache (the fast path returns a tensor, and keeps its
    static cache itself)."""
    pad = model.config.text_config.pad_token_id
    new = cfg.new_tokens if new_tokens is None else new_tokens
    kw = dict(
        **inputs.kwargs,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=pad if pad is not None else 0,
    )
    if path == "fast":
        out = model.generate(**kw)
        return SimpleNamespace(sequences=out, cache=None)
    return model.generate(**kw, return_dict_in_generate=True)


def _wants_profile(setting: Setting, cfg: E2EConfig, budgets: list[int]) -> bool:
    if setting.reducer is None:
        return "none" in cfg.profile
    return any(setting.reducer.split("-")[0] == p for p in cfg.profile) and setting.label == min(budgets)


def _base(spec: ModelSpec, batch: int, s: Setting) -> dict[str, Any]:
    return {
        **s.record_fields(),
        "model": spec.key,
        "batch": batch,
        "setting": s.name,
        "reducer": s.reducer,
        "stage": s.stage,
        "budget": s.budget,
        "target": s.label,
        "step_budgets": list(s.budgets),
        "layers": list(s.layers),
        "params": dict(s.params),
    }


def _prepare_with_fallback(
    model, spec, inputs, setting: Setting, device, cfg, peaks, want_profile, trace, path: str = "eager"
) -> tuple[dict[str, Any], _Unit | None]:
    """Warm a setting up; if the adapter cannot supply its context, use the method's documented fallback."""
    rec, unit = _prepare(model, spec, inputs, setting, device, cfg, peaks, want_profile, trace, path)
    alt = FALLBACK_PARAMS.get(setting.reducer or "")
    if rec["status"] == "unsupported" and alt and not setting.params:
        first, requested = rec["error"], rec["setting"]
        setting = dataclasses.replace(setting, params=tuple(sorted(alt.items())))
        rec, unit = _prepare(model, spec, inputs, setting, device, cfg, peaks, want_profile, trace, path)
        rec["fallback_from"] = first
        rec["requested"] = requested
    return rec, unit


def _short(rec: dict[str, Any]) -> str:
    if rec["status"] != "ok":
        return rec["status"]
    return f"{rec['ttft_ms']:.1f} ms"


@contextmanager
def _path_context(model, setting: Setting, path: str) -> Iterator[Any]:
    """The model as the record's ``path`` runs it, with the setting's pipeline applied (handle or None)."""
    pipeline = setting.pipeline()
    if path == "fast":  # unreduced: the identity pipeline, which takes the fast path as well
        identity = Pipeline([Step(Stage.PROJECTOR, tokenreduce.create("pool", 1.0, stage=Stage.PROJECTOR))])
        pipeline = dataclasses.replace(pipeline or identity, fast=True)
    ctx = tokenreduce.apply(model, pipeline) if pipeline is not None else nullcontext()
    with torch.inference_mode(), ctx as handle:
        yield handle


def _guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn``; an error becomes a record status (a failing reducer/adapter never stops the suite)."""
    oom = False
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as err:
        oom = True
        return {"status": "oom", "error": str(err).splitlines()[0]}
    except Exception as err:
        tb = traceback.extract_tb(err.__traceback__)
        where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
        # A model that cannot supply a method's context (no [CLS] in Qwen's tower) is not a failure.
        status = "unsupported" if isinstance(err, MissingContextError) else "error"
        return {"status": status, "error": f"{type(err).__name__}: {err}{where}"}
    finally:
        free_device_memory(collect=oom)  # after an OOM, the failed call's tensors may sit in reference cycles


def _prepare(
    model, spec, inputs: Inputs, setting: Setting, device, cfg: E2EConfig, peaks: Peaks, want_profile: bool, trace,
    path: str = "eager",
) -> tuple[dict[str, Any], _Unit | None]:
    box: dict[str, float] = {}

    def go() -> dict[str, Any]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _path_context(model, setting, path) as handle:
                rec = _warm_and_measure(
                    model, spec, inputs, setting, handle, device, cfg, peaks, want_profile, box, trace, path
                )
        # What ran eagerly on the fast path, and why (the adapters' one-line warnings).
        eager = sorted({str(w.message) for w in caught if "fast path" in str(w.message)})
        return {**rec, **({"fast_path_notes": eager} if eager else {})}

    rec = {**_base(spec, inputs.batch, setting), "path": path, **_guarded(go)}
    if rec["status"] != "ok":
        return rec, None
    rec["status"] = "pending"  # warmed up; "ok" once a round has timed it
    return rec, _Unit(setting, inputs, rec, box["round_s"], path)


def _warm_and_measure(
    model,
    spec,
    inputs: Inputs,
    setting: Setting,
    handle,
    device,
    cfg: E2EConfig,
    peaks: Peaks,
    want_profile: bool,
    box: dict[str, float],
    trace,
    path: str = "eager",
) -> dict[str, Any]:
    """The untimed warm-up of a setting and everything about it that does not vary between calls."""
    kw = inputs.kwargs
    b = inputs.batch
    prefill = _ttft_call(model, inputs, cfg, path)
    # A forward's cache tells how many tokens each decoder layer processed (the same on both paths).
    out = model(**kw, use_cache=True, logits_to_keep=1)
    lengths = cache_lengths(compat.output_cache(out))
    kv_prefill = cache_nbytes(compat.output_cache(out))
    records = [_record_dict(r) for r in (handle.records if handle is not None else [])]
    del out
    kv_final = new = None
    for _ in range(cfg.warmup):
        sync(device)
        t0 = time.perf_counter()
        prefill()
        gen = _generate(model, inputs, cfg, path)
        sync(device)
        box["round_s"] = time.perf_counter() - t0
        new = int(gen.sequences.shape[1] - kw["input_ids"].shape[1])
        kv_final = cache_nbytes(compat.output_cache(gen)) if path == "eager" else None
        del gen
        if trace is not None:
            trace.append(("warmup", setting.name, b, None))
    prof = None
    if want_profile:
        with reducer_ranges(handle.adapter.pipeline if handle is not None else None):
            prof = profile_prefill(prefill, device)

    n_layers = model.config.text_config.num_hidden_layers
    text = inputs.prompt_len - inputs.image_tokens
    per_layer = [max(0, length - text) for length in lengths] if lengths and len(lengths) == n_layers else None
    if per_layer is None:
        per_layer = setting.image_tokens_per_layer(inputs.image_tokens, n_layers)
    # A video's projector runs on every frame before pooling, whatever the steps (the adapter keeps the stock order).
    proj = None if setting.stage != "vision_encoder" or spec.video else setting.budgets[0]
    profile = token_profile(
        spec, model.config, image_tokens=inputs.image_tokens, prompt_len=inputs.prompt_len, per_layer=per_layer
    )
    if proj is not None:
        profile.projector_tokens = min(profile.projector_tokens, proj * max(1, profile.vision_sequences))
    roof = summarize_components(prefill_components(model, spec, profile, b), peaks)
    rec: dict[str, Any] = {
        "status": "ok",
        "path": path,
        **({k: inputs.extra[k] for k in ("frames", "frame_tokens", "video_tokens")} if spec.video else {}),
        "image_tokens": inputs.image_tokens,
        "prompt_len": inputs.prompt_len,
        "image_tokens_per_layer": per_layer,
        # Timings (ttft_ms, ttft, generate_ms, generate, decode_tok_s, decode, peak_gib,
        # samples, rounds) are filled in by the rounds.
        "ttft_ms": None,
        "decode_tok_s": None,
        "peak_gib": None,
        "warmup": cfg.warmup,
        "rounds": 0,
        "new_tokens": new,
        "kv_prefill_bytes": kv_prefill,
        "kv_prefill_bytes_analytic": kv_cache_bytes_analytic(model, profile, b),
        "kv_final_bytes": kv_final,
        "roofline": roof,
        "ideal_ms": roof["ideal_ms"],
        "stage_records": records,
    }
    if prof is not None:
        rec["profile"] = prof
    return rec


def _fast_shapes(handle: Any) -> list[list[int]]:
    """The fast path's captured prefill shapes, ``[batch, bucket length, cache length]`` each (empty: none)."""
    fast = getattr(getattr(handle, "adapter", None), "fast", None)
    return [list(key[:3]) for key in fast.entries] if fast is not None else []


def _ttft_call(model, inputs: Inputs, cfg: E2EConfig, path: str) -> Callable[[], Any]:
    """Time to first token: a prefill forward (eager), or a one-token ``generate()`` (fast)."""
    if path == "fast":
        return lambda: _generate(model, inputs, cfg, path, new_tokens=1)
    return lambda: model(**inputs.kwargs, use_cache=True, logits_to_keep=1)


def _sample(model, unit: _Unit, device: str, cfg: E2EConfig, trace, rnd: int) -> None:
    """One round of one unit: a timed prefill (TTFT), then a timed ``generate()`` with its peak memory."""

    def go() -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once, at the warm-up (the record's fast_path_notes)
            with _path_context(model, unit.setting, unit.path) as handle:
                sync(device)
                t0 = time.perf_counter()
                (ttft,) = time_call(_ttft_call(model, unit.inputs, cfg, unit.path), device, reps=1, warmup=0)
                wall = (time.perf_counter() - t0) * 1e3  # time_call syncs at its end: a check on the events
                shapes = _fast_shapes(handle)
                with peak_memory(device) as mem:
                    sync(device)
                    t0 = time.perf_counter()
                    gen = _generate(model, unit.inputs, cfg, unit.path)
                    sync(device)
                    gen_ms = (time.perf_counter() - t0) * 1e3
                del gen
        unit.ttft_ms.append(ttft)
        unit.ttft_wall_ms.append(wall)
        if shapes:
            unit.rec["fast_shapes"] = shapes
        unit.generate_ms.append(gen_ms)
        if mem["peak_gib"] is not None:
            unit.peak_gib.append(mem["peak_gib"])
        return {"status": "ok"}

    got = _guarded(go)
    if trace is not None:
        trace.append(("round", unit.setting.name, unit.inputs.batch, rnd))
    if got["status"] != "ok":  # a setting that fails mid-way is reported, not half-measured
        unit.rec.update(got, error=f"round {rnd + 1}: {got['error']}")
        for k in ("ttft_ms", "decode_tok_s", "peak_gib"):
            unit.rec[k] = None


def percentiles(xs: list[float]) -> tuple[float, float, float]:
    """``(p10, median, p90)`` (inclusive deciles; one sample is its own spread)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    qs = statistics.quantiles(xs, n=10, method="inclusive")
    return qs[0], statistics.median(xs), qs[-1]


def _finish_round(units: list[_Unit], cfg: E2EConfig) -> None:
    """Fill every unit's timing fields from its samples so far, then the speed-ups against the
    unreduced setting of the same batch (per round: the two were timed moments apart)."""
    for u in units:
        if u.rec["status"] not in ("pending", "ok") or not u.ttft_ms:
            continue
        b, new = u.inputs.batch, u.rec["new_tokens"]
        ttft = summarize(u.ttft_ms)
        gen = summarize(u.generate_ms)
        # Decode = generate() minus its prefill; the prefill's median is the steadier estimate.
        # A round where generate() took no longer than that (tiny CPU models) has no decode
        # time: it is left out, and decode["reps"] counts the rounds used.
        tok_s = [b * (new - 1) / ((g - ttft["median_ms"]) / 1e3) for g in u.generate_ms if g > ttft["median_ms"]]
        decode = None
        if new > 1 and tok_s:
            p10, med, p90 = percentiles(tok_s)
            decode = {"median_tok_s": med, "p10_tok_s": p10, "p90_tok_s": p90, "reps": len(tok_s)}
        u.rec.update(
            ttft_ms=ttft["median_ms"],
            ttft=ttft,
            generate_ms=gen["median_ms"],
            generate=gen,
            decode_tok_s=decode["median_tok_s"] if decode else None,
            decode=decode,
            peak_gib=max(u.peak_gib) if u.peak_gib else None,
            rounds=len(u.ttft_ms),
            samples={"ttft_ms": list(u.ttft_ms), "ttft_wall_ms": list(u.ttft_wall_ms), "generate_ms": list(u.generate_ms)},
            ttft_wall=summarize(u.ttft_wall_ms) if u.ttft_wall_ms else None,
            status="ok",
        )
    # Speed-ups are against the unreduced setting of the same path; a path other than
    # eager also gets ``speedup_vs_eager`` (against stock transformers, the same run).
    base = {(u.rec["path"], u.inputs.batch): u for u in units if u.setting.reducer is None and u.rec["status"] == "ok"}
    for u in units:
        ref = base.get((u.rec["path"], u.inputs.batch))
        eager = base.get(("eager", u.inputs.batch))
        if u.rec["status"] == "ok" and eager is not None and eager is not ref:
            u.rec["speedup_vs_eager"] = eager.rec["ttft_ms"] / u.rec["ttft_ms"]
        if u.rec["status"] == "ok" and u.ttft_ms and ref is not None:
            _relative(u.rec, ref.rec)
            pairs = [r / x for r, x in zip(ref.ttft_ms, u.ttft_ms)]
            if pairs:
                p10, med, p90 = percentiles(pairs)
                u.rec["speedup_rounds"] = {"median": med, "p10": p10, "p90": p90, "reps": len(pairs)}


def _record_dict(r: Any) -> dict[str, Any]:
    """A StageRecord without its tensors (``asdict`` would deep-copy them)."""
    d = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in ("indices", "info")}
    d["stage"] = getattr(r.stage, "value", r.stage)
    return d


def _relative(rec: dict[str, Any], base: dict[str, Any] | None) -> None:
    """Speed-ups against the unreduced run of the same model and batch (ratios of medians)."""
    if base is None or not base.get("ttft_ms") or not rec.get("ttft_ms"):
        return
    rec["speedup"] = base["ttft_ms"] / rec["ttft_ms"]
    rec["ideal_speedup"] = base["ideal_ms"] / rec["ideal_ms"]
    rec["ratio"] = rec["speedup"] / rec["ideal_speedup"]
    rec["achieved_over_ideal_ms"] = rec["ttft_ms"] / rec["ideal_ms"]
    if rec.get("decode_tok_s") and base.get("decode_tok_s"):
        rec["decode_speedup"] = rec["decode_tok_s"] / base["decode_tok_s"]


def model_summary(model: torch.nn.Module, spec: ModelSpec, build_s: float) -> dict[str, Any]:
    probe = make_inputs(spec, model.config, batch=1, device="cpu", dtype=torch.float32)
    tc = model.config.text_config
    return {
        "title": spec.title,
        "family": spec.family,
        "class": type(model).__name__,
        "image_size": list(spec.image_size),
        **({k: probe.extra[k] for k in ("frames", "frame_tokens", "video_tokens")} if spec.video else {}),
        "image_tokens": probe.image_tokens,
        "prompt_len": probe.prompt_len,
        "decoder_layers": tc.num_hidden_layers,
        "hidden_size": tc.hidden_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "decoder_parameters": sum(p.numel() for p in text_model(model).parameters()),
        "weights_gib": parameter_bytes(model) / 2**30,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": model.config.text_config._attn_implementation,
        "build_s": build_s,
    }
