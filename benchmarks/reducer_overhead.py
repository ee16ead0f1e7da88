"""Reducer overhead: time per call of every registered reducer at each of its stages.

Grid (full run): batch ``B in {1, 8}``, image tokens ``N in {576, 2880, 8192}``, width
``D in {1024, 3584, 4096}`` (CLIP-L, Qwen2.5-7B, Llama-7B), budget ``T = round(N / 9)``,
fp16 and bf16, CUDA and CPU. Each point: warm-up calls, then the median of at least 20
timed calls (CUDA events on the GPU). Reducers that need context get a synthetic one of
the right shape: CLS attention ``(B, N)``, CLS token ``(B, D)``, keys ``(B, N, D)``,
decoder attention rows ``(B, 1, N)`` (``(B, 32, N)``, one per text token, for reducers whose
``attention_query`` is ``"text"``), text embeddings / keys ``(B, 32, D)``, the patch grid
and positions.

The grid is run in priority order (CUDA before CPU, small N before large) under a
time budget; points that do not fit are listed as skipped. A call slower than
``slow_ms`` is timed fewer times (recorded in ``reps``) so one slow method cannot eat the
budget of the rest. The report divides each time by the prefill of the matching 7B
model from the end-to-end suite.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import tokenreduce
from tokenreduce import ReductionContext, Stage

from .common import Deadline, Reporter, free_device_memory, summarize, sync, time_call

TEXT_TOKENS = 32


@dataclass
class OverheadConfig:
    batches: tuple[int, ...] = (1, 8)
    tokens: tuple[int, ...] = (576, 2880, 8192)
    widths: tuple[int, ...] = (4096, 1024, 3584)
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
    devices: tuple[str, ...] = ("cuda", "cpu")
    #: CPU points are a subset (the CPU path matters for tests and laptops, not serving).
    cpu_batches: tuple[int, ...] = (1,)
    cpu_tokens: tuple[int, ...] = (576, 2880)
    cpu_widths: tuple[int, ...] = (4096, 1024)
    reps: int = 20
    warmup: int = 3
    slow_ms: float = 100.0
    reducers: tuple[str, ...] | None = None

    @classmethod
    def quick(cls) -> OverheadConfig:
        return cls(
            batches=(1, 2),
            tokens=(144,),
            widths=(32,),
            dtypes=(torch.bfloat16,),
            devices=("cpu",),
            cpu_batches=(1, 2),
            cpu_tokens=(144,),
            cpu_widths=(32,),
            reps=3,
            warmup=1,
        )


def grid_shape(n: int) -> tuple[int, int]:
    """The most square ``(h, w)`` factorisation of ``n`` (``h <= w``)."""
    h = math.isqrt(n)
    while n % h:
        h -= 1
    return h, n // h


def synthetic_context(tokens: torch.Tensor, stage: Stage, gen: torch.Generator) -> ReductionContext:
    """Every context field a reducer may ask for, with the shapes an adapter would pass."""
    b, n, d = tokens.shape
    dev, dt = tokens.device, tokens.dtype

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32)

    return ReductionContext(
        stage=stage,
        layer=2 if stage is Stage.LLM_LAYER else None,
        cls_token=randn(b, d).to(dt),
        cls_attention=(randn(b, n) * 2).softmax(dim=-1),
        keys=randn(b, n, d).to(dt),
        text_embeds=randn(b, TEXT_TOKENS, d).to(dt),
        text_mask=torch.ones(b, TEXT_TOKENS, dtype=torch.bool, device=dev),
        text_keys=randn(b, TEXT_TOKENS, d).to(dt),
        # One row per text token; reducers that query the last token get its row alone (_time_one).
        attention=(randn(b, TEXT_TOKENS, n) * 2).softmax(dim=-1),
        grid=grid_shape(n),
        positions=torch.arange(n, device=dev).expand(b, n),
    )


def points(cfg: OverheadConfig, cuda: bool) -> list[dict[str, Any]]:
    """Grid points in priority order: CUDA first, then by N, B, D, dtype."""
    out = []
    for device in cfg.devices:
        if device == "cuda" and not cuda:
            continue
        on_cpu = device == "cpu"
        for n in cfg.cpu_tokens if on_cpu else cfg.tokens:
            for b in cfg.cpu_batches if on_cpu else cfg.batches:
                for d in cfg.cpu_widths if on_cpu else cfg.widths:
                    for dt in cfg.dtypes:
                        out.append({"device": device, "N": n, "B": b, "D": d, "dtype": dt})
    return out


def reducer_stages(names: tuple[str, ...] | None) -> list[tuple[str, Stage]]:
    reg = tokenreduce.get_registry()
    out = []
    for name in sorted(reg.reducers):
        if names is not None and name not in names:
            continue
        for st in sorted(reg.reducers[name].cls.stages, key=lambda s: list(Stage).index(s)):
            out.append((name, st))
    return out


def run(
    cfg: OverheadConfig,
    *,
    deadline: Deadline,
    reporter: Reporter,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every (reducer, stage) at every grid point; one record per pair and point."""
    pairs = reducer_stages(cfg.reducers)
    pts = points(cfg, torch.cuda.is_available())
    task = reporter.task("reducer overhead", total=len(pairs) * len(pts))
    results = []
    for pt in pts:
        dt_name = str(pt["dtype"]).replace("torch.", "")
        base = {
            "device": pt["device"],
            "B": pt["B"],
            "N": pt["N"],
            "D": pt["D"],
            "T": max(1, round(pt["N"] / 9)),
            "dtype": dt_name,
        }
        if deadline.expired():
            for name, st in pairs:
                results.append({**base, "reducer": name, "stage": st.value, "status": "skipped"})
            reporter.advance(task, item="skipped (time budget)", steps=len(pairs))
            continue
        gen = torch.Generator(device=pt["device"]).manual_seed(0)
        tokens = torch.randn(pt["B"], pt["N"], pt["D"], generator=gen, device=pt["device"], dtype=torch.float32).to(
            pt["dtype"]
        )
        contexts = {st: synthetic_context(tokens, st, gen) for st in Stage}
        for name, st in pairs:
            rec = {**base, "reducer": name, "stage": st.value}
            if deadline.expired():
                rec["status"] = "skipped"
            else:
                rec.update(_time_one(name, st, tokens, contexts[st], base["T"], pt["device"], cfg))
            results.append(rec)
            reporter.advance(
                task, item=f"{pt['device']} B={pt['B']} N={pt['N']} D={pt['D']} {dt_name} {name}@{st.value}"
            )
            if on_result is not None:
                on_result(rec)
        del tokens, contexts
        free_device_memory()
    return results


