"""What the fused Triton kernels buy each reducer: a call with them and without them, in one run.

``python -m benchmarks.fused_kernels [--reducers ...] [--shapes 576x1 576x8] [--out FILE]``

The kernels (:mod:`tokenreduce.scale_kernels`, :mod:`tokenreduce_plugins.kernels`) run unless
``TOKENREDUCE_NO_TRITON`` is set; graphs are captured per value of that variable, so both
forms stay captured side by side. Each reducer at each shape: warm-up calls of both forms,
then rounds of ``--block`` consecutive calls of one form and then of the other (which goes
first alternates), every call bracketed by CUDA events with the GPU idle when it starts (as
:func:`benchmarks.reducer_overhead.time_paths` times a call "alone"). Records p10, median
and p90 of each form in milliseconds, and the median saving. Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from tokenreduce import fused, graphs

from .common import command_line, run_meta, summarize, write_json
from .reducer_overhead import _shape, cuda_case

#: Reducers whose calls the kernels change (safe_scale: most; ranks: video reducers, DART; DPC: PruneVid, HoliTom).
DEFAULT_REDUCERS = ("apet-llava", "holitom", "prunevid", "fastvid", "dart", "tome", "visionzip", "random")


def compare(name: str, n: int, b: int, d: int, *, rounds: int, block: int, warmup: int) -> dict[str, Any]:
    """Milliseconds per call with the kernels (``fused``) and with torch ops only (``torch``)."""
    reducer, tokens, context = cuda_case(name, n, b, d)
    forms = {"torch": "1", "fused": ""}
    times: dict[str, list[float]] = {k: [] for k in forms}
    before = os.environ.get(fused.DISABLE_ENV)
    try:
        with torch.inference_mode():
            for value in forms.values():
                os.environ[fused.DISABLE_ENV] = value
                for _ in range(warmup):
                    reducer(tokens, context=context)
            torch.cuda.synchronize()
            for r in range(rounds):
                for form in forms if r % 2 == 0 else reversed(forms):
                    os.environ[fused.DISABLE_ENV] = forms[form]
                    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(block)]
                    for start, end in events:
                        start.record()
                        reducer(tokens, context=context)
                        end.record()
                    torch.cuda.synchronize()
                    times[form] += [s.elapsed_time(e) for s, e in events]
    finally:
        if before is None:
            os.environ.pop(fused.DISABLE_ENV, None)
        else:
            os.environ[fused.DISABLE_ENV] = before
        graphs.clear(empty_cache=False)
    out = {"reducer": name, "N": n, "B": b, "D": d, **{k: summarize(v) for k, v in times.items()}}
    out["saved_ms"] = out["torch"]["median_ms"] - out["fused"]["median_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fused_kernels", description=__doc__.splitlines()[0])
    p.add_argument("--reducers", nargs="+", default=list(DEFAULT_REDUCERS))
    p.add_argument("--shapes", type=_shape, nargs="+", default=[(576, 1), (576, 8)], help="NxB pairs")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=12, help="rounds of each form (at least 2)")
    p.add_argument("--block", type=int, default=5, help="consecutive calls of one form a round")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not fused.triton_importable():
        p.error("needs a CUDA device and Triton")
    if args.rounds < 2 or args.rounds * args.block < 10:
        p.error("--rounds must be at least 2, and rounds x block at least 10")
    results = []
    print("| reducer | N | B | torch ops p10/med/p90 ms | fused p10/med/p90 ms | saved ms |")
    print("|---|---|---|---|---|---|")
    for name in args.reducers:
        for n, b in args.shapes:
            rec = compare(name, n, b, args.width, rounds=args.rounds, block=args.block, warmup=args.warmup)
            results.append(rec)
            cell = lambda s: f"{s['p10_ms']:.3f} / {s['median_ms']:.3f} / {s['p90_ms']:.3f}"  # noqa: E731
            row = [name, n, b, cell(rec["torch"]), cell(rec["fused"]), f"{rec['saved_ms']:.3f}"]
            print("| " + " | ".join(map(str, row)) + " |", flush=True)
    if args.out is not None:
        meta = run_meta(quick=False, device="cuda", command=command_line(argv, "benchmarks.fused_kernels"))
        config = vars(args) | {"out": str(args.out)}
        write_json(args.out, {"meta": meta, "config": config, "results": results})
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
