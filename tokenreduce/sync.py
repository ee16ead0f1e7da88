"""Host synchronisation: where a reducer may read device values, and a detector for tests.

On an accelerator, reading a value on the host (``.item()``, ``int(t)``, ``bool(t)``,
``.tolist()``, an output whose shape depends on the data such as ``nonzero``) waits until
every queued kernel has run: the host stops queueing work, and a CUDA graph cannot be
captured. Reducers therefore decide everything from host-known sizes (shapes, budgets,
``context.uniform_count``) and read values only where that is free, on CPU
(:func:`host_reads_free`), for checks such as "no NaN score".

:func:`no_host_sync` proves it on a CPU-only machine: inside it, CPU tensors take the
accelerator branches (:func:`host_reads_free` is false) and the usual sync points raise
:class:`HostSyncError`. ``tests/test_graph_safe.py`` runs every ``graph_safe`` reducer
under it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ACCELERATOR_BRANCHES: ContextVar[bool] = ContextVar("tokenreduce_accelerator_branches", default=False)
_patch_lock = threading.Lock()
_host_tensor = torch.tensor


class HostSyncError(RuntimeError):
    """An operation that reads a device value on the host ran where none may (inside :func:`no_host_sync`)."""


def host_reads_free(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs no device synchronisation.

    True for CPU tensors, where a reducer may check values (a NaN score, say) or take a
    data-dependent shortcut; false on accelerators, and inside :func:`no_host_sync`, which
    makes CPU tensors take the accelerator branches.
    """
    return t.device.type == "cpu" and not _ACCELERATOR_BRANCHES.get()


def device_list(values: list[int], device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values as a tensor on ``device``, without waiting for the device.

    ``torch.tensor(values, device="cuda")`` copies synchronously: the host stops until every
    kernel queued before it has run (a vision tower, say), and its launches after that are
    exposed. A non-blocking copy from ordinary (pageable) memory is staged by the driver
    before the call returns, so the temporary may go at once, and is ordered on the stream
    like a kernel.
    """
    host = _host_tensor(values, dtype=dtype)  # not the name no_host_sync() guards: this copy is the sanctioned one
    return host if torch.device(device).type == "cpu" else host.to(device, non_blocking=True)


def _refuse(what: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise HostSyncError(
            f"{what} reads a device value on the host (a synchronisation on CUDA, and an error in a CUDA "
            "graph capture); use host-known sizes (context.uniform_count, shapes) instead"
        )

    return refuse


def _guard_from_data(original: Any, what: str) -> Any:
    @functools.wraps(original)
    def from_data(data: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(data, torch.Tensor):
            _refuse(f"{what} of host data (a host-to-device copy, which waits for the device)")()
        return original(data, *args, **kwargs)

    return from_data


def _patches() -> list[tuple[Any, str, Any]]:
    """``(owner, attribute, replacement)``: reads that CPU tensors make without any aten op.

    Plain methods and functions only: assigning a dunder (``__getitem__``, ``__bool__``) on
    ``torch.Tensor`` rewrites C type slots that deleting it does not all restore; those
    reads are caught as aten ops by :class:`_Detector` instead."""
    t = torch.Tensor
    out: list[tuple[Any, str, Any]] = [(t, name, _refuse(f"Tensor.{name}()")) for name in ("tolist", "numpy", "cpu")]
    out.append((torch, "tensor", _guard_from_data(torch.tensor, "torch.tensor()")))
    out.append((torch, "as_tensor", _guard_from_data(torch.as_tensor, "torch.as_tensor()")))
    return out


def _aten(*names: str) -> frozenset:
    ops = torch.ops.aten
    return frozenset(getattr(ops, n) for n in names if hasattr(ops, n))


#: aten ops whose result is read on the host or whose output size depends on the data.
_SYNC_OPS = _aten(
    "_local_scalar_dense",  # .item(), bool(t), int(t), float(t), t.__index__(), `if t:`
    "is_nonzero",
    "equal",
    "allclose",
    "nonzero",  # also torch.where(cond), argwhere, boolean-mask indexing inside composite ops
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "bincount",
)
_INDEX_OPS = _aten("index", "index_put", "index_put_", "_index_put_impl_")
_REPEAT = _aten("repeat_interleave")


class _Detector(TorchDispatchMode):
    """Refuses the aten ops that synchronise on CUDA (see :data:`_SYNC_OPS`)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _SYNC_OPS:
            _refuse(f"{packet.__name__} (from .item(), bool(), int(), nonzero, unique, ...)")()
        if packet in _INDEX_OPS and len(args) > 1:
            masks = [i for i in args[1] if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
            if masks:
                _refuse(f"{packet.__name__} with a boolean mask (its size depends on the data)")()
        if packet in _REPEAT and func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None:
            _refuse("repeat_interleave with tensor repeats and no output_size")()
        return func(*args, **kwargs)


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Run the enclosed code as if on an accelerator, refusing every host read.

    Inside: :func:`host_reads_free` is false, so CPU tensors take the branches that run on
    CUDA; and every aten op that reads a device value on the host or sizes its output by
    the data raises :class:`HostSyncError` (``.item()``, ``bool/int/float`` of a tensor,
    ``if t:``, ``nonzero``, ``torch.where(cond)``, boolean-mask indexing and assignment,
    ``unique``, ``masked_select``, ``bincount``, ``repeat_interleave`` with tensor repeats,
    ``torch.equal``, ``torch.allclose``), as do ``Tensor.tolist/numpy/cpu`` and ``torch.tensor``/``torch.as_tensor``
    of host data.

    Not seen on CPU: a ``.to(device)`` of a tensor made on the host (a host-to-device copy
    on CUDA; the GPU test, ``tests/test_gpu_graphs.py``, catches those with
    ``torch.cuda.set_sync_debug_mode("error")``). The patches are process-wide while the
    block runs: use it in tests, one thread at a time.
    """
    with _patch_lock:
        patches = _patches()
        saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name, _ in patches]
        token = _ACCELERATOR_BRANCHES.set(True)
        try:
            for owner, name, replacement in patches:
                setattr(owner, name, replacement)
            with _Detector():
                yield
        finally:
            for owner, name, original in saved:
                if original is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
            _ACCELERATOR_BRANCHES.reset(token)


_MISSING = object()

__all__ = ["HostSyncError", "device_list", "host_reads_free", "no_host_sync"]
