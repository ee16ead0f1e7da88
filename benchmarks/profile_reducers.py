"""Where a reducer's time goes: its kernels, by device time, for the reducers that miss a cost target.

For each reducer and shape: the reducer's eager call under ``torch.profiler`` (after warm-up),
its kernels grouped by name with their device time and launch count, and the total device
time against the wall time of the graph-replayed call. A reducer whose device time is far
below its replayed time is bound by launches (many tiny kernels); one whose device time is
close to it is bound by its arithmetic. Inputs are :mod:`benchmarks.reducer_overhead`'s
synthetic ones.

    python -m benchmarks.profile_reducers --reducers cdpruner tome --shapes 576x1 576x8 --out prof.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from tokenreduce import graphs

from .common import summarize, time_call
from .reducer_overhead import cuda_case


def profile_one(name: str, n: int, b: int, d: int, *, calls: int = 5, top: int = 12) -> dict:
    """Kernel breakdown of ``calls`` eager calls of ``name`` at its first published stage."""
    reducer, tokens, context = cuda_case(name, n, b, d)

    def call():
        return reducer(tokens, context=context)

    with torch.inference_mode():
        replayed = summarize(time_call(call, "cuda", reps=20, warmup=3))
        with graphs.eager():
            eager = summarize(time_call(call, "cuda", reps=20, warmup=3))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    call()
                torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[ev.name[:90]]
            k[0] += ev.device_time / 1e3 / calls
            k[1] += 1 / calls
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    return {
        "reducer": name,
        "stage": reducer.stage.value,
        "N": n,
        "B": b,
        "D": d,
        "default_path_ms": replayed["median_ms"],
        "eager_ms": eager["median_ms"],
        "device_ms_per_call": sum(v[0] for v in kernels.values()),
        "kernels_per_call": sum(v[1] for v in kernels.values()),
        "top": [{"kernel": k, "ms": round(v[0], 4), "launches": round(v[1], 1)} for k, v in rows[:top]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reducers", nargs="+", required=True)
    parser.add_argument("--shapes", nargs="+", default=["576x1", "576x8"], help="NxB")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--out", default=None, help="JSON file for the records")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_reducers: CUDA is not available; nothing to profile")
        return
    records = []
    for shape in args.shapes:
        n, b = (int(v) for v in shape.split("x"))
        for name in args.reducers:
            try:
                rec = profile_one(name, n, b, args.dim)
            except Exception as exc:  # one broken reducer must not hide the others' profiles
                print(f"{name} N={n} B={b}: failed: {exc!r}")
                continue
            records.append(rec)
            print(
                f"\n== {name}@{rec['stage']} N={n} B={b}: default path {rec['default_path_ms']:.2f} ms, "
                f"eager {rec['eager_ms']:.2f} ms, device {rec['device_ms_per_call']:.2f} ms in "
                f"{rec['kernels_per_call']:.0f} kernels"
            )
            for row in rec["top"]:
                print(f"  {row['ms']:8.4f} ms  x{row['launches']:<6}  {row['kernel']}")
            graphs.clear(empty_cache=False)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
