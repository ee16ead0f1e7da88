"""End to end: what each reducer buys on real model classes at 7B sizes (random weights).

For every model of :mod:`benchmarks.models`, every batch size and every setting (no
reduction; each registered reducer at its published stage and budgets 192 / 128 / 64,
scaled by the model's image-token count over 576), one run measures:

* ``ttft_ms``: time to first token = one prefill forward (vision tower, projector,
  reduction, decoder with the KV cache, LM head on the last token), median of
  ``prefill_reps`` runs after a warm-up, timed with CUDA events;
* ``decode_tok_s``: ``batch x (new_tokens - 1)`` over the time ``generate()`` spends after
  its prefill, for ``new_tokens`` greedy tokens (``min_new_tokens`` forces no early EOS);
* ``peak_gib``: peak allocated GPU memory during that ``generate()`` (weights included;
  ``weights_gib`` is listed per model);
* ``kv_prefill_bytes`` / ``kv_final_bytes``: bytes of the KV cache after the prefill and
  after ``generate()``, read off the cache objects;
* the roofline-ideal prefill (:mod:`benchmarks.roofline`) for the tokens each component
  actually processed (decoder lengths read per layer from the prefill's KV cache), and
  ``speedup`` / ``ideal_speedup`` / ``ratio`` against the unreduced run.

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
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

import tokenreduce
from tokenreduce import Pipeline, Stage, Step
from tokenreduce.errors import MissingContextError
from tokenreduce_plugins.adapters import compat

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
    budget; every other method at the smallest budget; the other budgets.
    """
    reg = tokenreduce.get_registry()
    skip = {v for fam in VARIANTS.values() for v in fam.values()} | set(VARIANTS)
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


