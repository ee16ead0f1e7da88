"""ApET overhead: our batched reducer vs a per-row loop written like the paper's code.

The loop version below is the reference algorithm (tests/fixtures/apet/README.md) written the
way the published ApET code is: one row at a time, FPS per row, ``torch.linalg.solve``,
and token merging with a broadcast cosine similarity (an ``(N - T, T - k, D)``
intermediate, as ``F.cosine_similarity(a.unsqueeze(2), b.unsqueeze(1), dim=3)`` builds).
Both compute the same result; the script checks that before timing each configuration.

Usage::

    python benchmarks/apet_overhead.py --device cpu --quick    # a minute or two on a laptop
    python benchmarks/apet_overhead.py --device cuda           # full grid on a GPU

Timing: CUDA uses ``torch.cuda.Event`` pairs after warm-up, median of ``--reps`` (>= 20)
runs; CPU uses ``time.perf_counter``, median of fewer runs. The loop version is skipped
where it would need more memory than allowed or its first run exceeds ``--loop-budget-s``.
On CUDA the peak extra memory of each call (``torch.cuda.max_memory_allocated`` above
what the inputs hold) is reported: ours grows with ``B N (D + T)``, the loop's with
``(N - T) (T - k) D``.

Writes ``benchmarks/results/apet_overhead_<device>.json`` and ``.md`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenreduce

RESULTS = Path(__file__).resolve().parent / "results"
K = 10
RIDGE = 1e-5
FULL_GRID = [(b, n, d) for b in (1, 8, 32) for n in (576, 2880, 8192) for d in (1024, 4096)]
QUICK_GRID = [(1, 576, 1024), (8, 576, 1024), (1, 576, 4096), (1, 2880, 1024)]


# -- the loop version, written like the paper's code ------------------------------------


def _fps_row(x: torch.Tensor, k: int) -> torch.Tensor:
    n = x.shape[0]
    centroids = torch.zeros(k, dtype=torch.long, device=x.device)
    dist = torch.full((n,), 1e10, device=x.device)
    farthest = torch.zeros((), dtype=torch.long, device=x.device)  # start at index 0
    for i in range(k):
        centroids[i] = farthest
        dist = torch.min(dist, ((x - x[farthest]) ** 2).sum(-1))
        farthest = dist.max(0)[1]
    return centroids


def loop_apet(x: torch.Tensor, t: int, k: int = K, ridge: float = RIDGE) -> torch.Tensor:
    """ApET (LLaVA variant) one row at a time, as the published code; ``(B, T, D)``."""
    out = []
    for row in x:
        feats = row.float()
        seed = feats[_fps_row(feats, k)]
        gram = seed @ seed.t()
        gram.diagonal().add_(ridge)
        coef = torch.linalg.solve(gram, seed @ feats.t()).t()
        errors = torch.norm(feats - coef @ seed, dim=-1)
        top = torch.topk(errors, k=t, dim=0)[1]

        feats = feats.clone()
        basis_mask = torch.zeros(feats.shape[0], dtype=torch.bool, device=x.device)
        basis_mask[top[-k:]] = True
        feats[basis_mask] = seed  # ascending position order, as boolean-mask assignment
        keep = torch.zeros_like(basis_mask)
        keep[top] = True
        retained = feats[top[:-k]]
        dropped = feats[~keep]
        sim = F.cosine_similarity(dropped.unsqueeze(1), retained.unsqueeze(0), dim=2)  # (N-T, T-k, D) inside
        nearest = sim.argmax(dim=1)
        merged = retained.scatter_add(0, nearest.unsqueeze(-1).expand(-1, feats.shape[1]), dropped)
        count = torch.bincount(nearest, minlength=retained.shape[0])
        feats[top[:-k]] = merged / (1 + count).unsqueeze(1)
        out.append(feats[top.sort().values].to(x.dtype))
    return torch.stack(out)


# -- timing -----------------------------------------------------------------------------


def _time_once(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _time(fns: dict, reps: dict, device: str, warmup: int) -> dict:
    """Median milliseconds of each ``fns[name]()`` over ``reps[name]`` runs.

    The functions are timed in alternation (A B A B ...), so a load change on a shared
    machine hits both alike.
    """
    fns = {name: fn for name, fn in fns.items() if reps[name] > 0}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for i in range(max(reps.values())):
        for name, fn in fns.items():
            if i < reps[name]:
                times[name].append(_time_once(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _peak_extra_mb(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 8 * 2**30


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, threads={torch.get_num_threads()}"


def run_config(b, n, d, args, dtype) -> dict:
    device = args.device
    t = n // 9
    row = {"B": b, "N": n, "D": d, "T": t, "k": K}
    elem = torch.tensor([], dtype=dtype).element_size()
    # ours holds about four float32 (B, N, D) tensors at once (input copy, FPS temp, residual, normalised)
    need_ours = b * n * d * (elem + 16)
    if need_ours > args.max_gb * 2**30 or need_ours > 0.8 * _available_bytes(device):
        row.update(ours_ms=None, ours_status=f"skipped: needs ~{need_ours / 2**30:.1f} GiB")
        return row
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, d, generator=gen).to(device=device, dtype=dtype)
    reducer = tokenreduce.create("apet-llava", budget=t, stage="vision_encoder", basis_tokens=K)

    def ours():
        return reducer(x).tokens

    for _ in range(args.warmup):
        ours()
    row["input_mb"] = x.numel() * elem / 2**20

    # The broadcast cosine similarity alone is (N - T) x (T - k) x D float32.
    broadcast = (n - t) * (t - K) * d * 4
    row["loop_broadcast_mb"] = broadcast / 2**20
    if broadcast > args.max_loop_gb * 2**30 or 3 * broadcast > _available_bytes(device):
        row["loop_status"] = f"skipped: broadcast needs {broadcast / 2**30:.1f} GiB"
        row["ours_ms"] = _time({"ours": ours}, {"ours": args.reps}, device, 0)["ours"]
        row["ours_peak_mb"] = _peak_extra_mb(ours, device)
        return row
    try:
        first = _time_once(lambda: loop_apet(x, t), device) / 1e3
        # Same algorithm, same result: check before comparing times.
        ref, got = loop_apet(x, t), ours()
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        row["max_abs_diff"] = float((got.float() - ref.float()).abs().max())
        mismatch = not torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol)
        del ref, got
        loop_reps = 0 if first > args.loop_budget_s else max(1, min(args.reps, int(args.loop_budget_s / first)))
        fns = {"ours": ours, "loop": lambda: loop_apet(x, t)}
        timed = _time(fns, {"ours": args.reps, "loop": loop_reps}, device, 0)  # no loop entry if loop_reps == 0
        row["ours_ms"] = timed["ours"]
        row["ours_peak_mb"] = _peak_extra_mb(ours, device)
        if loop_reps:
            row["loop_ms"] = timed["loop"]
            row["loop_peak_mb"] = _peak_extra_mb(fns["loop"], device)
            row["loop_status"] = f"ok ({loop_reps} runs)"
        else:
            row.update(loop_ms=first * 1e3, loop_status=f"single run ({first:.1f} s > budget)")
        if mismatch:  # never report a speed-up over a different result
            row["loop_status"] = f"MISMATCH (max abs diff {row['max_abs_diff']:.3g})"
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        row.update(loop_ms=None, loop_status=f"out of memory ({type(err).__name__})")
        if device == "cuda":
            torch.cuda.empty_cache()
        row["ours_ms"] = _time({"ours": ours}, {"ours": args.reps}, device, 0)["ours"]
        row["ours_peak_mb"] = _peak_extra_mb(ours, device)
    if row.get("loop_ms") and row.get("ours_ms") and row["loop_status"].startswith(("ok", "single")):
        row["speedup"] = row["loop_ms"] / row["ours_ms"]
    return row


# -- reporting --------------------------------------------------------------------------


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


COLUMNS = [
    ("B", "B", "d"),
    ("N", "N", "d"),
    ("D", "D", "d"),
    ("T", "T", "d"),
    ("ours ms", "ours_ms", ".2f"),
    ("loop ms", "loop_ms", ".1f"),
    ("speedup", "speedup", ".1f"),
    ("ours peak MiB", "ours_peak_mb", ".0f"),
    ("loop peak MiB", "loop_peak_mb", ".0f"),
    ("input MiB", "input_mb", ".0f"),
    ("loop broadcast MiB", "loop_broadcast_mb", ".0f"),
    ("loop status", "loop_status", "s"),
]


def _cells(row: dict) -> list[str]:
    status = row.get("loop_status") or row.get("ours_status") or ""
    return [status if spec == "s" else _fmt(row.get(key), spec) for _, key, spec in COLUMNS]


def to_markdown(meta: dict, rows: list[dict]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [
        f"# ApET overhead on {meta['device_name']}",
        "",
        f"torch {meta['torch']}, dtype {meta['dtype']}, k={K}, T=N/9, {meta['date']}; command: `{meta['command']}`",
        "",
        f"Median of {meta['reps']} runs, ours and loop timed in alternation. Load average at start: "
        f"{meta['load_average']}. Peak MiB: extra CUDA memory above the inputs (CUDA only); loop "
        "broadcast MiB: size of the loop version's (N-T) x (T-k) x D cosine intermediate per row.",
        "",
        head,
        sep,
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    return "\n".join(lines) + "\n"


def print_table(meta: dict, rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(to_markdown(meta, rows))
        return
    table = Table(title=f"ApET overhead ({meta['device_name']}, {meta['dtype']})")
    for name, _, _ in COLUMNS:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(*_cells(r))
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--quick", action="store_true", help="a small grid (CPU: a minute or two)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default: 20 on CUDA, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--loop-budget-s", type=float, default=None, help="time budget of the loop version per config")
    parser.add_argument("--max-loop-gb", type=float, default=None, help="largest broadcast the loop version may build")
    parser.add_argument("--max-gb", type=float, default=None, help="largest input our reducer is run on")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/apet_overhead_<device>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    args.reps = args.reps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.loop_budget_s = args.loop_budget_s or (10.0 if cuda else 20.0)
    args.max_loop_gb = args.max_loop_gb or (60.0 if cuda else 2.0)
    args.max_gb = args.max_gb or (70.0 if cuda else 6.0)
    dtype = getattr(torch, args.dtype)

    grid = QUICK_GRID if args.quick else FULL_GRID
    meta = {
        "title": f"ApET overhead vs a per-row loop like the published code ({args.device})",
        "device": args.device,
        "device_name": _device_name(args.device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "load_average": [round(v, 1) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "loop_budget_s": args.loop_budget_s,
    }
    rows = []
    for b, n, d in grid:
        rows.append(run_config(b, n, d, args, dtype))
        r = rows[-1]
        status = r.get("loop_status") or r.get("ours_status") or ""
        print(f"B={b} N={n} D={d}: ours {_fmt(r.get('ours_ms'))} ms, loop {_fmt(r.get('loop_ms'), '.1f')} ms {status}")
    print_table(meta, rows)
    out = args.out or RESULTS / f"apet_overhead_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(meta, rows))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
