"""The fused Triton greedy loops (``tokenreduce_plugins.kernels.greedy``) against the torch loops.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (the kernels module is
imported with ``TRITON_INTERPRET=1``: tests/triton_kernels.py), and the reducers are made to
dispatch to them. With CUDA the same property tests run the compiled kernels on the
GPU, and the CUDA-only tests compare the full reducers with ``TOKENREDUCE_NO_TRITON``
toggled, check that the wrappers never synchronise, and that a CUDA graph captures them.
Skipped where Triton is not installed (CI).

Picks must be equal: always for DivPrune (minimum and argmax only), always for CDPruner on
kernels whose arithmetic is exact (powers of two on orthogonal directions, with duplicates,
zero tokens, padding, an exhausted kernel and non-finite variances), and on random
kernels up to a near-tie: where the two loops part, the two tokens' conditional
variances, recomputed in float64 along the common prefix, must be within a tolerance.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_kernels import (  # noqa: F401 - no_tf32: an autouse fixture
    CUDA,
    DEVICE,
    cuda_only,
    import_kernels,
    no_tf32,
    numpy_mark,
    skip_unless_interpreted,
    torch_loop,
)

triton, greedy = import_kernels("greedy")

import tokenreduce as tr  # noqa: E402
from tokenreduce import ReductionContext, graphs  # noqa: E402
from tokenreduce_plugins import kernels  # noqa: E402
from tokenreduce_plugins.cdpruner import (  # noqa: E402
    conditional_kernel,
    greedy_map,
    instruction_relevance,
    unit_rows,
)
from tokenreduce_plugins.divprune import max_min_select  # noqa: E402

skip_unless_interpreted(triton, [greedy.greedy_map_kernel, greedy.max_min_kernel])
INTERPRETED = not CUDA
pytestmark = numpy_mark(triton)

PROPS = settings(max_examples=25 if INTERPRETED else 60, deadline=None, derandomize=True, database=None)
FIXTURES = Path(__file__).parent / "fixtures" / "baselines"


@contextmanager
def fused(tile_n: int | None = None):
    """Dispatch the reducers' loops to the kernels on any device (CPU: the interpreter),
    optionally with a forced column tile (several tiles per row on small N)."""
    shim = SimpleNamespace(
        greedy_map_fused=partial(greedy.greedy_map_fused, tile_n=tile_n),
        max_min_fused=partial(greedy.max_min_fused, tile_n=tile_n),
    )
    with (
        mock.patch.object(kernels, "fused_wanted", lambda x: True),
        mock.patch.object(kernels, "greedy_module", lambda: shim),
    ):
        yield


# -- inputs ---------------------------------------------------------------------------------


@st.composite
def layouts(draw, max_n: int = 48):
    """``(b, n, valid (B, N), counts (B,), t)``: padded rows, counts below the valid counts."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(5, max_n))
    lengths = [n] + [draw(st.integers(2, n)) for _ in range(b - 1)]
    valid = torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    counts = torch.tensor([draw(st.integers(1, length)) for length in lengths])
    t = draw(st.integers(int(counts.max()), n))  # rows keep stepping past their counts
    return b, n, valid, counts, t


@st.composite
def exact_kernels(draw):
    """A kernel whose greedy arithmetic is exact in float32: tokens ``s_i * e_{dir_i}`` with
    ``s_i`` a signed power of two or 0 (zero tokens) on few directions (duplicates, and an
    exhausted kernel once every direction is picked), a few non-finite diagonal entries."""
    b, n, valid, counts, t = draw(layouts())
    dirs = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    direction = torch.randint(0, dirs, (b, n), generator=gen)
    scale = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0, -1.0, -2.0])[torch.randint(0, 7, (b, n), generator=gen)]
    x = torch.nn.functional.one_hot(direction, dirs).float() * scale.unsqueeze(2)
    x = x.masked_fill(~valid.unsqueeze(2), 0.0)
    kernel = x @ x.transpose(1, 2)
    if draw(st.booleans()):  # NaN and -inf variances rank just above taken tokens; +inf first
        for value in draw(st.lists(st.sampled_from([float("nan"), float("inf"), float("-inf")]), max_size=3)):
            row, col = draw(st.integers(0, b - 1)), draw(st.integers(0, n - 1))
            kernel[row, col, col] = value
    return kernel, valid, counts, t


