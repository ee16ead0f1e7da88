"""Reducer overhead: time per call of every registered reducer at each of its stages.

Grid (full run): batch ``B in {1, 8}``, image tokens ``N in {576, 2880, 8192}``, width
``D in {1024, 3584, 4096}`` (CLIP-L, Qwen2.5-7B, Llama-7B), budget ``T = round(N / 9)``,
fp16 and bf16, CUDA and CPU. Each point: warm-up calls, then the median of at least 20
timed calls (CUDA events on the GPU). Reducers that need context get a synthetic one of
the right shape: CLS attention ``(B, N)``, CLS token ``(B, D)``, keys ``(B, N, D)``,
decoder attention rows ``(B, 1, N)`` (``(B, 32, N)``, one per text token, for reducers whose
``attention_query`` is ``"text"``), text embeddings / keys ``(B, 32, D)``, the patch grid
and positions. Video methods (``frames`` in ``required_context``) get the N tokens as one
whole video (:func:`video_shape`: ``T`` frames of a square ``h x h`` grid, 16 x 6x6 for
N = 576, 32 x 16x16 for N = 8192) with ``frames``, ``frame_index`` and the stacked grid
``(T*h, h)``, as the adapters give a video row under ``video_budget: per_video``.

The grid is run in priority order (CUDA before CPU, small N before large) under a
time budget; points that do not fit are listed as skipped. A call slower than
``slow_ms`` is timed fewer times (recorded in ``reps``) so one slow method cannot eat the
budget of the rest. The report divides each time by the prefill of the matching 7B
model from the end-to-end suite.

Two paths per point on CUDA (issue 19): a ``graph_safe`` reducer called without a mask is
replayed from a captured CUDA graph (:mod:`tokenreduce.graphs`, what a user gets), and the
same call runs eagerly under :func:`tokenreduce.graphs.eager`. Both are warmed up (the
capture happens in the first call) and timed in the same run, interleaved round by round
(five consecutive calls of one path, then five of the other: :func:`time_paths`), each call
bracketed by CUDA events: ``graph`` and ``eager`` hold
p10/median/p90 of each, the top-level figures are the default path's (``path``). Standalone::

    python -m benchmarks.reducer_overhead --shapes 576x1 576x8 2880x8 --widths 4096 \
        --out benchmarks/results/reducer_graphs.json

times every reducer at N=576 B=1/B=8 and N=2880 B=8, D=4096, and prints a table against
the targets (1 ms at N=576 B=1, 2 ms at B=8, ApET 5 ms at N=2880 B=8).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tokenreduce
from tokenreduce import ReductionContext, Stage, graphs

from .common import (
    Deadline,
    Reporter,
    command_line,
    free_device_memory,
    run_meta,
    summarize,
    sync,
    time_call,
    write_json,
)

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
    #: ``(N, B)`` pairs timed at every width instead of the tokens x batches grid (both devices).
    shapes: tuple[tuple[int, int], ...] | None = None
    #: On CUDA, time graph-safe reducers on both paths (graph replay and eager), interleaved.
    graph_column: bool = True

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


def video_shape(n: int, max_frames: int = 32) -> tuple[int, tuple[int, int]]:
    """``(T, (h, w))``: the most frames (at most ``max_frames``) whose frames are square grids of ``n / T`` tokens."""
    for t in range(min(max_frames, n), 0, -1):
        side = math.isqrt(n // t)
        if n % t == 0 and side * side == n // t:
            return t, (side, side)
    return 1, grid_shape(n)


def video_context(context: ReductionContext, n: int) -> ReductionContext:
    """``context`` with the tokens read as one whole video per row (see :func:`video_shape`)."""
    t, (h, w) = video_shape(n)
    b = context.positions.shape[0]
    frame_index = (torch.arange(n, device=context.positions.device) // (h * w)).expand(b, n)
    return dataclasses.replace(context, frames=t, frame_index=frame_index, grid=(t * h, w))


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


def cuda_case(name: str, n: int, b: int, d: int) -> tuple[Any, torch.Tensor, ReductionContext]:
    """``(reducer, tokens, context)``: ``name`` at its first published stage keeping N/9 of ``b`` rows
    of ``n`` random bfloat16 CUDA tokens of width ``d``, with the context an adapter would give
    (video frames for video reducers, the last text token's attention row for the others)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randn(b, n, d, generator=gen, device="cuda").to(torch.bfloat16)
    cls = tokenreduce.get_registry().reducers[name].cls
    stage = Stage.PROJECTOR if Stage.PROJECTOR in cls.stages else sorted(cls.stages)[0]
    context = synthetic_context(tokens, stage, gen)
    reducer = tokenreduce.create(name, max(1, round(n / 9)), stage=stage)
    if "frames" in reducer.required_context:
        context = video_context(context, n)
    if reducer.attention_query != "text" and context.attention is not None:
        context = dataclasses.replace(context, attention=context.attention[:, -1:])
    return reducer, tokens, context


def points(cfg: OverheadConfig, cuda: bool) -> list[dict[str, Any]]:
    """Grid points in priority order: CUDA first, then by N, B, D, dtype."""
    out = []
    for device in cfg.devices:
        if device == "cuda" and not cuda:
            continue
        on_cpu = device == "cpu"
        if cfg.shapes is not None:
            shapes = list(cfg.shapes)
        else:
            ns, bs = (cfg.cpu_tokens, cfg.cpu_batches) if on_cpu else (cfg.tokens, cfg.batches)
            shapes = [(n, b) for n in ns for b in bs]
        for n, b in shapes:
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
        graphs.clear(empty_cache=False)  # this point's graphs: no later point has its shapes
        free_device_memory()
    return results


def _graph_bytes(name: str, stage: Stage, shape: torch.Size) -> int:
    """Bytes held by the cached graph of ``name`` at ``stage`` for tokens of ``shape`` (0: none)."""
    for entry in reversed(graphs.stats()["entries"]):
        if entry["reducer"] == name and entry["stage"] == stage.value and entry["shape"] == tuple(shape):
            return entry["bytes"]
    return 0


def time_paths(
    call: Callable[[], Any], *, reps: int, warmup: int, block: int = 5
) -> tuple[list[float], list[float]]:
    """Milliseconds of ``call()`` on the default path and under :func:`tokenreduce.graphs.eager`.

    Interleaved in one run, round by round: each round times ``block`` consecutive calls of one
    path, then ``block`` of the other (graph first in even rounds, eager first in odd ones, so
    neither always goes first), after ``warmup`` untimed calls of each; every call is bracketed
    by CUDA events. Consecutive calls, not single ones alternating: in a model a reducer runs
    right after other GPU work (the vision tower), not after a host-bound eager call, which
    leaves the GPU nearly idle for milliseconds. Alternating single calls measured replays
    up to 0.25 ms slower at N=576, B=1 on an H200 than the same calls run back to back in the
    same session (PruneVid 1.04 against 0.96 ms, HoliTom 1.16 against 0.91).
    """
    for _ in range(warmup):
        call()
        with graphs.eager():
            call()
    torch.cuda.synchronize()
    rounds = max(1, -(-reps // block))
    graph_events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(rounds * block)]
    eager_events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(rounds * block)]

    def timed(events: list[list[torch.cuda.Event]], eager: bool) -> None:
        for start, end in events:
            with graphs.eager() if eager else nullcontext():
                start.record()
                call()
                end.record()

    for r in range(rounds):
        blocks = [(graph_events[r * block : (r + 1) * block], False), (eager_events[r * block : (r + 1) * block], True)]
        for events, eager in blocks if r % 2 == 0 else blocks[::-1]:
            timed(events, eager)
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in graph_events[:reps]], [s.elapsed_time(e) for s, e in eager_events[:reps]]


