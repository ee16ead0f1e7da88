"""CUDA-graph replay of sync-free reducers: one captured graph per call signature.

Launching a reducer's kernels one by one from Python costs several microseconds each; a
method with a greedy loop launches hundreds, so its host time is milliseconds while the
GPU needs a fraction of that. A reducer whose hot path never reads a device value on the
host (see :mod:`tokenreduce.sync`) declares ``graph_safe = True``. A call on CUDA without
a padding mask (every row keeps the same count ``T``) is then captured once per signature
and replayed: the same kernels on the same inputs, so the same bits, for one launch.

Signature: reducer class and parameters, the count ``T``, the stage and every other
context value that is not a tensor, the layout (shape, strides, dtype, device, alignment)
of the tokens and of every context tensor, and the settings that choose kernels (autocast,
TF32, reduced-precision reductions, deterministic algorithms). Tensors are copied into the
graph's static inputs before a replay (laid out as the caller's, so the kernels are those
the eager call would run); the graph's last kernel packs every output into one byte buffer,
cloned out in one copy after it and handed back as views (:func:`_pack`). Every
context tensor is an input (a reducer may read a field it does not require, such as
``text_mask``), but one the captured call provably never reads (no operator of the
warm-up received it, and overwriting it changes no output bit: :func:`_unread_inputs`) is
not copied before replays: a context carrying tensors a reducer ignores costs no copies.

The eager call is used instead where a graph cannot be (not CUDA, inputs that need
gradients, inside another capture, tokens above ``max_elements``, a context value that is
not hashable, a context tensor on another device) and for every later call of a signature
whose capture failed (remembered, with the reason: :func:`stats`). The first call of a
signature runs eagerly (so input errors surface as usual) and then captures. Inside
:func:`eager` every call runs eagerly (for timing both paths, and debugging).

Memory: a graph holds its static inputs, outputs and intermediates on the GPU
(:func:`memory_held`, measured at capture). The cache keeps at most ``max_graphs`` graphs
and ``max_bytes`` bytes, least recently used out first; :func:`clear` releases them all;
:func:`configure` changes the limits.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .reduction import Reduction
from .validation import check_finite

if TYPE_CHECKING:
    from .context import ReductionContext
    from .reducer import Reducer

_limits: dict[str, int] = {
    "max_graphs": 16,
    # 2^27 elements (LLaVA-NeXT's 2928 x 4096 tokens at batch 8, 256 MiB in bfloat16). Even there
    # a replay pays: ApET at 2880 x 4096 x 8 takes 3.2 ms replayed, 4.2-7.2 ms launched from
    # Python on H200 hosts of different speeds. A graph pins several times its input; max_bytes
    # bounds the cache as a whole.
    "max_elements": 2**27,
    "max_bytes": 4 * 2**30,
}
_MAX_FAILED = 1024  # remembered failed signatures (each a small tuple)
_ALIGN = 256  # bytes: kernels choose vector widths by pointer alignment; static inputs copy it

_graphs: OrderedDict[tuple, _Entry] = OrderedDict()
_failed: OrderedDict[tuple, str] = OrderedDict()
_lock = threading.RLock()
# One capture stream per device, kept: warm-up and capture share it (library workspaces are
# per stream), and the blocks its warm-ups free stay reusable by the next warm-up.
_capture_streams: dict[torch.device, torch.cuda.Stream] = {}
_EAGER: ContextVar[bool] = ContextVar("tokenreduce_graphs_eager", default=False)


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # static inputs, one per distinct input tensor
    output: Reduction
    nbytes: int
    done: torch.cuda.Event  # recorded after the last clone-out; the next copy-in waits for it
    # Indices of the inputs copied in before a replay: every input the captured call reads
    # (all of them but context tensors it provably never reads: _unread_inputs), the tokens (0)
    # on their own (copied in with NaN and inf zeroed), the others grouped by dtype: one
    # _foreach_copy_ launch per group instead of one copy per tensor (_copy_groups).
    copy: tuple[tuple[int, ...], ...]
    # Every output tensor, packed by the graph into one byte buffer (_pack): a replay's outputs
    # are one clone of it (one launch, not one per tensor) and views into that clone.
    arena: torch.Tensor
    plan: tuple[tuple[torch.dtype, int, torch.Size, tuple[int, ...]], ...]  # per output: dtype, offset, shape, strides


def reduce_uniform(
    reducer: Reducer, tokens: torch.Tensor, t: int, context: ReductionContext, total: torch.Tensor | None = None
) -> Reduction:
    """``reducer.reduce`` on ``tokens (B, N, D)``, every token valid and every row keeping ``t``.

    From a captured CUDA graph where that is possible (``reducer.graph_safe``, CUDA, ...;
    see the module docstring), else eagerly; the result is the same bit for bit.

    ``total``: the tokens' pending finiteness check (:func:`tokenreduce.validation.pending_sum`).
    An eager call reads it before it runs; a replay reads it once its work is queued (the host
    then waits for the GPU only at the end of the call), having copied the tokens in with
    every NaN and infinity zeroed, so that no kernel of the graph ever sees one; inside
    :func:`tokenreduce.validation.deferred_checks` it reads it with the block's other checks.
    """
    if not _eligible(reducer, tokens):
        return _eager(reducer, tokens, t, context, total)
    sig = _signature(reducer, tokens, t, context)
    if sig is None:
        return _eager(reducer, tokens, t, context, total)
    key, tensors, rebuild = sig
    with _lock:
        if key in _failed:
            return _eager(reducer, tokens, t, context, total)
        entry = _graphs.get(key)
        if entry is None:
            out = _eager(reducer, tokens, t, context, total)  # input errors surface here, as without graphs
            try:
                entry = _capture(lambda *static: _eager(reducer, static[0], t, rebuild(static)), tensors)
            except Exception as err:  # noqa: BLE001 - any capture failure means "run eagerly"
                _remember_failure(key, f"{type(err).__name__}: {err}")
                return out
            if entry.nbytes > _limits["max_bytes"]:
                _remember_failure(key, f"graph holds {entry.nbytes} bytes > max_bytes={_limits['max_bytes']}")
                return out
            _graphs[key] = entry
            _evict()
            return out
        _graphs.move_to_end(key)
        out = _replay(entry, tensors, sanitize=total is not None)
    if total is not None:  # the graph saw the tokens with NaN and inf zeroed: the read may wait
        check_finite(tokens, total=total, deferrable=True)
    return out


@contextmanager
def eager() -> Iterator[None]:
    """Run every reducer call in the block eagerly (no capture, no replay; the cache is kept).

    For timing both paths side by side (``benchmarks/reducer_overhead.py``) and for debugging.
    """
    token = _EAGER.set(True)
    try:
        yield
    finally:
        _EAGER.reset(token)


def memory_held() -> int:
    """Bytes of GPU memory held by the cached graphs (static inputs, outputs, intermediates)."""
    with _lock:
        return sum(e.nbytes for e in _graphs.values())


def clear(*, empty_cache: bool = True) -> int:
    """Drop every cached graph and forget failed captures; returns the bytes the graphs held.

    ``empty_cache``: also return the freed blocks to the driver (``torch.cuda.empty_cache``).
    """
    with _lock:
        held = sum(e.nbytes for e in _graphs.values())
        while _graphs:
            _drop(_graphs.popitem(last=False)[1])
        _failed.clear()
    if empty_cache and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return held


def configure(
    *, max_graphs: int | None = None, max_elements: int | None = None, max_bytes: int | None = None
) -> dict[str, int]:
    """Change the cache limits (``max_graphs=0`` turns graphs off); returns the previous limits."""
    new = {"max_graphs": max_graphs, "max_elements": max_elements, "max_bytes": max_bytes}
    for name, value in new.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"graphs.configure: {name} must be an int >= 0, got {value!r}")
    with _lock:
        previous = dict(_limits)
        _limits.update({k: v for k, v in new.items() if v is not None})
        _evict()
    return previous


def stats() -> dict[str, Any]:
    """Cache state: ``graphs`` (count), ``bytes`` held, ``failed`` (signature -> reason), the limits,
    and ``entries``: per cached graph its reducer name, ``T``, token shape and bytes (most recent last)."""
    with _lock:
        return {
            "graphs": len(_graphs),
            "bytes": sum(e.nbytes for e in _graphs.values()),
            "failed": {_describe(k): reason for k, reason in _failed.items()},
            "limits": dict(_limits),
            "entries": [{**_describe_dict(k), "bytes": e.nbytes} for k, e in _graphs.items()],
        }


# -- internals -------------------------------------------------------------------------


def _eager(
    reducer: Reducer, tokens: torch.Tensor, t: int, context: ReductionContext, total: torch.Tensor | None = None
) -> Reduction:
    if total is not None:
        check_finite(tokens, total=total)
    b, n, _ = tokens.shape
    counts = torch.full((b,), t, dtype=torch.long, device=tokens.device)
    valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    return reducer.reduce(tokens, counts, valid, context)


def _eligible(reducer: Reducer, tokens: torch.Tensor) -> bool:
    return (
        bool(getattr(reducer, "graph_safe", False))
        and tokens.is_cuda
        and 0 < tokens.numel() <= _limits["max_elements"]
        and _limits["max_graphs"] > 0
        and not _EAGER.get()
        # A replay's outputs are not connected to the inputs' autograd graph.
        and not (tokens.requires_grad and torch.is_grad_enabled())
        and not torch.cuda.is_current_stream_capturing()
    )


def _settings() -> tuple:
    """Global settings that choose kernels: a graph captured under one must not serve another."""
    m = torch.backends.cuda.matmul
    return (
        torch.is_autocast_enabled("cuda"),
        torch.get_autocast_dtype("cuda"),
        torch.get_float32_matmul_precision(),
        m.allow_tf32,
        m.allow_fp16_reduced_precision_reduction,
        m.allow_bf16_reduced_precision_reduction,
        torch.are_deterministic_algorithms_enabled(),
        os.environ.get("TOKENREDUCE_NO_TRITON", ""),  # plugins choose fused Triton kernels by it
    )


def _signature(
    reducer: Reducer, tokens: torch.Tensor, t: int, context: ReductionContext
) -> tuple[tuple, list[torch.Tensor], Callable[[tuple], ReductionContext]] | None:
    """``(key, distinct input tensors, rebuild)`` or ``None`` when this call cannot use a graph.

    ``rebuild(static)`` makes the context the captured call sees: the same non-tensor
    values, each tensor replaced by its static copy (a tensor passed twice, e.g. the tokens
    as ``keys``, stays one input)."""
    tensors: list[torch.Tensor] = [tokens]
    layouts: list[tuple] = []

    def slot(v: torch.Tensor) -> int | None:
        for i, seen in enumerate(tensors):
            if v is seen:
                return i
        if v.device != tokens.device or (v.requires_grad and torch.is_grad_enabled()) or not _copyable(v):
            return None
        tensors.append(v)
        return len(tensors) - 1

    if not _copyable(tokens):
        return None
    fields: list[tuple[str, Any]] = []  # (name, ("tensor", slot) | ("value", v))
    extra: list[tuple[str, Any]] = []
    for name in _field_names(type(context)):
        v = getattr(context, name)
        if name == "extra":
            for k in sorted(v, key=str):
                ev = v[k]
                if isinstance(ev, torch.Tensor):
                    i = slot(ev)
                    if i is None:
                        return None
                    extra.append((k, ("tensor", i)))
                else:
                    extra.append((k, ("value", ev)))
        elif isinstance(v, torch.Tensor):
            i = slot(v)
            if i is None:
                return None
            fields.append((name, ("tensor", i)))
        else:
            fields.append((name, ("value", v)))
    layouts = [_layout(v) for v in tensors]
    key = (type(reducer), reducer.params, t, tuple(fields), tuple(extra), tuple(layouts), _settings())
    try:
        hash(key)
    except TypeError:  # a parameter or context value that is not hashable: no signature
        return None

    def rebuild(static: tuple) -> ReductionContext:
        values = {name: static[s[1]] if s[0] == "tensor" else s[1] for name, s in fields}
        values["extra"] = {k: static[s[1]] if s[0] == "tensor" else s[1] for k, s in extra}
        return type(context)(**values)

    return key, tensors, rebuild


def _field_names(cls: type) -> tuple[str, ...]:
    # dataclasses.fields() builds a tuple on every call; the signature runs per reducer call.
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _layout(v: torch.Tensor) -> tuple:
    # The pointer's alignment (largest power of two dividing it, up to what the allocator
    # guarantees for a fresh tensor: 512 bytes on CUDA, 64 on CPU): kernels pick vector
    # widths and GEMM algorithms by it.
    ptr = v.data_ptr()
    align = min(ptr & -ptr if ptr else _ALIGN, _ALIGN if v.is_cuda else 64)
    return (tuple(v.shape), v.stride(), v.dtype, v.device, align)


def _narrowed(v: torch.Tensor) -> torch.Tensor:
    """``v`` with every broadcast (stride 0) dimension cut to one entry: the elements it stores."""
    if 0 not in v.stride():  # the common case, on every copy-in: nothing to cut
        return v
    for dim, (size, stride) in enumerate(zip(v.shape, v.stride())):
        if stride == 0 and size > 1:
            v = v.narrow(dim, 0, 1)
    return v


def _copyable(v: torch.Tensor) -> bool:
    """Whether a static copy with ``v``'s exact layout can be written (no element stored twice
    except along broadcast dimensions) and ``v`` is a plain strided tensor."""
    if v.layout is not torch.strided or v.is_nested or v.numel() == 0:
        return False
    # A property of shape and strides alone, asked for every tensor of every call: remembered.
    layout = (v.shape, v.stride())
    ok = _COPYABLE.get(layout)
    if ok is None:
        ok = _overlap_free(v)
        if len(_COPYABLE) >= _MAX_COPYABLE:
            _COPYABLE.clear()
        _COPYABLE[layout] = ok
    return ok


_COPYABLE: dict[tuple, bool] = {}
_MAX_COPYABLE = 4096


def _overlap_free(v: torch.Tensor) -> bool:
    dims = sorted((st, size) for size, st in zip(_narrowed(v).shape, _narrowed(v).stride()) if size > 1)
    extent = 1
    for st, size in dims:
        if st < extent:
            return False
        extent = st * size
    return True


def _static_like(v: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor with ``v``'s shape, strides, dtype, device and pointer alignment."""
    span = 1 + sum((size - 1) * st for size, st in zip(v.shape, v.stride()))
    item = v.element_size()
    buf = torch.empty(span + _ALIGN // item, dtype=v.dtype, device=v.device)
    shift = ((v.data_ptr() - buf.data_ptr()) % _ALIGN) // item  # both pointers are multiples of item
    return buf.as_strided(v.shape, v.stride(), shift)


def _copy_in(static: torch.Tensor, v: torch.Tensor) -> None:
    _narrowed(static).copy_(_narrowed(v))


@torch.inference_mode()
def _capture(run: Callable[..., Reduction], tensors: list[torch.Tensor]) -> _Entry:
    # Always under inference mode, so one graph serves callers in and out of it.
    dev = tensors[0].device
    static = [_static_like(v) for v in tensors]
    for s, v in zip(static, tensors):
        _copy_in(s, v)
    side = _capture_streams.get(dev)
    if side is None:
        side = _capture_streams[dev] = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side), _Reads() as reads:
        run(*static)  # warm-up outside capture: library handles, workspaces, allocator pools
    before = torch.cuda.memory_reserved(dev)
    graph = torch.cuda.CUDAGraph()
    # capture_begin/end rather than torch.cuda.graph(), which also synchronises, collects
    # garbage and empties the allocator's cache on entry: a stall for the whole process.
    with torch.cuda.stream(side):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            out = run(*static)
        except BaseException:
            try:  # end the (invalidated) capture; the error worth reporting is the one above
                graph.capture_end()
            except Exception:  # noqa: BLE001, S110
                pass
            raise
        arena, plan = _pack(out)  # the last kernel of the graph
        graph.capture_end()
        # The graph's private pool: segments reserved during the capture (intermediates and outputs).
        pool = max(0, torch.cuda.memory_reserved(dev) - before)
        unread = _unread_inputs(graph, static, out, reads.storages)
    torch.cuda.current_stream(dev).wait_stream(side)
    inputs = sum(s.untyped_storage().nbytes() for s in static)
    copy = _copy_groups(static, [i for i in range(len(static)) if i not in unread])
    return _Entry(graph, static, out, pool + inputs, torch.cuda.Event(), copy, arena, plan)


