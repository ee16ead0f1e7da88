"""Where ApET's time goes: a torch.profiler summary of one call (the issue asks for a trace
summary wherever a speed target is missed).

    python benchmarks/profile_apet.py --device cuda --batch 1 --tokens 576 --dim 1024
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import tokenreduce as tr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=25, help="rows of the profiler table")
    args = parser.parse_args()

    x = torch.randn(args.batch, args.tokens, args.dim, device=args.device)
    reducer = tr.create("apet", budget=args.tokens // 9, stage="projector")
    for _ in range(5):  # warm-up: kernels, allocator, registry
        reducer(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(10):
            reducer(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    sort = "cuda_time_total" if x.is_cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
