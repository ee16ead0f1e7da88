"""VisPruner's fused matching rounds (``tokenreduce_plugins.kernels.matching``) against the torch loop.

Without CUDA the kernel runs on CPU tensors through Triton's interpreter: the module is
imported with ``TRITON_INTERPRET=1`` (set only around that import), and the reducer is made
to dispatch to it. With CUDA the same property tests run the compiled kernel on the GPU,
and the CUDA-only tests compare the whole reducer with ``TOKENREDUCE_NO_TRITON`` toggled,
check that the wrapper never synchronises, and that a CUDA graph captures it. Skipped
where Triton is not installed (CI).

The kernel takes the same maxima and the same stable sort of the same float32
similarities as the torch loop, so every comparison is exact: the final lists equal the
dense loop's, place for place, and the reducer keeps the same tokens. Ties are planted
everywhere (duplicate tokens, tokens on few directions, zero tokens whose similarities
are +0.0 or -0.0), and NaN similarities, which ``amax`` propagates and the sort puts first.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_kernels import (  # noqa: F401 - no_tf32: an autouse fixture
    CUDA,
    DEVICE,
    assert_same_reduction,
    check_vispruner_fixture,
    cuda_only,
    import_kernels,
    no_tf32,
    numpy_mark,
    on_device,
    similarities,
    skip_unless_interpreted,
    tied_tokens,
    torch_loop,
    vispruner_cuda_inputs,
)

triton, matching = import_kernels("matching")

import tokenreduce as tr  # noqa: E402
from tokenreduce import ReductionContext, graphs  # noqa: E402
from tokenreduce_plugins import kernels, vispruner  # noqa: E402
from tokenreduce_plugins.vispruner import ROUND_SIZE, _match_round, _match_round_dense, _round_sizes  # noqa: E402

skip_unless_interpreted(triton, [matching.match_rounds_kernel])
INTERPRETED = not CUDA


pytestmark = numpy_mark(triton)
PROPS = settings(max_examples=25 if INTERPRETED else 60, deadline=None, derandomize=True, database=None)


@contextmanager
def fused(tile_n: int | None = None):
    """Dispatch VisPruner's rounds to the kernel on any device (CPU: the interpreter),
    optionally with a forced column tile (several tiles per row on small N)."""
    with (
        mock.patch.object(kernels, "fused_wanted", lambda x: True),
        mock.patch.object(matching, "match_rounds", partial(matching.match_rounds, tile_n=tile_n)),
    ):
        yield


# -- inputs ---------------------------------------------------------------------------------


@st.composite
def uniform_lists(draw, nan: bool = False):
    """Every row's list real and equally long (the reducer's unmasked form): ``(sim, residual, w, diverse)``."""
    sim, b, n, gen = draw(similarities(nan))
    w = draw(st.integers(1, n))
    residual = torch.stack([torch.randperm(n, generator=gen)[:w] for _ in range(b)])
    return sim, residual, w, draw(st.integers(0, w))


@st.composite
def padded_lists(draw):
    """Rows with their own list lengths and diverse counts, -1 padded to ``W``: ``(sim, residual, rem, div)``."""
    sim, b, n, gen = draw(similarities())
    w = draw(st.integers(1, n))
    rem = torch.tensor([draw(st.integers(0, w)) for _ in range(b)])
    div = torch.tensor([draw(st.integers(0, int(r))) for r in rem])
    residual = torch.full((b, w), -1)
    for row in range(b):
        residual[row, : rem[row]] = torch.randperm(n, generator=gen)[: rem[row]]
    return sim, residual, rem, div


def dense_loop(sim: torch.Tensor, residual: torch.Tensor, w: int, diverse: int) -> torch.Tensor:
    """The reducer's torch loop for uniform rows (``_match_round_dense`` over ``_round_sizes``)."""
    rows = torch.arange(sim.shape[0], device=sim.device).view(-1, 1, 1)
    for r in _round_sizes(w, diverse):
        residual = _match_round_dense(sim, residual, r, rows)
    return residual