def _copy_groups(static: list[torch.Tensor], read: list[int]) -> tuple[tuple[int, ...], ...]:
    """The inputs ``read`` in copy-in groups: the tokens (index 0) alone, the rest by dtype."""
    groups: dict[Any, list[int]] = {}
    for i in read:
        groups.setdefault("tokens" if i == 0 else static[i].dtype, []).append(i)
    return tuple(tuple(g) for g in groups.values())


def _pack(out: Reduction) -> tuple[torch.Tensor, tuple[tuple[torch.dtype, int, torch.Size, tuple[int, ...]], ...]]:
    """Every tensor of ``out`` as bytes, concatenated into one ``uint8`` buffer, and where each lies:
    per tensor its dtype, offset (in its elements), shape and contiguous strides.

    Widest elements first, so that every offset is a multiple of its tensor's element size
    (a view of the bytes as that dtype needs it). One concatenation: one kernel."""
    leaves: list[torch.Tensor] = []
    _map_tensors(out, leaves.append)
    order = sorted(range(len(leaves)), key=lambda i: -leaves[i].element_size())
    spans: dict[int, tuple[torch.dtype, int, torch.Size, tuple[int, ...]]] = {}
    offset = 0
    for i in order:
        v = leaves[i]
        strides = torch.empty(v.shape, device="meta").stride()
        spans[i] = (v.dtype, offset // v.element_size(), v.shape, strides)
        offset += v.numel() * v.element_size()
    parts = [leaves[i].reshape(-1).view(torch.uint8) for i in order]
    dev = leaves[0].device if leaves else torch.device("cuda")
    arena = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=dev)
    return arena, tuple(spans[i] for i in range(len(leaves)))


