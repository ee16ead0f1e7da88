"""Run the benchmark suites and write the results folder.

::

    python -m benchmarks.run --suite all                    # GPU: about 8 minutes on one H100
    python -m benchmarks.run --suite all --quick            # CPU, tiny configs (CI)
    python -m benchmarks.run --suite e2e --resume --models qwen2.5-vl-7b   # measure what a run skipped
    python -m benchmarks.run --suite e2e --models llava-onevision-7b-video --batches 1   # the video row

Writes, under ``--out`` (default ``benchmarks/results``; ``benchmarks/results/quick``
with ``--quick``): ``roofline.json`` (measured peaks), ``overhead.json``,
``e2e_<model>.json``, ``attention_<model>.json`` (each with the run's metadata and
command; a later partial run replaces only the files it writes), then ``README.md`` and
the PNG plots from all JSON files present. JSON is rewritten after every measurement
(e2e: after each setting's warm-up and after every round of timings), so a run that is
stopped keeps what it measured.

End to end, every setting is warmed up (prefill and ``generate()``) and then timed in
``--reps`` rounds (default 10), each round timing every setting once; records hold
p10 / median / p90 of TTFT and decode tokens/s. Ten rounds cost about ten prefills and
ten ``generate()`` calls per setting: a full GPU run needs a larger ``--models-s`` than
the default to reach every setting (``--resume`` completes it in later calls).

Time: each suite runs under a wall-clock budget (``--overhead-s``, default 80 s;
``--models-s``, default 380 s for all models, shared out model by model, the attention
suite taking at most 35% of a model's share); work that does not fit (e2e: a setting whose
rounds would not end in time, and every setting after it) is recorded as skipped and
named in the report with the command that completes it
(``--resume`` keeps what an earlier run on the same GPU measured). Within a model the
most important settings run first (no reduction, ApET at every budget, every other
method at the smallest budget, then the rest). The video row
(``llava-onevision-7b-video``, :mod:`benchmarks.video`) runs every registered video method
and the ``random`` / ``pool`` baselines at ``--video-ratio`` (default 0.1) of the video's
tokens, per video. One model build is shared by the
attention and end-to-end suites and freed before the next model.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from . import attention_cost, end_to_end, reducer_overhead, report
from .common import Deadline, Reporter, command_line, free_device_memory, read_json, run_meta, write_json
from .models import LLAVA, LLAVA_NEXT, build_model, model_specs
from .roofline import Peaks, measure_peaks

SUITES = ("overhead", "e2e", "attention")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--suite",
        choices=("all", *SUITES),
        default=None,
        action="append",
        help="suite(s) to run (repeatable; default all)",
    )
    p.add_argument("--quick", action="store_true", help="tiny configs on CPU: the same code, in seconds (CI)")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, cpu with --quick)")
    p.add_argument("--models", nargs="*", default=None, help="model keys to run (default: all)")
    p.add_argument("--batches", type=int, nargs="*", default=None, help="batch sizes for e2e/attention (default 1 8)")
    p.add_argument("--reducers", nargs="*", default=None, help="restrict to these reducers")
    p.add_argument(
        "--budgets",
        type=int,
        nargs="*",
        default=None,
        help="budgets for 576 image tokens, scaled per model (default 192 128 64)",
    )
    p.add_argument(
        "--video-ratio",
        type=float,
        default=None,
        help="video row: share of the video's tokens every setting keeps, per video (default 0.1)",
    )
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per generate() (default 64)")
    p.add_argument(
        "--paths",
        nargs="*",
        choices=end_to_end.PATHS,
        default=None,
        help="e2e execution paths, each setting on each, interleaved (default: eager)",
    )

    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="e2e timed rounds; each round times every setting once (default 10; 3 with --quick)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="e2e untimed prefill + generate() calls per setting (default 1)"
    )
    p.add_argument("--overhead-s", type=float, default=None, help="time budget of the overhead suite (s)")
    p.add_argument("--models-s", type=float, default=None, help="time budget of the model suites, all models (s)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the measured records of existing e2e files (same GPU) and measure only the rest",
    )
    p.add_argument("--no-report", action="store_true", help="do not regenerate README.md / plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    chosen = args.suite or ["all"]
    args.suites = SUITES if "all" in chosen else tuple(dict.fromkeys(chosen))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    device = args.device or ("cuda" if torch.cuda.is_available() and not quick else "cpu")
    dtype = torch.bfloat16
    out = args.out or Path("benchmarks/results/quick" if quick else "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.monotonic()
    threads = torch.get_num_threads()
    if quick:  # tiny configs are latency-bound: one thread avoids spin-waiting on shared CI cores
        torch.set_num_threads(1)
    try:
        return _main(args, quick, device, dtype, out, started, command_line(argv) if argv is not None else None)
    finally:
        torch.set_num_threads(threads)


def _main(
    args: argparse.Namespace,
    quick: bool,
    device: str,
    dtype: torch.dtype,
    out: Path,
    started: float,
    command: str | None,
) -> int:
    with Reporter(quiet=args.quiet) as rep:
        meta = run_meta(quick=quick, device=device, command=command)
        rep.log(
            f"benchmarks on {meta['gpu'] or device} (torch {meta['torch']}, transformers {meta['transformers']}) -> {out}"
        )
        peaks = measure_peaks(device, dtype, quick=quick)
        rep.log(f"measured peaks: {peaks.matmul_tflops:.1f} TFLOP/s bf16 GEMM, {peaks.bandwidth_gbs:.0f} GB/s copy")
        write_json(out / "roofline.json", {"meta": meta, "peaks": peaks.as_dict()})

        if "overhead" in args.suites:
            t0 = time.monotonic()
            run_overhead(args, out, meta, rep)
            rep.log(f"overhead suite: {time.monotonic() - t0:.0f} s")
        if "e2e" in args.suites or "attention" in args.suites:
            t0 = time.monotonic()
            run_models(args, out, meta, peaks, device, dtype, rep)
            rep.log(f"model suites: {time.monotonic() - t0:.0f} s")

    if not args.no_report:
        path = report.write_report(out)
        print(f"report: {path}")
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


def run_overhead(args: argparse.Namespace, out: Path, meta: dict[str, Any], rep: Reporter) -> None:
    cfg = reducer_overhead.OverheadConfig.quick() if args.quick else reducer_overhead.OverheadConfig()
    if args.reducers:
        cfg.reducers = tuple(args.reducers)
    budget = args.overhead_s if args.overhead_s is not None else (None if args.quick else 80.0)
    doc: dict[str, Any] = {"meta": meta, "config": _plain(vars(cfg)), "time_budget_s": budget, "results": []}

    def save(rec: dict[str, Any] | None = None) -> None:
        if rec is not None:
            doc["results"].append(rec)
        write_json(out / "overhead.json", doc)

    reducer_overhead.run(cfg, deadline=Deadline(budget), reporter=rep, on_result=save)
    save()


def run_models(
    args, out: Path, meta: dict[str, Any], peaks: Peaks, device: str, dtype: torch.dtype, rep: Reporter
) -> None:
    specs = [s for s in model_specs(args.quick) if args.models is None or s.key in args.models]
    if "e2e" not in args.suites:  # the attention suite runs on the LLaVA models only
        specs = [s for s in specs if s.family in (LLAVA, LLAVA_NEXT)]
    e2e_cfg = end_to_end.E2EConfig()
    att_cfg = attention_cost.AttentionConfig()
    if args.quick:
        # One budget that leaves ApET's default 10 basis tokens room in the tiny models.
        e2e_cfg = end_to_end.E2EConfig(batches=(1, 2), base_budgets=(192,), new_tokens=3, reps=3)
        att_cfg = attention_cost.AttentionConfig(batches=(1,), reps=1)
    if args.batches:
        e2e_cfg.batches = att_cfg.batches = tuple(args.batches)
    if args.budgets:
        e2e_cfg.base_budgets = tuple(args.budgets)
    if args.new_tokens:
        e2e_cfg.new_tokens = args.new_tokens
    if args.reducers:
        e2e_cfg.reducers = tuple(args.reducers)
    if args.reps is not None or args.warmup is not None or args.video_ratio is not None or args.paths:
        e2e_cfg = dataclasses.replace(  # through the constructor: it checks the values
            e2e_cfg,
            reps=e2e_cfg.reps if args.reps is None else args.reps,
            warmup=e2e_cfg.warmup if args.warmup is None else args.warmup,
            video_ratio=e2e_cfg.video_ratio if args.video_ratio is None else args.video_ratio,
            paths=tuple(args.paths) if args.paths else e2e_cfg.paths,
        )
    total = args.models_s if args.models_s is not None else (None if args.quick else 380.0)
    all_deadline = Deadline(total)
    for i, spec in enumerate(specs):
        if all_deadline.expired():
            rep.log(
                f"{spec.key}: skipped (time budget used up); complete with: python -m benchmarks.run --suite e2e --resume --models {spec.key}"
            )
            continue
        share = all_deadline.remaining() / (len(specs) - i)
        t0 = time.perf_counter()
        model = build_model(spec, device=device, dtype=dtype, quick=args.quick, seed=0)
        build_s = time.perf_counter() - t0
        summary = end_to_end.model_summary(model, spec, build_s)
        rep.log(
            f"{spec.key}: built in {build_s:.1f} s ({summary['parameters'] / 1e9:.2f} B parameters, {summary['image_tokens']} image tokens)"
        )
        run_attention = "attention" in args.suites and spec.family in (LLAVA, LLAVA_NEXT)
        if run_attention:
            att_deadline = Deadline(None if total is None else min(share * 0.35, all_deadline.remaining()))
            doc = {"meta": meta, "config": _plain(vars(att_cfg)), "model": summary, "results": []}
            path = out / f"attention_{spec.key}.json"
            attention_cost.run_model(
                model,
                spec,
                device=device,
                dtype=dtype,
                cfg=att_cfg,
                deadline=att_deadline,
                reporter=rep,
                on_result=lambda r, d=doc, p=path: (d["results"].append(r), write_json(p, d)),
            )
            write_json(path, doc)
        if "e2e" in args.suites:
            left = None if total is None else max(0.0, share - (time.perf_counter() - t0))
            e2e_deadline = Deadline(None if left is None else min(left, all_deadline.remaining()))
            doc = {
                "meta": meta,
                "peaks": peaks.as_dict(),
                "config": _plain(vars(e2e_cfg)),
                "model": summary,
                "results": [],
            }
            path = out / f"e2e_{spec.key}.json"
            previous = _previous_e2e(path, meta, doc) if args.resume else None
            end_to_end.run_model(
                model,
                spec,
                device=device,
                dtype=dtype,
                peaks=peaks,
                cfg=e2e_cfg,
                deadline=e2e_deadline,
                reporter=rep,
                profile_target=i == 0,
                previous=previous,
                on_result=lambda r, d=doc, p=path: (upsert(d["results"], r), write_json(p, d)),
            )
            write_json(path, doc)
        rep.log(f"{spec.key}: done in {time.perf_counter() - t0:.0f} s")
        del model
        free_device_memory(collect=True)


def record_key(rec: dict[str, Any]) -> tuple[str, int, str]:
    """What an e2e record is about: the setting asked for (before any fallback), the batch and the path."""
    return rec.get("requested", rec["setting"]), rec["batch"], rec.get("path") or "eager"


def upsert(results: list[dict[str, Any]], rec: dict[str, Any]) -> None:
    """Replace the record about the same setting and batch (records grow round by round), or append."""
    key = record_key(rec)
    for i, old in enumerate(results):
        if record_key(old) == key:
            results[i] = rec
            return
    results.append(rec)


def _previous_e2e(path: Path, meta: dict[str, Any], doc: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Measured records of an earlier e2e file of the same model, GPU and settings (for ``--resume``)."""
    prev = read_json(path)
    same = prev is not None and all(
        prev["meta"].get(k) == meta.get(k) for k in ("gpu", "device", "quick", "torch", "transformers")
    )
    # What a record's numbers depend on (batches/budgets/reducers only select).
    keys = ("new_tokens", "prefill_reps", "reps", "warmup")
    if not same or any(prev.get("config", {}).get(k) != doc["config"].get(k) for k in keys):
        return {}
    doc["resumed_from"] = [*prev.get("resumed_from", []), prev["meta"]]
    reps = doc["config"].get("reps")
    return {
        record_key(r): r
        for r in prev["results"]
        # A run stopped mid-rounds leaves records with fewer rounds: those are measured again.
        if r["status"] == "unsupported" or (r["status"] == "ok" and (reps is None or r.get("rounds", reps) >= reps))
    }


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: [str(x) if isinstance(x, torch.dtype) else x for x in v] if isinstance(v, tuple) else v for k, v in d.items()
    }


if __name__ == "__main__":
    raise SystemExit(main())