# -- the kernel against the torch loops ------------------------------------------------------------


@PROPS
@given(uniform_lists(), st.sampled_from([None, 16]))
def test_uniform_rows_give_the_dense_loops_list_place_for_place(case, tile_n):
    sim, residual, w, diverse = case
    want = dense_loop(sim, residual, w, diverse)  # CPU: the torch loop
    got = matching.match_rounds(*on_device(sim, residual), w, diverse, ROUND_SIZE, tile_n=tile_n).cpu()
    kept = want.shape[1]
    assert torch.equal(got[:, :kept], want), f"fused:\n{got}\ntorch:\n{want}"
    assert bool((got[:, kept:] == -1).all())  # the places the list shrank by


@PROPS
@given(uniform_lists(nan=True))
def test_nan_and_signed_zero_similarities_sort_as_torch_sorts_them(case):
    # amax propagates NaN and the stable descending sort puts NaN first; -0.0 ties with +0.0.
    sim, residual, w, diverse = case
    want = dense_loop(sim, residual, w, diverse)
    got = matching.match_rounds(*on_device(sim, residual), w, diverse, ROUND_SIZE).cpu()
    assert torch.equal(got[:, : want.shape[1]], want), f"fused:\n{got}\ntorch:\n{want}"


@PROPS
@given(padded_lists(), st.sampled_from([None, 16]))
def test_padded_rows_each_give_their_own_dense_loops_list(case, tile_n):
    sim, residual, rem, div = case
    got = matching.match_rounds(*on_device(sim, residual, rem, div), ROUND_SIZE, tile_n=tile_n).cpu()
    for row in range(sim.shape[0]):
        r, d = int(rem[row]), int(div[row])
        if d > 0 and r > d:
            want = dense_loop(sim[row : row + 1], residual[row : row + 1, :r], r, d)[0]
        else:  # nothing to remove: the list as given
            want = residual[row, :r]
        assert got[row, : len(want)].tolist() == want.tolist(), f"row {row}"
        assert bool((got[row, len(want) :] == -1).all())


@PROPS
@given(padded_lists())
def test_padded_rows_keep_the_padded_loops_tokens(case):
    # The padded torch loop (``_match_round``, the batch's largest number of rounds): same tokens.
    sim, residual, rem, div = case
    want, left = residual, rem
    depth = max(len(_round_sizes(int(r), int(d))) for r, d in zip(rem, div))
    # As the reducer: the batch's largest number of rounds (plus one that removes nothing).
    for _ in range(depth + 1 if depth else 0):
        want, left = _match_round(sim, want, left, div)
    got = matching.match_rounds(*on_device(sim, residual, rem, div), ROUND_SIZE).cpu()
    for row in range(sim.shape[0]):
        assert sorted(got[row].tolist()) == sorted(want[row].tolist()), f"row {row}"


def test_equal_scores_keep_the_lists_order():
    # Every token the same: every a scores 1.0, so each round drops the first r a's in list order.
    n, w, diverse = 40, 37, 5
    sim = torch.ones(2, n, n)
    residual = torch.stack([torch.arange(w), torch.arange(w).flip(0)])
    want = dense_loop(sim, residual, w, diverse)
    got = matching.match_rounds(*on_device(sim, residual), w, diverse, ROUND_SIZE).cpu()
    assert torch.equal(got[:, :diverse], want)


