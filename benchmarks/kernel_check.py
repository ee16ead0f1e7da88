"""Fused Triton greedy loops (CDPruner, DivPrune) against their torch loops, on the GPU.

For N=576 T=64 at B=1 and B=8, and N=2880 T=320 at B=8 (D=4096, bfloat16 tokens, the
synthetic context of :mod:`benchmarks.reducer_overhead`): checks that the fused kernel
picks what the torch loop picks, then times the full reducer called through
``tokenreduce`` (replayed from its CUDA graph, as a user gets it) with the kernels and
with ``TOKENREDUCE_NO_TRITON=1``: warm-up, then ``--reps`` calls of each, interleaved
(alternating which goes first), each bracketed by CUDA events; medians in ms. ::

    python -m benchmarks.kernel_check [--reps 50]

The graph cache does not key on the environment variable, so the torch-loop variant is a
subclass of the reducer (its own graph), captured with the variable set.
On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

import tokenreduce
from tokenreduce import Stage, graphs
from tokenreduce_plugins import kernels

from .reducer_overhead import synthetic_context

POINTS = ((576, 1, 64), (576, 8, 64), (2880, 8, 320))  # (N, B, T)
WIDTH = 4096


@contextmanager
def torch_loop(on: bool) -> Iterator[None]:
    """``TOKENREDUCE_NO_TRITON=1`` inside when ``on``; unset otherwise."""
    before = os.environ.pop(kernels.DISABLE_ENV, None)
    if on:
        os.environ[kernels.DISABLE_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(kernels.DISABLE_ENV, None)
        if before is not None:
            os.environ[kernels.DISABLE_ENV] = before


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    rows = (a != b).any(dim=1).nonzero()[:, 0].tolist()
    if not rows:
        return "same picks"
    step = int((a[rows[0]] != b[rows[0]]).nonzero()[0, 0])
    return f"picks DIFFER in {len(rows)} row(s); row {rows[0]} from step {step} (a near-tie, or a bug)"


def time_both(calls: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median ms of each call, interleaved: rep i runs them in order, or reversed for odd i."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            with torch_loop(name == "torch loop"):
                calls[name]()
    torch.cuda.synchronize()
    events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
              for name in names}  # fmt: skip
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            start, end = events[name][i]
            with torch_loop(name == "torch loop"):
                start.record()
                calls[name]()
                end.record()
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in events[name]) for name in names}


def check(name: str, n: int, b: int, t: int, reps: int, warmup: int) -> str:
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randn(b, n, WIDTH, generator=gen, device="cuda").to(torch.bfloat16)
    context = synthetic_context(tokens, Stage.PROJECTOR, gen)
    fused = tokenreduce.create(name, t, stage=Stage.PROJECTOR)
    cls = type(fused)
    plain = type(f"{cls.__name__}TorchLoop", (cls,), {})(t, stage=Stage.PROJECTOR)  # its own cached graph
    with torch.inference_mode():
        with torch_loop(True):
            want = plain(tokens, context=context)  # eager, then captured with the torch loop
        with torch_loop(False):
            got = fused(tokens, context=context)  # eager, then captured with the fused kernel
        same = first_difference(got.info["selection_order"], want.info["selection_order"])
        ms = time_both(
            {"fused": lambda: fused(tokens, context=context), "torch loop": lambda: plain(tokens, context=context)},
            reps,
            warmup,
        )
    failed = list(graphs.stats()["failed"].values())
    path = "graph" if not failed else f"EAGER ({failed[0]})"
    graphs.clear(empty_cache=False)
    return (
        f"| {name} | {n} | {b} | {t} | {same} | {ms['fused']:.3f} | {ms['torch loop']:.3f} | "
        f"{ms['torch loop'] / ms['fused']:.1f}x | {path} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_check", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30, help="timed calls of each variant (at least 20)")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    if args.reps < 20:
        p.error("--reps must be at least 20")
    if not torch.cuda.is_available():
        print("kernel_check: CUDA is missing; nothing to check on this machine.")
        return 0
    if kernels.greedy_module() is None:
        print("kernel_check: Triton does not import here; the fused kernels cannot run.")
        return 1
    print(f"{torch.cuda.get_device_name()}, D={WIDTH}, bfloat16, median ms of the reducer (CUDA graph replay)")
    print("| reducer | N | B | T | fused vs torch loop | fused ms | torch loop ms | speed-up | path |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("cdpruner", "divprune"):
        for n, b, t in POINTS:
            print(check(name, n, b, t, args.reps, args.warmup), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