def _time_one(
    name: str,
    stage: Stage,
    tokens: torch.Tensor,
    context: ReductionContext,
    budget: int,
    device: str,
    cfg: OverheadConfig,
) -> dict[str, Any]:
    try:
        reducer = tokenreduce.create(name, budget, stage=stage)
        if reducer.attention_query != "text" and context.attention is not None:
            context = dataclasses.replace(context, attention=context.attention[:, -1:])

        def call():
            return reducer(tokens, context=context)

        with torch.inference_mode():
            sync(device)
            t0 = time.perf_counter()
            out = call()  # first call: also the check that the output has the requested size
            sync(device)
            first_ms = (time.perf_counter() - t0) * 1e3
            kept = int(out.num_kept)
            reps, warmup = cfg.reps, cfg.warmup
            if first_ms > cfg.slow_ms:  # a slow point: fewer repetitions, recorded
                reps, warmup = max(3, min(reps, int(2000 / first_ms))), 1
            ms = time_call(call, device, reps=reps, warmup=warmup)
        return {"status": "ok", "kept": kept, "first_ms": first_ms, **summarize(ms)}
    except torch.cuda.OutOfMemoryError as err:
        free_device_memory(collect=True)
        return {"status": "oom", "error": str(err).splitlines()[0]}
    except Exception as err:
        tb = traceback.extract_tb(err.__traceback__)
        where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
        return {"status": "error", "error": f"{type(err).__name__}: {err}{where}"}