#: GPU work queued before each call of :func:`time_after_work`, in milliseconds (about the vision
#: tower's replay before a reducer in a LLaVA-1.5-7B prefill at batch 1: 2.1 ms).
AFTER_WORK_MS = 1.0


def time_after_work(call: Callable[[], Any], *, reps: int) -> list[float]:
    """Milliseconds of ``call()`` on the default path as a model makes it: after other GPU work.

    Before each call, ``AFTER_WORK_MS`` of GPU work is queued (``torch.cuda._sleep``, calibrated
    once), standing in for the vision tower or the layers before a decoder-layer step; the time
    runs from the end of that work to the end of the call's. The host's share of the call (its
    Python, the launches) then overlaps the GPU's work instead of adding to it, as in the fast
    path; :func:`time_paths` times the same call with the GPU idle when it starts.
    """
    cycles = _sleep_cycles(AFTER_WORK_MS)
    call()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        torch.cuda._sleep(cycles)
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def _sleep_cycles(ms: float) -> int:
    """Clock cycles of ``torch.cuda._sleep`` that take about ``ms`` milliseconds on this GPU."""
    probe = 1_000_000
    torch.cuda._sleep(probe)  # warm (clocks up)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    torch.cuda.synchronize()
    return max(1, int(probe * ms / max(start.elapsed_time(end), 1e-3)))


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
        if "frames" in reducer.required_context:
            context = video_context(context, tokens.shape[1])
        if reducer.attention_query != "text" and context.attention is not None:
            context = dataclasses.replace(context, attention=context.attention[:, -1:])

        def call():
            return reducer(tokens, context=context)

        both = device.startswith("cuda") and cfg.graph_column and bool(getattr(reducer, "graph_safe", False))
        with torch.inference_mode():
            sync(device)
            t0 = time.perf_counter()
            out = call()  # first call (the capture, on the graph path): also checks the output size
            sync(device)
            first_ms = (time.perf_counter() - t0) * 1e3
            kept = int(out.num_kept)
            graph_bytes = _graph_bytes(name, stage, tokens.shape)
            t0 = time.perf_counter()
            call()
            sync(device)
            second_ms = (time.perf_counter() - t0) * 1e3
            reps, warmup = cfg.reps, cfg.warmup
            if second_ms > cfg.slow_ms:  # a slow point: fewer repetitions (at least 10), recorded
                reps, warmup = max(min(reps, 10), min(reps, int(2000 / second_ms))), 1
            if not both:
                ms = time_call(call, device, reps=reps, warmup=warmup)
                return {
                    "status": "ok",
                    "kept": kept,
                    "first_ms": first_ms,
                    "path": "eager",
                    **summarize(ms),
                    "eager": summarize(ms),
                    "graph": None,
                }
            graph_ms, eager_ms = time_paths(call, reps=reps, warmup=warmup)
            queued = summarize(time_after_work(call, reps=reps))
        failed = [why for key, why in graphs.stats()["failed"].items() if key.startswith(f"{name}@{stage.value} ")]
        g, e = summarize(graph_ms), summarize(eager_ms)
        return {
            "status": "ok",
            "kept": kept,
            "first_ms": first_ms,
            "path": "graph" if graph_bytes > 0 and not failed else "eager",
            **g,
            "eager": e,
            "graph": g,
            "after_work": queued,
            "after_work_lead_ms": AFTER_WORK_MS,
            "graph_speedup": e["median_ms"] / g["median_ms"],
            "graph_mib": graph_bytes / 2**20,
            "graph_failed": failed[0] if failed else None,
        }
    except torch.cuda.OutOfMemoryError as err:
        free_device_memory(collect=True)
        return {"status": "oom", "error": str(err).splitlines()[0]}
    except Exception as err:
        tb = traceback.extract_tb(err.__traceback__)
        where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
        return {"status": "error", "error": f"{type(err).__name__}: {err}{where}"}