def test_minus_zero_ties_with_plus_zero():
    # Every a's best match is 0.0 (even tokens) or -0.0 (odd ones): all equal to the sort,
    # so each round drops the first r a's in list order, whatever the sign of the zero.
    n, w, diverse = 40, 40, 6
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    sim = (sign[:, None] * torch.zeros(n, n)).unsqueeze(0).repeat(2, 1, 1)  # sim[t, :] = +-0.0
    assert bool(torch.signbit(sim[0, 1, 0])) and not bool(torch.signbit(sim[0, 0, 1]))
    residual = torch.stack([torch.arange(w), torch.randperm(w, generator=torch.Generator().manual_seed(0))])
    want = dense_loop(sim, residual, w, diverse)
    got = matching.match_rounds(*on_device(sim, residual), w, diverse, ROUND_SIZE).cpu()
    assert torch.equal(got[:, :diverse], want)


def test_the_input_list_is_not_modified():
    sim = torch.nn.functional.normalize(torch.randn(1, 30, 4), dim=-1)
    sim = sim @ sim.transpose(1, 2)
    residual = torch.randperm(30)[:25].unsqueeze(0)
    before = residual.clone()
    sim_d, residual_d = on_device(sim, residual)
    matching.match_rounds(sim_d, residual_d, 25, 6, ROUND_SIZE)
    assert torch.equal(residual_d.cpu(), before)


def test_the_wrapper_declines_what_the_kernel_does_not_take():
    sim, residual = torch.eye(4).unsqueeze(0), torch.arange(4).unsqueeze(0)
    assert matching.match_rounds(sim.double(), residual, 4, 2, ROUND_SIZE) is None  # float32 only
    assert matching.match_rounds(sim, residual.int(), 4, 2, ROUND_SIZE) is None  # int64 lists only
    assert matching.match_rounds(sim, residual[:, :0], 0, 0, ROUND_SIZE) is None  # empty
    too_wide = torch.zeros(1, matching.MAX_W + 1, dtype=torch.long)
    assert matching.match_rounds(torch.zeros(1, 1, 1), too_wide, 1, 1, ROUND_SIZE) is None


# -- the reducer: fused against the torch loop -----------------------------------------------------


@st.composite
def reducer_cases(draw):
    """``(tokens, cls_attention, mask or None, budget, ratio)`` on CPU, ties planted."""
    b, n = draw(st.integers(1, 3)), draw(st.integers(4, 80))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tokens = tied_tokens(draw, gen, b, n)
    att = torch.rand(b, n, generator=gen)
    if draw(st.booleans()):
        att = (att * 4).round()  # tied attention: the stable order decides the residual list
    mask = None
    if draw(st.booleans()):
        lengths = [n] + [draw(st.integers(1, n)) for _ in range(b - 1)]
        mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    budget = draw(st.integers(1, n)) if mask is None else draw(st.floats(0.02, 1.0))
    ratio = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return tokens.to(dtype), att, mask, budget, ratio


def _run(tokens, att, mask, budget, ratio):
    reducer = tr.create("vispruner", budget, important_ratio=ratio)
    with graphs.eager():
        return reducer(tokens, mask=mask, context=ReductionContext(cls_attention=att))


@PROPS
@given(reducer_cases(), st.sampled_from([None, 16]))
def test_reducer_keeps_the_same_tokens_fused_and_with_the_torch_loop(case, tile_n):
    tokens, att, mask, budget, ratio = case
    want = _run(tokens, att, mask, budget, ratio)  # CPU: the torch loop
    with fused(tile_n):
        got = _run(*on_device(tokens, att), None if mask is None else mask.to(DEVICE), budget, ratio)
    assert_same_reduction(got, want)  # info too: no "important" where every token is kept


def test_reducer_through_the_kernel_reproduces_the_official_fixture():
    check_vispruner_fixture(fused)


def test_cpu_tensors_take_the_torch_loop():
    sim, residual = torch.eye(4).unsqueeze(0), torch.arange(4).unsqueeze(0)
    with mock.patch.object(matching, "match_rounds", side_effect=AssertionError("kernel called on CPU")):
        assert vispruner._fused_rounds(sim, residual, 4, 2) is None


# -- CUDA: the whole reducer, no syncs, graph capture -------------------------------------------------