@dataclass
class E2EConfig:
    """Knobs of the end-to-end suite."""

    batches: tuple[int, ...] = (1, 8)
    base_budgets: tuple[int, ...] = BASE_BUDGETS
    new_tokens: int = 64
    prefill_reps: int = 3
    #: Settings profiled once (largest batch, first model): where the prefill time goes.
    profile: tuple[str, ...] = ("none", "apet")
    reducers: tuple[str, ...] | None = None  # restrict to these reducer names (None = all)


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
    previous: dict[tuple[str, int], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every setting x batch on one built model; returns one record per run (errors and skips included).

    ``previous`` maps ``(setting name, batch)`` to records of an earlier run on the same
    kind of device (``--resume``): those are kept instead of measured again.
    """
    previous = previous or {}
    config = model.config
    n_layers = config.text_config.num_hidden_layers
    probe = make_inputs(spec, config, batch=1, device="cpu", dtype=torch.float32)
    n = probe.image_tokens
    budgets = scaled_budgets(n, cfg.base_budgets)
    settings = settings_for(spec.family, n, n_layers, budgets)
    if cfg.reducers is not None:
        settings = [
            s
            for s in settings
            if s.reducer is None or s.reducer in cfg.reducers or s.reducer.split("-")[0] in cfg.reducers
        ]
    task = reporter.task(f"e2e {spec.key}", total=len(settings) * len(cfg.batches))
    inputs = {b: make_inputs(spec, config, batch=b, device=device, dtype=dtype) for b in cfg.batches}
    results: list[dict[str, Any]] = []
    baseline: dict[int, dict[str, Any]] = {}
    for setting in settings:
        for b in cfg.batches:
            if (setting.name, b) in previous:
                rec = {**previous[(setting.name, b)], "resumed": True}
            elif deadline.expired():
                rec = {**_base(spec, b, setting), "status": "skipped", "error": "time budget of the suite used up"}
            else:
                want_profile = profile_target and b == max(cfg.batches) and _wants_profile(setting, cfg, budgets)
                rec = _run_with_fallback(model, spec, inputs[b], setting, device, cfg, peaks, want_profile)
            if rec["status"] == "ok":
                if setting.reducer is None:
                    baseline[b] = rec
                _relative(rec, baseline.get(b))
            results.append(rec)
            reporter.advance(task, item=f"B={b} {setting.name}: {_short(rec)}")
            if on_result is not None:
                on_result(rec)
    return results


def _wants_profile(setting: Setting, cfg: E2EConfig, budgets: list[int]) -> bool:
    if setting.reducer is None:
        return "none" in cfg.profile
    return any(setting.reducer.split("-")[0] == p for p in cfg.profile) and setting.label == min(budgets)


def _base(spec: ModelSpec, batch: int, s: Setting) -> dict[str, Any]:
    return {
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


def _run_with_fallback(model, spec, inputs, setting: Setting, device, cfg, peaks, want_profile) -> dict[str, Any]:
    """Run a setting; if the adapter cannot supply its context, rerun with the method's documented fallback."""
    rec = {
        **_base(spec, inputs.batch, setting),
        **_run_one(model, spec, inputs, setting, device, cfg, peaks, want_profile),
    }
    alt = FALLBACK_PARAMS.get(setting.reducer or "")
    if rec["status"] == "unsupported" and alt and not setting.params:
        first = rec["error"]
        requested = rec["setting"]
        setting = dataclasses.replace(setting, params=tuple(sorted(alt.items())))
        rec = {
            **_base(spec, inputs.batch, setting),
            **_run_one(model, spec, inputs, setting, device, cfg, peaks, want_profile),
        }
        rec["fallback_from"] = first
        rec["requested"] = requested
    return rec


def _short(rec: dict[str, Any]) -> str:
    if rec["status"] != "ok":
        return rec["status"]
    return f"{rec['ttft_ms']:.1f} ms"


def _run_one(
    model, spec, inputs: Inputs, setting: Setting, device, cfg: E2EConfig, peaks: Peaks, want_profile: bool
) -> dict[str, Any]:
    oom = False
    try:
        pipeline = setting.pipeline()
        ctx = tokenreduce.apply(model, pipeline) if pipeline is not None else nullcontext()
        with torch.inference_mode(), ctx as handle:
            return _measure(model, spec, inputs, setting, handle, device, cfg, peaks, want_profile, pipeline)
    except torch.cuda.OutOfMemoryError as err:
        oom = True
        return {"status": "oom", "error": str(err).splitlines()[0]}
    except Exception as err:  # a failing reducer/adapter is reported, never stops the suite
        tb = traceback.extract_tb(err.__traceback__)
        where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
        # A model that cannot supply a method's context (no [CLS] in Qwen's tower) is not a failure.
        status = "unsupported" if isinstance(err, MissingContextError) else "error"
        return {"status": status, "error": f"{type(err).__name__}: {err}{where}"}
    finally:
        free_device_memory(collect=oom)  # after an OOM, the failed call's tensors may sit in reference cycles


def _measure(
    model,
    spec,
    inputs: Inputs,
    setting: Setting,
    handle,
    device,
    cfg: E2EConfig,
    peaks: Peaks,
    want_profile: bool,
    pipeline: Pipeline | None,
) -> dict[str, Any]:
    kw = inputs.kwargs
    b = inputs.batch

    def prefill():
        return model(**kw, use_cache=True, logits_to_keep=1)

    out = prefill()  # warm-up; its cache tells how many tokens each decoder layer processed
    lengths = cache_lengths(compat.output_cache(out))
    kv_prefill = cache_nbytes(compat.output_cache(out))
    records = [_record_dict(r) for r in (handle.records if handle is not None else [])]
    del out
    ms = time_call(prefill, device, reps=cfg.prefill_reps, warmup=0)
    prof = None
    if want_profile:
        with reducer_ranges(pipeline):
            prof = profile_prefill(prefill, device)

    pad = model.config.text_config.pad_token_id
    gen_kw = dict(
        max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, do_sample=False, return_dict_in_generate=True
    )
    with peak_memory(device) as mem:
        sync(device)
        t0 = time.perf_counter()
        gen = model.generate(**kw, **gen_kw, pad_token_id=pad if pad is not None else 0)
        sync(device)
        gen_ms = (time.perf_counter() - t0) * 1e3
    new = int(gen.sequences.shape[1] - kw["input_ids"].shape[1])
    kv_final = cache_nbytes(compat.output_cache(gen))
    del gen

    n_layers = model.config.text_config.num_hidden_layers
    text = inputs.prompt_len - inputs.image_tokens
    per_layer = [max(0, length - text) for length in lengths] if lengths and len(lengths) == n_layers else None
    if per_layer is None:
        per_layer = setting.image_tokens_per_layer(inputs.image_tokens, n_layers)
    proj = None if setting.stage != "vision_encoder" else setting.budgets[0]
    profile = token_profile(
        spec, model.config, image_tokens=inputs.image_tokens, prompt_len=inputs.prompt_len, per_layer=per_layer
    )
    if proj is not None:
        profile.projector_tokens = min(profile.projector_tokens, proj * max(1, profile.vision_sequences))
    roof = summarize_components(prefill_components(model, spec, profile, b), peaks)
    stats = summarize(ms)
    ttft = stats["median_ms"]
    decode_ms = gen_ms - ttft
    rec: dict[str, Any] = {
        "status": "ok",
        "image_tokens": inputs.image_tokens,
        "prompt_len": inputs.prompt_len,
        "image_tokens_per_layer": per_layer,
        "ttft_ms": ttft,
        "ttft": stats,
        "generate_ms": gen_ms,
        "new_tokens": new,
        "decode_tok_s": b * (new - 1) / (decode_ms / 1e3) if new > 1 and decode_ms > 0 else None,
        "peak_gib": mem["peak_gib"],
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


def _record_dict(r: Any) -> dict[str, Any]:
    """A StageRecord without its tensors (``asdict`` would deep-copy them)."""
    d = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in ("indices", "info")}
    d["stage"] = getattr(r.stage, "value", r.stage)
    return d


def _relative(rec: dict[str, Any], base: dict[str, Any] | None) -> None:
    """Speed-ups against the unreduced run of the same model and batch."""
    if base is None:
        return
    rec["speedup"] = base["ttft_ms"] / rec["ttft_ms"]
    rec["ideal_speedup"] = base["ideal_ms"] / rec["ideal_ms"]
    rec["ratio"] = rec["speedup"] / rec["ideal_speedup"]
    rec["achieved_over_ideal_ms"] = rec["ttft_ms"] / rec["ideal_ms"]


def model_summary(model: torch.nn.Module, spec: ModelSpec, build_s: float) -> dict[str, Any]:
    probe = make_inputs(spec, model.config, batch=1, device="cpu", dtype=torch.float32)
    tc = model.config.text_config
    return {
        "title": spec.title,
        "family": spec.family,
        "class": type(model).__name__,
        "image_size": list(spec.image_size),
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