#: Targets of issue 19 on an H200: ``(N, B) -> ms`` for every reducer, and ApET's at N=2880 B=8.
TARGET_MS = {(576, 1): 1.0, (576, 8): 2.0}
APET_TARGET_MS = {(2880, 8): 5.0}


def target_ms(rec: dict[str, Any]) -> float | None:
    """The issue-19 target for a record (``None`` where there is none)."""
    if rec["reducer"].startswith("apet") and (rec["N"], rec["B"]) in APET_TARGET_MS:
        return APET_TARGET_MS[(rec["N"], rec["B"])]
    return TARGET_MS.get((rec["N"], rec["B"]))


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table: eager and graph p10/median/p90, the speed-up and the target."""

    def cell(s: dict[str, Any] | None) -> str:
        return "-" if not s else f"{s['p10_ms']:.3f} / {s['median_ms']:.3f} / {s['p90_ms']:.3f}"

    lines = [
        "| reducer | stage | B | N | D | dtype | eager p10/med/p90 ms | graph p10/med/p90 ms | speed-up | path "
        "| target ms | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['reducer']} | {r['stage']} | {r['B']} | {r['N']} | {r['D']} | {r['dtype']} |"
        if r.get("status") != "ok":
            lines.append(f"{head} {r.get('status')}: {r.get('error', '')[:80]} | | | | | |")
            continue
        goal = target_ms(r)
        speed = f"{r['graph_speedup']:.1f}x" if r.get("graph_speedup") else "-"
        met = "-" if goal is None else ("yes" if r["median_ms"] <= goal else "NO")
        lines.append(
            f"{head} {cell(r['eager'])} | {cell(r.get('graph'))} | {speed} | {r['path']} | "
            f"{'-' if goal is None else goal} | {met} |"
        )
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int]:
    try:
        n, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes takes NxB pairs such as 576x8, got {text!r}") from None
    if n < 2 or b < 1:
        raise argparse.ArgumentTypeError(f"--shapes: N must be >= 2 and B >= 1, got {text!r}")
    return n, b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.reducer_overhead", description="Per-call time of every reducer, graph and eager."
    )
    p.add_argument(
        "--shapes",
        type=_shape,
        nargs="+",
        default=[(576, 1), (576, 8), (2880, 8)],
        help="NxB pairs (default 576x1 576x8 2880x8)",
    )
    p.add_argument("--widths", type=int, nargs="+", default=[4096], help="token widths D (default 4096)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reducers", nargs="*", default=None, help="restrict to these reducers (default: all)")
    p.add_argument("--reps", type=int, default=20, help="timed calls of each path (at least 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each path after the first")
    p.add_argument("--time-budget-s", type=float, default=None, help="skip what does not fit (default: none)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the records and the table")
    args = p.parse_args(argv)
    if args.reps < 10:
        p.error("--reps must be at least 10")
    cfg = OverheadConfig(
        shapes=tuple(args.shapes),
        widths=tuple(args.widths),
        cpu_widths=tuple(args.widths),
        dtypes=tuple(getattr(torch, d) for d in args.dtypes),
        devices=(args.device,),
        reps=args.reps,
        warmup=args.warmup,
        slow_ms=float("inf"),
        reducers=tuple(args.reducers) if args.reducers else None,
    )
    with Reporter() as rep:
        results = run(cfg, deadline=Deadline(args.time_budget_s), reporter=rep)
    text = table(results)
    print(text)
    if args.out is not None:
        meta = run_meta(quick=False, device=args.device, command=command_line(argv, "benchmarks.reducer_overhead"))
        config = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(cfg).items()}
        config["dtypes"] = list(args.dtypes)
        write_json(args.out, {"meta": meta, "config": config, "results": results, "table": text})
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
