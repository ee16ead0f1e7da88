"""ApET on CUDA as one CUDA-graph replay per input shape.

At LLaVA sizes ApET's GPU work is about half a millisecond, but launching its ~250
small kernels one by one from Python costs several milliseconds of host time (see
``benchmarks/results/apet_profile_cuda_eager.txt``). For the common case (CUDA, no padding,
one budget for every row, deterministic basis selection) the sync-free form of the
algorithm is captured once per (shape, dtype, parameters, stage) and replayed: the same
kernels on the same inputs, so the same bits, for one launch. Anything else (padding,
ragged budgets, CPU, random bases, inputs that need gradients) runs eagerly. A capture
that fails is remembered and that shape runs eagerly from then on.

A captured graph keeps its buffers (the static input and every intermediate, a few times
the input's size) on the GPU for as long as it is cached. Inputs above
``_MAX_GRAPH_ELEMENTS`` therefore run eagerly: there the GPU work takes longer than
launching it, and the eager path, which never waits on the GPU, overlaps the two.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from tokenreduce import Reduction

_MAX_GRAPHS = 16  # shapes kept per process; each holds its static buffers on the GPU
# 2^25 elements: 128 MiB in float32, e.g. LLaVA-1.5's 576 x 4096 projector output up to batch 14.
_MAX_GRAPH_ELEMENTS = 2**25
_graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, Reduction]] = OrderedDict()
_failed: set[tuple] = set()
_lock = threading.Lock()


def graphable(reducer: Any, tokens: torch.Tensor) -> bool:
    """Whether a call without padding and with one budget for all rows can use a captured graph."""
    p = reducer.params
    return (
        tokens.is_cuda
        and tokens.numel() <= _MAX_GRAPH_ELEMENTS
        and tokens.dtype != torch.float64
        and p.basis_selection == "fps"
        and p.fps_start == "first"
        # A replay's outputs are not connected to the input's autograd graph.
        and not (tokens.requires_grad and torch.is_grad_enabled())
        and not torch.cuda.is_current_stream_capturing()
    )


def _clone(out: Reduction) -> Reduction:
    info = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in out.info.items()}
    sizes = None if out.sizes is None else out.sizes.clone()
    return Reduction(out.tokens.clone(), out.indices.clone(), out.keep_mask.clone(), out.valid.clone(), sizes, info)


def replay_graph(reducer: Any, tokens: torch.Tensor, t: int, stage: Any) -> Reduction:
    """Run ``reducer._reduce`` on ``tokens`` (every row valid, every row keeping ``t``) via a CUDA graph."""
    b, n, d = tokens.shape
    key = (type(reducer), reducer.params, stage, b, n, d, t, tokens.dtype, tokens.device)

    def run(x: torch.Tensor) -> Reduction:
        counts = torch.full((b,), t, dtype=torch.long, device=x.device)
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        return reducer._reduce(x, counts, valid, active, stage, t, sync_free=True, dense=True)

    with _lock:
        if key in _failed:
            return run(tokens)
        entry = _graphs.get(key)
        if entry is None:
            try:
                entry = _capture(run, tokens)
            except RuntimeError:
                _failed.add(key)
                return run(tokens)
            _graphs[key] = entry
            while len(_graphs) > _MAX_GRAPHS:
                _graphs.popitem(last=False)
        _graphs.move_to_end(key)
        graph, static, out = entry
        # The buffers were made under inference mode; updating them needs it too, whatever
        # mode the caller is in.
        with torch.inference_mode():
            static.copy_(tokens)
            graph.replay()
        # Outputs live in the graph's buffers, which the next replay overwrites. The clones
        # are ordinary tensors outside inference mode, as the eager path's would be.
        return _clone(out)


@torch.inference_mode()
def _capture(run: Any, tokens: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, Reduction]:
    # Always under inference mode, so one graph serves callers in and out of it.
    static = tokens.clone()
    side = torch.cuda.Stream(device=tokens.device)
    side.wait_stream(torch.cuda.current_stream(tokens.device))
    with torch.cuda.stream(side):
        run(static)  # warm-up outside capture: library handles, workspaces, allocator pools
    torch.cuda.current_stream(tokens.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(static)
    return graph, static, out
