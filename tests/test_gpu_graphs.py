"""On CUDA: every graph-safe reducer replayed from its captured graph equals its eager call bit
for bit, and the graph cache is bounded and releasable. Skipped without a CUDA device.

The CPU side (no host reads, proven with :func:`tokenreduce.sync.no_host_sync`) is
``tests/test_graph_safe.py``; its cases are reused here, on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from test_graph_safe import PAIRS, assert_identical, make_case

import tokenreduce as tr
from tokenreduce import Stage, graphs, validation

pytestmark = pytest.mark.gpu


def eager_without_syncs(reducer: tr.Reducer, x: torch.Tensor, context) -> tr.Reduction:
    """The eager call, its ``reduce`` under ``torch.cuda.set_sync_debug_mode("error")``: any
    synchronising CUDA call (a device read, a pageable host-to-device copy) raises."""
    inner = reducer.reduce

    def reduce(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return inner(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    reducer.reduce = reduce  # type: ignore[method-assign]
    try:
        with graphs.eager():
            return reducer(x, context=context)
    finally:
        del reducer.reduce


def _failures(name: str, stage: Stage) -> list[str]:
    return [why for key, why in graphs.stats()["failed"].items() if key.startswith(f"{name}@{stage.value} ")]


@pytest.mark.parametrize(("name", "stage"), PAIRS, ids=[f"{n}@{s.value}" for n, s in PAIRS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_equals_eager_bit_for_bit(name, stage, dtype):
    graphs.clear()
    cases = [
        make_case(name, stage, b=2, side=12, frames=4, d=64, dtype=dtype, seed=seed, duplicate=seed == 1,
                  budget=0.2, device="cuda")
        for seed in range(3)
    ]
    _, _, budget, params = cases[0]
    reducer = tr.create(name, budget, stage=stage, **params)
    with graphs.eager():  # once per process a reducer may set up constants (random's seeded scores)
        reducer(cases[0][0], context=cases[0][1])
    eager = [eager_without_syncs(reducer, x, ctx) for x, ctx, _, _ in cases]
    got = [reducer(x, context=ctx) for x, ctx, _, _ in cases]  # the first captures, the others replay
    assert not _failures(name, stage), _failures(name, stage)
    stats = graphs.stats()
    assert stats["graphs"] == 1 and stats["entries"][0]["reducer"] == name and stats["bytes"] > 0
    for g, e in zip(got, eager):
        assert_identical(g, e)
    # A replay writes the graph's buffers, never what an earlier call returned.
    again = reducer(cases[0][0], context=cases[0][1])
    assert_identical(got[1], eager[1])
    assert_identical(again, eager[0])
    assert not again.tokens.is_inference()
    graphs.clear()


def test_the_cache_is_bounded_and_releasable():
    graphs.clear()
    previous = graphs.configure(max_graphs=2)
    reducer = tr.create("divprune", 8)
    try:
        xs = {n: torch.randn(2, n, 32, device="cuda") for n in (64, 81, 100)}
        for x in xs.values():  # three signatures, two graphs kept: the least recent goes
            reducer(x)
            reducer(x)
        stats = graphs.stats()
        assert [e["shape"] for e in stats["entries"]] == [(2, 81, 32), (2, 100, 32)]
        held = graphs.memory_held()
        assert held == stats["bytes"] > 0
        graphs.configure(max_bytes=held - 1)  # over the byte limit: evicted down to it
        assert graphs.stats()["graphs"] <= 1 and graphs.memory_held() <= held - 1
        allocated = torch.cuda.memory_allocated()
        assert graphs.clear() > 0
        assert graphs.memory_held() == 0 and graphs.stats()["graphs"] == 0
        assert torch.cuda.memory_allocated() < allocated  # static inputs and outputs freed
        # A graph larger than max_bytes is never kept: remembered, and the calls run eagerly.
        graphs.configure(max_bytes=1)
        x = xs[64]
        with graphs.eager():
            ref = reducer(x)
        assert_identical(reducer(x), ref)
        assert_identical(reducer(x), ref)
        assert graphs.stats()["graphs"] == 0
        assert any("max_bytes" in why for why in _failures("divprune", Stage.PROJECTOR))
    finally:
        graphs.configure(**previous)
        graphs.clear()


def test_graph_outputs_are_ordinary_tensors_and_gradients_take_the_eager_path():
    graphs.clear()
    x = torch.randn(2, 100, 48, device="cuda")
    reducer = tr.create("vscan", 20, stage="projector")
    ctx = make_case("vscan", Stage.PROJECTOR, b=2, side=10, frames=1, d=48, dtype=torch.float32, seed=5,
                    duplicate=False, budget=20, device="cuda")[1]
    with torch.inference_mode():
        inside = reducer(x, context=ctx)
        inside = reducer(x, context=ctx)  # a replay under inference mode
    outside = reducer(x, context=ctx)  # the same graph outside it
    assert torch.equal(inside.tokens, outside.tokens) and not outside.tokens.is_inference()
    outside.tokens.add_(0.0)
    leaf = x.clone().requires_grad_()
    before = graphs.stats()["graphs"]
    out = reducer(leaf, context=ctx)
    out.tokens.sum().backward()
    assert leaf.grad is not None and graphs.stats()["graphs"] == before
    graphs.clear()


def test_a_replay_on_another_stream_and_under_autocast():
    graphs.clear()
    reducer = tr.create("apet", 30, basis_tokens=6)
    x = torch.randn(4, 144, 64, device="cuda", dtype=torch.bfloat16)
    with graphs.eager():
        ref = reducer(x)
    reducer(x)  # capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        other = reducer(x)
    torch.cuda.current_stream().wait_stream(side)
    assert_identical(other, ref)
    # Autocast changes the kernels (DivPrune's similarity matmul runs in float16): a call under it
    # gets a graph of its own, equal to its eager call; the same call without it, another.
    divprune = tr.create("divprune", 20)
    y = torch.randn(2, 144, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        with graphs.eager():
            ref16 = divprune(y)
        divprune(y)
        assert_identical(divprune(y), ref16)
    with graphs.eager():
        ref32 = divprune(y)
    divprune(y)
    assert_identical(divprune(y), ref32)
    assert graphs.stats()["graphs"] == 3
    graphs.clear()


def test_a_replay_checks_finiteness_after_its_work_and_stays_usable():
    # The finiteness read comes after the replay is queued; the tokens go in with NaN and inf
    # zeroed, so a bad call raises the usual error and leaves the graph as it was.
    graphs.clear()
    reducer = tr.create("prunevid", 16, stage="projector")
    case = make_case("prunevid", Stage.PROJECTOR, b=1, side=6, frames=4, d=64, dtype=torch.bfloat16, seed=2,
                     duplicate=False, budget=16, device="cuda")
    x, ctx = case[0], case[1]
    reducer(x, context=ctx)  # capture
    good = reducer(x, context=ctx)  # a replay
    bad = x.clone()
    bad[0, 3, 5] = float("nan")
    with pytest.raises(tr.InvalidInputError, match="NaN or inf"):
        reducer(bad, context=ctx)
    bad[0, 3, 5] = float("inf")
    with pytest.raises(tr.InvalidInputError, match="NaN or inf"):
        reducer(bad, context=ctx)
    again = reducer(x, context=ctx)
    assert_identical(again, good)
    assert graphs.stats()["graphs"] == 1 and not graphs.stats()["failed"]
    # The outputs are views into one buffer per call: a later replay leaves an earlier result be.
    assert again.tokens.untyped_storage().data_ptr() == again.indices.untyped_storage().data_ptr()
    assert again.tokens.untyped_storage().data_ptr() != good.tokens.untyped_storage().data_ptr()
    graphs.clear()


def test_deferred_checks_read_replays_at_the_end_of_the_block():
    # Inside deferred_checks() a replay queues its check and returns; the block reads every check
    # at once at its end (or flush_checks()), raising the usual error; an eager first call reads at once.
    graphs.clear()
    reducer = tr.create("random", 16, stage="projector")
    x = torch.randn(2, 64, 32, device="cuda")
    reducer(x)  # capture
    bad = x.clone()
    bad[1, 7, 3] = float("nan")
    with pytest.raises(tr.InvalidInputError, match="NaN or inf"):
        with validation.deferred_checks():
            out = reducer(bad)  # no read yet
            assert out.indices.shape == (2, 16)
            good = reducer(x)
    with pytest.raises(tr.InvalidInputError, match="NaN or inf"):
        with validation.deferred_checks():
            reducer(bad)
            validation.flush_checks()
            pytest.fail("flush_checks() did not raise")
    with validation.deferred_checks():
        assert_identical(reducer(x), good)
    graphs.clear()
    with pytest.raises(tr.InvalidInputError, match="NaN or inf"):
        with validation.deferred_checks():
            reducer(bad)  # the first call of a shape runs eagerly: read before it runs
            pytest.fail("an eager call deferred its check")
    graphs.clear()