@cuda_only
@pytest.mark.parametrize("b", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_reducer_fused_equals_torch_loop(b, dtype):
    assert kernels.fused_wanted(torch.zeros(1, device="cuda"))
    n, t = 576, 64
    tokens, context = vispruner_cuda_inputs(b, n, 4096, dtype)
    lengths = torch.tensor([n - 37 * i for i in range(b)], device="cuda")
    mask = torch.arange(n, device="cuda")[None] < lengths[:, None]
    reducer = tr.create("vispruner", t)
    for m in (None, mask):  # the uniform form and the padded one
        with (  # the kernel, not the loop
            graphs.eager(),
            mock.patch.object(vispruner, "_match_round_dense", side_effect=AssertionError("torch loop ran")),
            mock.patch.object(vispruner, "_match_round", side_effect=AssertionError("torch loop ran")),
        ):
            got = reducer(tokens, mask=m, context=context)
        with graphs.eager(), torch_loop():
            want = reducer(tokens, mask=m, context=context)
        assert torch.equal(got.indices, want.indices)
        assert torch.equal(got.tokens, want.tokens)


@cuda_only
def test_cuda_wrapper_never_synchronises():
    sim = torch.nn.functional.normalize(torch.randn(2, 576, 256, device="cuda"), dim=-1)
    sim = sim @ sim.transpose(1, 2)
    residual = torch.stack([torch.randperm(576, device="cuda")[:544] for _ in range(2)])
    rem = torch.tensor([544, 500], device="cuda")
    for _ in range(2):  # the first call compiles
        torch.cuda.set_sync_debug_mode("error")
        try:
            matching.match_rounds(sim, residual, 544, 32, ROUND_SIZE)
            matching.match_rounds(sim, residual, rem, rem // 16, ROUND_SIZE)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@cuda_only
@pytest.mark.parametrize("n", [577, 2880])  # N not a multiple of 16 (scalar loads); a wide list
def test_cuda_other_widths(n):
    sim = torch.nn.functional.normalize(torch.randn(2, n, 64, device="cuda"), dim=-1)
    sim = sim @ sim.transpose(1, 2)
    w = n - 20
    residual = torch.stack([torch.randperm(n, device="cuda")[:w] for _ in range(2)])
    with torch_loop():
        want = dense_loop(sim, residual, w, 40)
    got = matching.match_rounds(sim, residual, w, 40, ROUND_SIZE)
    assert torch.equal(got[:, :40], want)


@cuda_only
def test_cuda_graph_captures_the_fused_rounds():
    graphs.clear()
    tokens, context = vispruner_cuda_inputs(8, 576, 4096, torch.bfloat16, seed=3)
    reducer = tr.create("vispruner", 64)
    with graphs.eager():
        eager = reducer(tokens, context=context)
    first = reducer(tokens, context=context)  # eager, then captured
    replays = [reducer(tokens, context=context) for _ in range(2)]
    stats = graphs.stats()
    assert not stats["failed"], stats["failed"]
    assert any(e["reducer"] == "vispruner" for e in stats["entries"])
    for out in (first, *replays):
        assert torch.equal(out.indices, eager.indices)
        assert torch.equal(out.tokens, eager.tokens)
    # Other inputs through the same graph: the replay follows them.
    other, _ = vispruner_cuda_inputs(8, 576, 4096, torch.bfloat16, seed=4)
    with graphs.eager():
        want = reducer(other, context=context)
    assert torch.equal(reducer(other, context=context).indices, want.indices)
    graphs.clear()


@cuda_only
def test_cuda_env_var_turns_the_kernel_off(monkeypatch):
    tokens, context = vispruner_cuda_inputs(1, 64, 32, torch.float32)
    reducer = tr.create("vispruner", 16)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    with graphs.eager(), mock.patch.object(matching, "match_rounds", side_effect=AssertionError("kernel called")):
        reducer(tokens, context=context)
