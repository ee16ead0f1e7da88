"""Graph-safe reducers read no device value on the host, proven on CPU.

Every registered reducer that declares ``graph_safe`` is run, at every stage it supports,
with its ``reduce`` inside :func:`tokenreduce.sync.no_host_sync`: CPU tensors take the
branches that run on CUDA and every usual sync point (``.item()``, ``bool(t)``,
``.tolist()``, ``nonzero``, a boolean-mask index, a tensor made from host data, ...)
raises. Its result must equal the ordinary CPU call bit for bit. Also here: the detector
itself, the parts of :mod:`tokenreduce.graphs` that need no GPU (signature, static
layouts, limits), and the CUDA formulations of ApET's basis selection checked on CPU.
The GPU side (replay equals eager) is ``tests/test_gpu_graphs.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce import ReductionContext, ScoringReducer, Stage, graphs
from tokenreduce.context import token_context
from tokenreduce.sync import HostSyncError, host_reads_free, no_host_sync
from tokenreduce_plugins.apet_basis import farthest_point_sampling

REGISTRY = tr.get_registry().reducers
GRAPH_SAFE = sorted(name for name, entry in REGISTRY.items() if getattr(entry.cls, "graph_safe", False))
PAIRS = [
    (name, stage)
    for name in GRAPH_SAFE
    for stage in sorted(REGISTRY[name].cls.stages, key=lambda s: list(Stage).index(s))
]
VIDEO_FIELDS = {"frames", "frame_index"}
#: The built-in reducers of issue 19 (the video ones too): each must stay graph-safe (the check itself is
#: the test below, over whatever the registry marks).
BUILTINS = (
    "random pool apet apet-llava apet-qwen fastv pdrop cls_attn visionzip tome dart divprune sparsevlm "
    "vispruner mustdrop cdpruner holov vscan holitom holitom-llm fastvid"
).split()


def test_the_built_in_image_reducers_declare_graph_safe():
    assert [n for n in BUILTINS if n not in GRAPH_SAFE] == []


def _video(cls: type) -> bool:
    return bool(VIDEO_FIELDS & cls.required_context) or "frames" in cls.required_context


def make_case(
    name: str,
    stage: Stage,
    *,
    b: int,
    side: int,
    frames: int,
    d: int,
    dtype: torch.dtype,
    seed: int,
    duplicate: bool,
    budget: int | float,
    device: str = "cpu",
) -> tuple[torch.Tensor, ReductionContext, int | float, dict]:
    """Tokens, a context like an adapter's (token_context; video methods: ``frames`` frames of
    ``side x side``, else one ``side x side`` image), the budget and the reducer's params."""
    cls = REGISTRY[name].cls
    frames = frames if _video(cls) else 1
    n = frames * side * side
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, n, d, generator=gen) * 3).to(dtype)
    if duplicate:
        x[:, n // 2] = x[:, 0]  # a duplicate: ties in every similarity
    att = (torch.randn(b, n, generator=gen) * 2).softmax(-1)
    x, att = x.to(device), att.to(device)
    context = token_context(x, att, stage=stage, grid=(frames * side, side))
    if _video(cls):
        frame_index = (torch.arange(n, device=device) // (side * side)).expand(b, n)
        context = dataclasses.replace(context, frames=frames, frame_index=frame_index)
    params = {"basis_tokens": 2} if name.startswith("apet") else {}
    return x, context, budget, params


@st.composite
def cases(draw, name: str, stage: Stage):
    cls = REGISTRY[name].cls
    layouts = [(2, 3), (4, 3), (2, 5), (3, 4)] if _video(cls) else [(1, 3), (1, 5), (1, 8), (1, 12)]
    frames, side = draw(st.sampled_from(layouts))
    n = frames * side * side
    low = 3 if name.startswith("apet") else 1  # ApET keeps more than its basis_tokens=2
    budget = draw(st.one_of(st.integers(low, n - 1), st.floats(low / n, (n - 1) / n).map(lambda r: round(r, 3))))
    return make_case(
        name,
        stage,
        b=draw(st.integers(1, 3)),
        side=side,
        frames=frames,
        d=draw(st.sampled_from([4, 16, 48])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        seed=draw(st.integers(0, 2**16)),
        duplicate=draw(st.booleans()),
        budget=budget,
    )


def guarded(reducer: tr.Reducer) -> tr.Reducer:
    """``reducer`` with its ``reduce`` run under :func:`no_host_sync` (the call's own input
    checks, outside ``reduce``, may still read values)."""
    inner = reducer.reduce

    def reduce(*args, **kwargs):
        with no_host_sync():
            return inner(*args, **kwargs)

    reducer.reduce = reduce  # type: ignore[method-assign]
    return reducer


def assert_identical(a: tr.Reduction, b: tr.Reduction) -> None:
    for f in ("tokens", "indices", "keep_mask", "valid", "sizes"):
        va, vb = getattr(a, f), getattr(b, f)
        assert (va is None) == (vb is None), f
        if va is not None:
            assert va.dtype == vb.dtype and torch.equal(va, vb), f
    assert a.info.keys() == b.info.keys()
    for k, va in a.info.items():
        vb = b.info[k]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va.nan_to_num(nan=-7.0), vb.nan_to_num(nan=-7.0)), k
        else:
            assert va == vb, k


@pytest.mark.parametrize(("name", "stage"), PAIRS, ids=[f"{n}@{s.value}" for n, s in PAIRS])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_graph_safe_reducer_reads_no_device_value(name, stage, data):
    x, context, budget, params = data.draw(cases(name, stage))
    expected = tr.create(name, budget, stage=stage, **params)(x, context=context)
    # The branches CUDA takes, with every host read refused, give the CPU result bit for bit.
    got = guarded(tr.create(name, budget, stage=stage, **params))(x, context=context)
    assert_identical(expected, got)


# -- the detector -----------------------------------------------------------------------


def _sync_points(x: torch.Tensor) -> dict:
    mask = x > 0
    return {
        "item": lambda: x.sum().item(),
        "tolist": lambda: x.tolist(),
        "bool": lambda: bool(x.sum() > 0),
        "if": lambda: 1 if (x > 0).any() else 0,
        "int": lambda: int(x.sum()),
        "float": lambda: float(x.sum()),
        "index": lambda: list(range(10))[x.long().sum()],
        "range": lambda: range(x.long().sum()),
        "nonzero": lambda: mask.nonzero(),
        "torch.nonzero": lambda: torch.nonzero(mask),
        "where(cond)": lambda: torch.where(mask),
        "mask index": lambda: x[mask],
        "mask assign": lambda: x.clone().__setitem__(mask, 0.0),
        "unique": lambda: torch.unique(x),
        "masked_select": lambda: torch.masked_select(x, mask),
        "repeat_interleave": lambda: torch.repeat_interleave(x, mask.long()),
        "torch.tensor": lambda: torch.tensor([1.0, 2.0]),
        "as_tensor": lambda: torch.as_tensor([1, 2]),
        "cpu": lambda: x.cpu(),
        "numpy": lambda: x.numpy(),
        "equal": lambda: torch.equal(x, x),
        "allclose": lambda: torch.allclose(x, x),
        "max of tensors": lambda: max(x[0], x[1]),
        "bincount": lambda: torch.bincount(mask.long()),
    }


@pytest.mark.parametrize("what", list(_sync_points(torch.zeros(1))))
def test_no_host_sync_refuses_each_sync_point_and_restores_torch_after(what):
    x = torch.linspace(-1.0, 1.0, 6)
    with no_host_sync(), pytest.raises(HostSyncError):
        _sync_points(x)[what]()
    _sync_points(x)[what]()  # outside: torch is whole again
    # Patching a dunder such as Tensor.__getitem__ leaves a C slot behind that breaks this:
    assert torch.tensor([torch.tensor(1.0), torch.tensor(2.0)]).tolist() == [1.0, 2.0]
    with no_host_sync():  # what stays allowed: device-side work with host-known shapes
        y = torch.where(x > 0, x, 0.0)[1:4] + torch.full((3,), 2.0)
        y[torch.arange(2)] = 1.0
        assert not host_reads_free(y)
    assert host_reads_free(y) and y[:2].tolist() == [1.0, 1.0] and y[2].item() == pytest.approx(2.2)


class _ReadsTheCount(ScoringReducer):
    """A reducer that wrongly reads its budget back from the device."""

    name = "reads_the_count"
    graph_safe = True

    def score(self, tokens, valid, context):
        t = int(valid.sum(dim=1).max())  # a host read of a device value
        return tokens.float().norm(dim=-1) + 0 * t


def test_a_reducer_that_reads_the_device_is_caught():
    x = torch.randn(2, 16, 4)
    assert _ReadsTheCount(4)(x).num_kept == 4  # fine on CPU
    with pytest.raises(HostSyncError, match="_local_scalar_dense"):
        guarded(_ReadsTheCount(4))(x)


# -- tokenreduce.graphs without a GPU ---------------------------------------------------


def test_cpu_calls_run_eagerly_and_cache_nothing():
    before = graphs.stats()["graphs"]
    x = torch.randn(2, 36, 8)
    out = tr.create("divprune", 5)(x)
    ref = tr.create("divprune", 5).reduce(x, torch.full((2,), 5), torch.ones(2, 36, dtype=torch.bool),
                                          ReductionContext(stage=Stage.PROJECTOR, uniform_count=5))
    assert torch.equal(out.indices, ref.indices) and graphs.stats()["graphs"] == before


def _layouts():
    base = torch.randn(3, 10, 8)
    return {
        "contiguous": base,
        "slice with gaps": base[:, 2:7],
        "transposed": base.transpose(1, 2),
        "offset by one element": torch.randn(50)[1:49].view(3, 16),
        "expanded": torch.randn(1, 10, 1).expand(3, 10, 8),
        "bool": base > 0,
    }


@pytest.mark.parametrize("kind", list(_layouts()))
def test_static_inputs_keep_the_callers_layout(kind):
    v = _layouts()[kind]
    assert graphs._copyable(v)
    static = graphs._static_like(v)
    graphs._copy_in(static, v)
    assert static.shape == v.shape and static.stride() == v.stride() and static.dtype == v.dtype
    assert static.data_ptr() % graphs._ALIGN == v.data_ptr() % graphs._ALIGN
    assert graphs._layout(static) == graphs._layout(v)
    assert torch.equal(static, v)


def test_overlapping_views_are_not_copyable():
    assert not graphs._copyable(torch.arange(10.0).as_strided((4, 4), (1, 1)))


def _context(x, **changes):
    return dataclasses.replace(token_context(x, x.norm(dim=-1).softmax(-1), stage=Stage.PROJECTOR, grid=(6, 6)),
                               uniform_count=9, **changes)


def test_signature_keys_what_changes_kernels_and_shares_aliased_inputs():
    x = torch.randn(2, 36, 8)
    reducer = tr.create("vscan", 9, stage="projector")
    key, tensors, rebuild = graphs._signature(reducer, x, 9, _context(x))
    assert tensors[0] is x and sum(v is x for v in tensors) == 1  # keys=tokens: one static input
    y = torch.randn(2, 36, 8)
    assert graphs._signature(reducer, y, 9, _context(y))[0] == key  # new values, same layouts: the same graph
    # Keys that are not the tokens themselves are an input of their own: another graph.
    assert graphs._signature(reducer, y, 9, _context(y, keys=y.clone()))[0] != key
    different = {
        "budget": graphs._signature(reducer, x, 8, _context(x))[0],
        "params": graphs._signature(tr.create("vscan", 9, stage="projector", merge=False), x, 9, _context(x))[0],
        "grid": graphs._signature(reducer, x, 9, _context(x, grid=(4, 9)))[0],
        "dtype": graphs._signature(reducer, x.half(), 9, _context(x.half()))[0],
        "extra tensor": graphs._signature(reducer, x, 9, _context(x, extra={"shallow_cls_attention": x[..., 0]}))[0],
        "layout": graphs._signature(reducer, x.transpose(0, 1).contiguous().transpose(0, 1), 9, _context(x))[0],
    }
    assert all(k != key for k in different.values()), [name for name, k in different.items() if k == key]
    static = tuple(torch.zeros_like(v) for v in tensors)
    ctx = rebuild(static)
    assert ctx.keys is static[0] and ctx.grid == (6, 6) and ctx.uniform_count == 9 and ctx.stage is Stage.PROJECTOR
    # A value that cannot be a key (a list) means no graph, not an error.
    assert graphs._signature(reducer, x, 9, _context(x, extra={"weights": [1, 2]})) is None


def test_limits_are_validated_reported_and_restored():
    previous = graphs.configure(max_graphs=3)
    try:
        assert graphs.stats()["limits"]["max_graphs"] == 3
        with pytest.raises(ValueError, match="max_bytes must be an int >= 0"):
            graphs.configure(max_bytes=-1)
    finally:
        graphs.configure(**previous)
    assert graphs.stats()["limits"] == previous
    assert graphs.memory_held() == graphs.stats()["bytes"] >= 0


# -- ApET's CUDA formulation, on CPU -------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    n=st.integers(2, 80),
    d=st.integers(1, 40),
    k=st.integers(1, 12),
    dup=st.booleans(),
    pad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_farthest_point_sampling_picks_as_the_reference(b, n, d, k, dup, pad, seed):
    # On CUDA each FPS step's distances come from one cdist kernel (Euclidean, not squared);
    # the picks must be the reference's (away from last-bit near-ties, absent here).
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen) * 4
    if dup:
        x[:, -1] = x[:, 0]
    valid = torch.ones(b, n, dtype=torch.bool)
    if pad:
        valid[:, n // 2 :] = torch.rand(b, n - n // 2, generator=gen) < 0.5
    k = min(k, int(valid.sum(dim=1).min()))
    if k < 1:
        return
    ref = farthest_point_sampling(x, valid, k, fused=False)
    assert torch.equal(farthest_point_sampling(x, valid, k, fused=True), ref)