@st.composite
def random_kernels(draw):
    """CDPruner's kernel of random unit tokens weighted by a random relevance (a duplicate
    token and a zero token sometimes), full rank over each row's distinct tokens."""
    b, n, valid, counts, t = draw(layouts())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(b, n, n + 4, generator=gen)
    if draw(st.booleans()):
        x[:, n - 1] = x[:, 0]  # a duplicate: the same first variance, then ~0 once its twin is picked
    if draw(st.booleans()):
        x[:, n // 2] = 0.0  # a zero token: variance 0 throughout
    img = unit_rows(x, valid)
    relevance = (torch.rand(b, n, generator=gen) + 0.05).masked_fill(~valid, 0.0)
    return conditional_kernel(img, relevance), valid, counts, t


# -- the float64 oracle for near-ties -------------------------------------------------------------


def variances_after(kernel: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    """``(N,)`` float64 conditional variances of one row's kernel after the picks ``prefix``,
    by the greedy recurrence itself (a pick whose variance is not positive adds nothing)."""
    k = kernel.double()
    d2 = torch.diagonal(k).clone()
    rows: list[torch.Tensor] = []
    for j in prefix:
        num = k[j] - sum((c[j] * c for c in rows), torch.zeros_like(d2))
        e = num / d2[j].sqrt() if d2[j] > 0 else torch.zeros_like(d2)
        rows.append(e)
        d2 = d2 - e * e
    return d2


def assert_same_picks_up_to_near_ties(kernel, got, want, counts, *, rel_tol: float) -> None:
    """``got == want`` on every row's first ``counts[b]`` picks, or the first step where they
    differ is a near-tie: the two tokens' float64 variances within ``rel_tol * max diag``."""
    for row in range(got.shape[0]):
        c = int(counts[row])
        a, w = got[row, :c].tolist(), want[row, :c].tolist()
        if a == w:
            continue
        s = next(i for i in range(c) if a[i] != w[i])
        d2 = variances_after(kernel[row].cpu(), w[:s])
        scale = float(torch.diagonal(kernel[row]).abs().max())
        gap = abs(float(d2[a[s]] - d2[w[s]]))
        assert gap <= rel_tol * scale, (
            f"row {row}: picks part at step {s} ({a[s]} vs {w[s]}) without a near-tie "
            f"(float64 variances differ by {gap:.3g}, scale {scale:.3g})\n fused: {a}\n torch: {w}"
        )


def to(device: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [v.to(device) for v in tensors]


# -- CDPruner's greedy MAP --------------------------------------------------------------------------


@PROPS
@given(exact_kernels(), st.sampled_from([None, 16]))
def test_greedy_map_fused_equals_torch_loop_on_exact_kernels(case, tile_n):
    kernel, valid, counts, t = case
    want, want_slots = greedy_map(kernel, counts, valid, t)  # CPU: the torch loop
    with fused(tile_n):
        got, slots = greedy_map(*to(DEVICE, kernel, counts, valid), t)
    assert torch.equal(slots.cpu(), want_slots)
    assert torch.equal(got.cpu(), want), f"fused:\n{got}\ntorch:\n{want}"


@PROPS
@given(random_kernels(), st.sampled_from([None, 16]))
def test_greedy_map_fused_equals_torch_loop_on_random_kernels(case, tile_n):
    kernel, valid, counts, t = case
    want, want_slots = greedy_map(kernel, counts, valid, t)
    with fused(tile_n):
        got, slots = greedy_map(*to(DEVICE, kernel, counts, valid), t)
    assert torch.equal(slots.cpu(), want_slots)
    assert_same_picks_up_to_near_ties(kernel, got.cpu(), want, counts, rel_tol=1e-4)
    # Past its count a row reads -1, as the torch loop's.
    assert bool((got.cpu()[~want_slots] == -1).all())


def test_greedy_map_fused_reproduces_the_official_cdpruner_fixture():
    # The fixture of tests/test_cdpruner.py (the official code's picks), through the kernel.
    data = dict(np.load(FIXTURES / "cdpruner.npz"))
    cases = sorted({int(k.split("_")[0][4:]) for k in data})
    for k in cases:
        theta = float(data[f"case{k}_theta"])
        reducer = tr.create("cdpruner", int(data[f"case{k}_budget"]), theta=None if np.isnan(theta) else theta)
        tokens, text, mask = (
            torch.from_numpy(np.asarray(data[f"case{k}_{key}"])).to(DEVICE)
            for key in ("tokens", "text_embeds", "text_mask")
        )
        with fused(), graphs.eager():
            out = reducer(tokens, context=ReductionContext(text_embeds=text, text_mask=mask))
        assert out.info["selection_order"].tolist() == data[f"case{k}_selection_order"].tolist(), f"case {k}"


# -- DivPrune's max-min loop ----------------------------------------------------------------------


@st.composite
def divprune_cases(draw):
    b, n, valid, counts, t = draw(layouts(max_n=70))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    d = draw(st.sampled_from([3, 8, 32]))
    x = torch.randn(b, n, d, generator=gen)
    if draw(st.booleans()):
        x = x.round()  # few distinct directions: ties in every distance
    if draw(st.booleans()):
        x[:, n - 1] = x[:, 0]
    if draw(st.booleans()):
        x[:, n // 2] = 0.0
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return x.to(dtype), valid, counts, t


@PROPS
@given(divprune_cases(), st.sampled_from([None, 16]))
def test_max_min_fused_equals_torch_loop_bit_for_bit(case, tile_n):
    x, valid, counts, t = case
    want, want_slots = max_min_select(x, counts, valid, t)
    with fused(tile_n):
        got, slots = max_min_select(*to(DEVICE, x, counts, valid), t)
    assert torch.equal(slots.cpu(), want_slots)
    assert torch.equal(got.cpu(), want), f"fused:\n{got}\ntorch:\n{want}"


def test_divprune_fused_reproduces_the_official_fixture():
    data = dict(np.load(FIXTURES / "divprune.npz"))
    for k in sorted({int(key.split("_")[0][4:]) for key in data}):
        tokens = torch.from_numpy(np.asarray(data[f"case{k}_tokens"])).to(DEVICE)
        with fused(), graphs.eager():
            out = tr.create("divprune", budget=int(data[f"case{k}_budget"]))(tokens)
        assert out.info["selection_order"].tolist() == data[f"case{k}_selection_order"].tolist(), f"case {k}"


# -- dispatch -----------------------------------------------------------------------------------


def test_cpu_tensors_always_take_the_torch_loop():
    assert not kernels.fused_wanted(torch.zeros(2, 3))


@pytest.mark.skipif(CUDA, reason="runs the kernels on CPU tensors: the interpreter's case")
def test_wrappers_decline_what_the_kernels_do_not_take():
    kernel = torch.eye(4).unsqueeze(0)
    valid, counts = torch.ones(1, 4, dtype=torch.bool), torch.tensor([2])
    assert greedy.greedy_map_fused(kernel.double(), counts, valid, 2) is None  # float32 only
    assert greedy.greedy_map_fused(kernel, counts, valid, 0) is None
    pos = torch.arange(4.0)
    dist = (pos[:, None] - pos[None, :]).abs().fill_diagonal_(float("-inf")).unsqueeze(0)
    first = torch.zeros(1, dtype=torch.long)
    score = torch.full((1, 4), float("inf"))
    assert greedy.max_min_fused(dist, first, score, 3).tolist() == [[0, 3, 1]]
    assert score.tolist() == [[float("-inf"), 1.0, 1.0, float("-inf")]]  # updated in place, as the torch loop
    # A strided view of the scores (which a copy would leave stale) is declined.
    assert greedy.max_min_fused(dist, first, torch.zeros(1, 8)[:, ::2], 2) is None


# -- CUDA: the full reducers, no syncs, graph capture -------------------------------------------------

def _inputs(b: int, n: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tokens = torch.randn(b, n, d, generator=gen, device="cuda").to(dtype)
    text = torch.randn(b, 32, d, generator=gen, device="cuda").to(dtype)
    return tokens, ReductionContext(text_embeds=text, text_mask=torch.ones(b, 32, dtype=torch.bool, device="cuda"))


def _cdpruner_kernel(tokens: torch.Tensor, context: ReductionContext) -> torch.Tensor:
    valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    img = unit_rows(tokens, valid)
    rel = instruction_relevance(img, unit_rows(context.text_embeds, context.text_mask), context.text_mask, valid)
    return conditional_kernel(img, rel)


@cuda_only
@pytest.mark.parametrize("b", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_full_reducers_fused_equal_torch_loop(b, dtype):
    assert kernels.fused_wanted(torch.zeros(1, device="cuda"))
    n, t = 576, 64
    tokens, context = _inputs(b, n, 1024, dtype)
    for name in ("cdpruner", "divprune"):
        reducer = tr.create(name, t)
        with graphs.eager():
            got = reducer(tokens, context=context)
            with torch_loop():
                want = reducer(tokens, context=context)
        counts = torch.full((b,), t)
        if name == "divprune":
            assert torch.equal(got.info["selection_order"], want.info["selection_order"])
            assert torch.equal(got.tokens, want.tokens)
        else:
            kernel = _cdpruner_kernel(tokens, context)
            assert_same_picks_up_to_near_ties(
                kernel, got.info["selection_order"].cpu(), want.info["selection_order"].cpu(), counts, rel_tol=1e-3
            )


@cuda_only
@pytest.mark.parametrize(("b", "n", "t"), [(2, 2880, 320), (1, 8192, 64), (1, 5000, 40)])
def test_cuda_large_n(b, n, t):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(b, n, 256, generator=gen, device="cuda")
    valid = torch.ones(b, n, dtype=torch.bool, device="cuda")
    valid[-1, n - 7 :] = False
    counts = torch.full((b,), t, device="cuda")
    with graphs.eager():
        with torch_loop():
            want, _ = max_min_select(x, counts, valid, t)
        got, _ = max_min_select(x, counts, valid, t)
        assert torch.equal(got, want)
        kernel = conditional_kernel(unit_rows(x, valid), torch.rand(b, n, generator=gen, device="cuda") * valid)
        with torch_loop():
            want, _ = greedy_map(kernel, counts, valid, t)
        got, _ = greedy_map(kernel, counts, valid, t)
    assert_same_picks_up_to_near_ties(kernel, got.cpu(), want.cpu(), counts.cpu(), rel_tol=1e-3)


@cuda_only
def test_cuda_wrappers_never_synchronise():
    tokens, context = _inputs(2, 576, 256, torch.bfloat16)
    kernel = _cdpruner_kernel(tokens, context)
    valid = torch.ones(2, 576, dtype=torch.bool, device="cuda")
    counts = torch.full((2,), 64, device="cuda")
    x = tokens.float()
    for _ in range(2):  # the first call compiles
        torch.cuda.set_sync_debug_mode("error")
        try:
            greedy_map(kernel, counts, valid, 64)
            max_min_select(x, counts, valid, 64)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@cuda_only
@pytest.mark.parametrize("name", ["cdpruner", "divprune"])
def test_cuda_graph_captures_the_fused_loops(name):
    graphs.clear()
    tokens, context = _inputs(8, 576, 1024, torch.bfloat16, seed=3)
    reducer = tr.create(name, 64)
    with graphs.eager():
        eager = reducer(tokens, context=context)
    first = reducer(tokens, context=context)  # eager, then captured
    replays = [reducer(tokens, context=context) for _ in range(2)]
    stats = graphs.stats()
    assert not stats["failed"], stats["failed"]
    assert any(e["reducer"] == name for e in stats["entries"])
    for out in (first, *replays):
        assert torch.equal(out.indices, eager.indices)
        assert torch.equal(out.info["selection_order"], eager.info["selection_order"])
        assert torch.equal(out.tokens, eager.tokens)
    graphs.clear()


@cuda_only
def test_cuda_env_var_turns_the_kernels_off(monkeypatch):
    x = torch.zeros(1, device="cuda")
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert not kernels.fused_wanted(x)
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    assert kernels.fused_wanted(x)
    monkeypatch.delenv(kernels.DISABLE_ENV)
    assert kernels.fused_wanted(x)