def _unpack(entry: _Entry) -> Reduction:
    """The outputs of the last replay, as views into one fresh copy of its packed bytes."""
    fresh = entry.arena.clone()
    n = fresh.numel()
    typed = {dt: fresh[: n // dt.itemsize * dt.itemsize].view(dt) for dt in {p[0] for p in entry.plan}}
    it = iter([typed[dt].as_strided(shape, strides, offset) for dt, offset, shape, strides in entry.plan])
    return _map_tensors(entry.output, lambda _: next(it))


class _Reads(TorchDispatchMode):
    """Records the storage of every tensor an operator receives (the warm-up's reads)."""

    def __enter__(self) -> _Reads:
        self.storages: set[int] = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        for v in tree_leaves((args, kwargs)):
            if isinstance(v, torch.Tensor):
                try:
                    self.storages.add(v.untyped_storage().data_ptr())
                except (RuntimeError, NotImplementedError):  # a tensor without storage (none here)
                    pass
        return func(*args, **(kwargs or {}))


def _unread_inputs(
    graph: torch.cuda.CUDAGraph, static: list[torch.Tensor], out: Reduction, storages: set[int]
) -> frozenset[int]:
    """Context inputs the captured call never reads: no copy-in before their replays.

    A context may carry tensors a reducer ignores (the benchmark's full context, an adapter
    preparing several steps' needs), each a device copy per replay. Candidates: float and
    bool inputs (not the tokens) that no operator of the warm-up received. A kernel launched
    outside PyTorch's operators (Triton, an extension) could read one unseen, so the
    candidates are proven unread: the graph is replayed, then replayed again with them
    overwritten (NaN, bools flipped), and must give the same bits; else every input is copied.
    Integer inputs are always copied (an overwritten index could fault such a kernel)."""
    unread = [
        i
        for i, s in enumerate(static)
        if i > 0
        and (s.dtype.is_floating_point or s.dtype == torch.bool)
        and s.untyped_storage().data_ptr() not in storages
    ]
    if not unread:
        return frozenset()
    graph.replay()
    before = _clone(out)
    for i in unread:
        stored = _narrowed(static[i])
        if stored.dtype == torch.bool:
            stored.logical_not_()
        else:
            stored.fill_(float("nan"))
    graph.replay()
    return frozenset(unread) if _same(out, before) else frozenset()


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of two results (``NaN`` equal to ``NaN`` at the same place)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype.is_floating_point or a.dtype.is_complex:
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, Reduction):
        return all(_same(getattr(a, name), getattr(b, name)) for name in _field_names(Reduction))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _replay(entry: _Entry, tensors: list[torch.Tensor], sanitize: bool = False) -> Reduction:
    """Copy the inputs in, replay, and return the outputs (``sanitize``: the tokens copied in with
    every NaN and infinity zeroed; the caller checks the originals)."""
    stream = torch.cuda.current_stream(tensors[0].device)
    # The buffers were made under inference mode; updating them needs it too.
    with torch.inference_mode():
        stream.wait_event(entry.done)  # an earlier caller's clone-out, perhaps on another stream
        for group in entry.copy:
            if group == (0,) and sanitize:  # the same single pass as a copy
                torch.nan_to_num(
                    _narrowed(tensors[0]), nan=0.0, posinf=0.0, neginf=0.0, out=_narrowed(entry.inputs[0])
                )
            elif len(group) == 1:
                _copy_in(entry.inputs[group[0]], tensors[group[0]])
            else:  # one launch for the group (a per-tensor loop where layouts rule the fused kernel out)
                torch._foreach_copy_([_narrowed(entry.inputs[i]) for i in group], [_narrowed(tensors[i]) for i in group])
        entry.graph.replay()
    # Outputs live in the graph's buffers, which the next replay overwrites: one clone of their
    # packed bytes, ordinary tensors outside inference mode, as the eager call's would be.
    out = _unpack(entry)
    entry.done.record(stream)
    return out


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` (a Reduction, dict, list, tuple, tensor, or other) with ``fn`` applied to every
    tensor in it, in a fixed order (the same for the same structure)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Reduction):
        return Reduction(**{name: _map_tensors(getattr(value, name), fn) for name in _field_names(Reduction)})
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _clone(value: Any) -> Any:
    return _map_tensors(value, torch.Tensor.clone)


def _evict() -> None:
    while _graphs and (
        len(_graphs) > _limits["max_graphs"] or sum(e.nbytes for e in _graphs.values()) > _limits["max_bytes"]
    ):
        _drop(_graphs.popitem(last=False)[1])


def _drop(entry: _Entry) -> None:
    # Its buffers go back to the allocator: first let its last replay and clone-out finish (each
    # replay waits for the one before, so that is all of them). A host wait, on eviction only.
    entry.done.synchronize()


def _remember_failure(key: tuple, reason: str) -> None:
    _failed[key] = reason.splitlines()[0][:300] if reason else "failed"
    while len(_failed) > _MAX_FAILED:
        _failed.popitem(last=False)


def _describe_dict(key: tuple) -> dict[str, Any]:
    cls, params, t, fields, _, layouts, _ = key
    stage = dict(fields).get("stage", ("value", None))[1]
    return {
        "reducer": getattr(cls, "name", cls.__name__),
        "stage": getattr(stage, "value", stage),
        "T": t,
        "shape": layouts[0][0],
        "dtype": str(layouts[0][2]).replace("torch.", ""),
    }


def _describe(key: tuple) -> str:
    d = _describe_dict(key)
    return f"{d['reducer']}@{d['stage']} T={d['T']} tokens {d['shape']} {d['dtype']}"


__all__ = ["clear", "configure", "eager", "memory_held", "reduce_uniform", "stats"]
