"""The fast path's vision tower: its forward replayed from a CUDA graph, one per pixel shape.

A CLIP/SigLIP tower at batch 1 launches a few hundred small kernels; replayed from a
graph it costs one launch (LLaVA-1.5's tower + projector: 2.1 ms replayed on an H200).
The graph is captured on the first call of a shape (after a warm-up call on a side
stream) and replayed afterwards: the same kernels on a static copy of the input, so the
same results. The outputs are the graph's static buffers, valid until the next call of
that shape; callers (the adapters' ``encode``) read them right away. Calls with
gradients, on CPU, during another capture, or whose capture failed run the stock forward.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .fast_prefill import capture

MAX_GRAPHS = 8


class GraphedTower:
    """Installs itself as ``tower.forward`` (an instance attribute) until :meth:`remove`."""

    def __init__(self, tower: torch.nn.Module, graphs: OrderedDict | None = None):
        self.tower = tower
        self.saved = tower.__dict__.get("forward")
        self.stock = tower.forward
        # Captured graphs by call key; given when they outlive one patch (see fast_prefill.keep_graphs).
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, Any, int]] = (
            OrderedDict() if graphs is None else graphs
        )
        self.failed: set[tuple] = set()
        tower.forward = self

    def remove(self) -> None:
        """Give the tower its forward back; the graphs stay with whoever owns ``graphs``."""
        self.tower.__dict__.pop("forward", None)
        if self.saved is not None:
            self.tower.forward = self.saved

    def held_bytes(self) -> int:
        return sum(entry[3] for entry in self.graphs.values())

    def __call__(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        try:
            key = (tuple(pixel_values.shape), pixel_values.dtype, pixel_values.device, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:  # unhashable options: not a call this replays
            key = None
        if (
            key is None
            or args
            or not pixel_values.is_cuda
            or torch.is_grad_enabled()
            or torch.cuda.is_current_stream_capturing()
            or key in self.failed
        ):
            return self.stock(pixel_values, *args, **kwargs)
        entry = self.graphs.get(key) or self._capture(key, pixel_values, kwargs)
        if entry is None:
            return self.stock(pixel_values, *args, **kwargs)
        self.graphs.move_to_end(key)
        graph, static_in, out, _ = entry
        static_in.copy_(pixel_values)
        graph.replay()
        return out

    def _capture(self, key: tuple, pixel_values: torch.Tensor, kwargs: dict[str, Any]):
        static_in = pixel_values.clone()
        graph, out, nbytes = capture(lambda: self.stock(static_in, **kwargs), pixel_values.device)
        if graph is None:  # a shape that cannot be captured runs the stock forward from now on
            self.failed.add(key)
            return None
        entry = (graph, static_in, out, nbytes + static_in.numel() * static_in.element_size())
        self.graphs[key] = entry
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return entry
