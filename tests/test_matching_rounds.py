"""VisPruner's parallel matching rounds (``tokenreduce_plugins.kernels.matching_rounds``) against the torch loop.

Without CUDA the two kernels run on CPU tensors through Triton's interpreter: the module is
imported with ``TRITON_INTERPRET=1`` (set only around that import), and the reducer is made
to dispatch to it. With CUDA the same property tests run the compiled kernels on the GPU,
and the CUDA-only tests compare the whole reducer with ``TOKENREDUCE_NO_TRITON`` toggled,
check that the wrapper never synchronises, and that a CUDA graph captures its launches.
Skipped where Triton is not installed (CI).

The kernels take the same maxima and the same stable order of the same float32
similarities as ``_match_round_dense``, so every comparison is exact: the lists equal the
loop's, place for place, after every round. Ties are planted everywhere (duplicate tokens,
tokens on few directions, zero tokens whose similarities are +0.0 or -0.0), and NaN
similarities, which ``amax`` propagates and the sort puts first.
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

triton, matching, matching_rounds = import_kernels("matching", "matching_rounds")

import tokenreduce as tr  # noqa: E402
from tokenreduce import ReductionContext, graphs  # noqa: E402
from tokenreduce_plugins import kernels, vispruner  # noqa: E402
from tokenreduce_plugins.vispruner import _match_round_dense, _round_sizes  # noqa: E402

skip_unless_interpreted(triton, [matching_rounds.score_kernel, matching_rounds.rebuild_kernel, matching._order_keys])
INTERPRETED = not CUDA


pytestmark = numpy_mark(triton)
PROPS = settings(max_examples=15 if INTERPRETED else 60, deadline=None, derandomize=True, database=None)
#: (block_a, tile): the defaults (one program and one tile per row at these sizes), and small
#: ones (several programs per row, several tiles per program).
SHAPES = st.sampled_from([(matching_rounds.BLOCK_A, matching_rounds.TILE), (4, 8), (2, 4)])


@contextmanager
def parallel_rounds(block_a: int = matching_rounds.BLOCK_A, tile: int = matching_rounds.TILE):
    """Dispatch VisPruner's uniform rounds to the parallel kernels on any device (CPU: the
    interpreter), with the given block and tile; the one-program kernel and the torch loop
    must not run."""
    with (
        mock.patch.object(kernels, "fused_wanted", lambda x: True),
        mock.patch.object(
            matching_rounds,
            "match_rounds_uniform",
            partial(matching_rounds.match_rounds_uniform, block_a=block_a, tile=tile),
        ),
        mock.patch.object(matching, "match_rounds", side_effect=AssertionError("one-program kernel ran")),
        mock.patch.object(vispruner, "_match_round_dense", side_effect=AssertionError("torch loop ran")),
    ):
        yield


# -- inputs ---------------------------------------------------------------------------------


@st.composite
def uniform_lists(draw, nan: bool = False):
    """Every row's list real and equally long (the reducer's unmasked form): ``(sim, residual, w, diverse)``."""
    sim, b, n, gen = draw(similarities(nan, n_min=2))
    w = draw(st.integers(1, n))
    residual = torch.stack([torch.randperm(n, generator=gen)[:w] for _ in range(b)])
    return sim, residual, w, draw(st.integers(0, w))


@st.composite
def free_sizes(draw, w: int):
    """Any sequence of round sizes a list of ``w`` allows (``0 <= r <= ceil(L/2)``, down to one token)."""
    sizes, length = [], w
    for _ in range(draw(st.integers(0, 6))):
        if length <= 1:
            break
        r = draw(st.integers(0, (length + 1) // 2))
        sizes.append(r)
        length -= r
    return sizes


def dense_loop(sim: torch.Tensor, residual: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The reducer's torch loop (``_match_round_dense``): the list before and after every round."""
    rows = torch.arange(sim.shape[0], device=sim.device).view(-1, 1, 1)
    lists = [residual]
    for r in sizes:
        lists.append(_match_round_dense(sim, lists[-1], r, rows))
    return lists


# -- the kernels against the torch loop --------------------------------------------------------------


@PROPS
@given(uniform_lists(), SHAPES)
def test_the_reducers_rounds_give_the_dense_loops_list_place_for_place(case, shape):
    sim, residual, w, diverse = case
    sizes = _round_sizes(w, diverse)
    want = dense_loop(sim, residual, sizes)[-1]  # CPU: the torch loop
    block_a, tile = shape
    got = matching_rounds.match_rounds_uniform(*on_device(sim, residual), sizes, block_a=block_a, tile=tile)
    assert torch.equal(got.cpu(), want), f"kernels:\n{got}\ntorch:\n{want}"


@PROPS
@given(st.data(), SHAPES)
def test_every_round_equals_the_loops_round(data, shape):
    # Round by round, for any sizes a list allows (r = 0, r = ceil(L/2), lists of one or two).
    sim, residual, w, _ = data.draw(uniform_lists())
    sizes = data.draw(free_sizes(w))
    want = dense_loop(sim, residual, sizes)
    sim_d, residual_d = on_device(sim, residual)
    block_a, tile = shape
    for k in range(len(sizes) + 1):
        got = matching_rounds.match_rounds_uniform(sim_d, residual_d, sizes[:k], block_a=block_a, tile=tile)
        assert torch.equal(got.cpu(), want[k]), f"after round {k} of {sizes}"


@PROPS
@given(uniform_lists(nan=True), SHAPES)
def test_nan_and_signed_zero_similarities_sort_as_torch_sorts_them(case, shape):
    # amax propagates NaN and the stable descending sort puts NaN first; -0.0 ties with +0.0.
    sim, residual, w, diverse = case
    sizes = _round_sizes(w, diverse)
    want = dense_loop(sim, residual, sizes)[-1]
    block_a, tile = shape
    got = matching_rounds.match_rounds_uniform(*on_device(sim, residual), sizes, block_a=block_a, tile=tile)
    assert torch.equal(got.cpu(), want), f"kernels:\n{got}\ntorch:\n{want}"


def test_equal_scores_keep_the_lists_order():
    # Every token the same: every a scores 1.0, so each round drops the first r a's in list order.
    n, w, diverse = 40, 37, 5
    sim = torch.ones(2, n, n)
    residual = torch.stack([torch.arange(w), torch.arange(w).flip(0)])
    sizes = _round_sizes(w, diverse)
    want = dense_loop(sim, residual, sizes)[-1]
    got = matching_rounds.match_rounds_uniform(*on_device(sim, residual), sizes, block_a=4, tile=8).cpu()
    assert torch.equal(got, want)
    # The first round by hand: a = even places 0, 2, .., 36 (19 of them), all tied; the first 8 go.
    first = matching_rounds.match_rounds_uniform(*on_device(sim, residual), sizes[:1], block_a=4, tile=8).cpu()
    assert first[0].tolist() == list(range(16, 37, 2)) + list(range(1, 37, 2))


def test_minus_zero_ties_with_plus_zero():
    # Every a's best match is 0.0 (even tokens) or -0.0 (odd ones): all equal to the sort,
    # so each round drops the first r a's in list order, whatever the sign of the zero.
    n, w, diverse = 40, 40, 6
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    sim = (sign[:, None] * torch.zeros(n, n)).unsqueeze(0).repeat(2, 1, 1)  # sim[t, :] = +-0.0
    assert bool(torch.signbit(sim[0, 1, 0])) and not bool(torch.signbit(sim[0, 0, 1]))
    residual = torch.stack([torch.arange(w), torch.randperm(w, generator=torch.Generator().manual_seed(0))])
    sizes = _round_sizes(w, diverse)
    want = dense_loop(sim, residual, sizes)[-1]
    got = matching_rounds.match_rounds_uniform(*on_device(sim, residual), sizes).cpu()
    assert torch.equal(got, want)


def test_a_nan_score_goes_first_and_is_dropped_first():
    # One a whose similarity to a b is NaN: its score is NaN, first in the order, so removed first.
    n = w = 12
    x = torch.nn.functional.normalize(torch.randn(1, n, 5, generator=torch.Generator().manual_seed(1)), dim=-1)
    sim = x @ x.transpose(1, 2)
    residual = torch.arange(w).unsqueeze(0)
    sim[0, 6, 3] = float("nan")  # a = token 6 (place 6), b = token 3 (place 3)
    got = matching_rounds.match_rounds_uniform(*on_device(sim, residual), [1]).cpu()
    assert 6 not in got[0].tolist()
    assert torch.equal(got, dense_loop(sim, residual, [1])[-1])


def test_the_input_list_is_not_modified():
    sim = torch.nn.functional.normalize(torch.randn(1, 30, 4), dim=-1)
    sim = sim @ sim.transpose(1, 2)
    residual = torch.randperm(30)[:25].unsqueeze(0)
    before = residual.clone()
    sim_d, residual_d = on_device(sim, residual)
    matching_rounds.match_rounds_uniform(sim_d, residual_d, _round_sizes(25, 6))
    assert torch.equal(residual_d.cpu(), before)


def test_a_non_contiguous_list_is_read_as_its_values():
    # The reducer passes order[:, imp:], a view with the row stride of the full order.
    sim = torch.nn.functional.normalize(torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(2)), dim=-1)
    sim = sim @ sim.transpose(1, 2)
    order = torch.stack([torch.randperm(30, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    sizes = _round_sizes(26, 7)
    want = dense_loop(sim, order[:, 4:].contiguous(), sizes)[-1]
    sim_d, order_d = on_device(sim, order)
    assert torch.equal(matching_rounds.match_rounds_uniform(sim_d, order_d[:, 4:], sizes).cpu(), want)


def test_the_wrapper_declines_what_the_kernels_do_not_take():
    sim, residual = torch.eye(4).unsqueeze(0), torch.arange(4).unsqueeze(0)
    sim, residual = on_device(sim, residual)
    mr = matching_rounds.match_rounds_uniform
    assert mr(sim.double(), residual, [2]) is None  # float32 only
    assert mr(sim, residual.int(), [2]) is None  # int64 lists only
    assert mr(sim, residual[:, :0], []) is None  # empty
    assert mr(sim[:, :, :3], residual, [2]) is None  # not square
    too_wide = torch.zeros(1, matching_rounds.MAX_W + 1, dtype=torch.long, device=DEVICE)
    assert mr(torch.zeros(1, 1, 1, device=DEVICE), too_wide, [1]) is None


def test_round_sizes_out_of_range_are_refused_naming_the_argument():
    sim, residual = on_device(torch.eye(6).unsqueeze(0), torch.arange(6).unsqueeze(0))
    with pytest.raises(ValueError, match="sizes"):
        matching_rounds.match_rounds_uniform(sim, residual, [4])  # ceil(6/2) = 3 a's
    with pytest.raises(ValueError, match="sizes"):
        matching_rounds.match_rounds_uniform(sim, residual, [3, 3])  # 3 of 6, then 3 of 3 (only 2 a's)
    with pytest.raises(ValueError, match="sizes"):
        matching_rounds.match_rounds_uniform(sim, residual, [-1])


def test_an_emptied_list_stays_empty():
    sim, residual = on_device(torch.eye(3).unsqueeze(0), torch.tensor([[2, 0, 1]]))
    got = matching_rounds.match_rounds_uniform(sim, residual, [2, 1, 0])  # 3 -> 1 -> 0 -> 0
    assert got.shape == (1, 0)


# -- the reducer: the parallel rounds against the torch loop ----------------------------------------


@st.composite
def reducer_cases(draw):
    """``(tokens, cls_attention, budget, ratio)`` on CPU, ties planted; no mask (the uniform case)."""
    b, n = draw(st.integers(1, 3)), draw(st.integers(4, 64))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tokens = tied_tokens(draw, gen, b, n)
    att = torch.rand(b, n, generator=gen)
    if draw(st.booleans()):
        att = (att * 4).round()  # tied attention: the stable order decides the residual list
    budget = draw(st.integers(1, n))
    ratio = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return tokens.to(dtype), att, budget, ratio


def _run(tokens, att, budget, ratio, mask=None):
    reducer = tr.create("vispruner", budget, important_ratio=ratio)
    with graphs.eager():
        return reducer(tokens, mask=mask, context=ReductionContext(cls_attention=att))


@PROPS
@given(reducer_cases(), SHAPES)
def test_reducer_keeps_the_same_tokens_with_the_parallel_rounds_and_the_torch_loop(case, shape):
    tokens, att, budget, ratio = case
    want = _run(tokens, att, budget, ratio)  # CPU: the torch loop
    with parallel_rounds(*shape):
        got = _run(*on_device(tokens, att), budget, ratio)
    assert_same_reduction(got, want)


def test_reducer_through_the_parallel_rounds_reproduces_the_official_fixture():
    check_vispruner_fixture(parallel_rounds)


def test_a_padding_mask_keeps_the_one_program_kernel():
    tokens = torch.randn(2, 20, 4)
    att = torch.rand(2, 20)
    mask = torch.arange(20)[None] < torch.tensor([[20], [13]])
    want = _run(tokens, att, 6, 0.5, mask)
    with (
        mock.patch.object(kernels, "fused_wanted", lambda x: True),
        mock.patch.object(matching_rounds, "match_rounds_uniform", side_effect=AssertionError("parallel rounds ran")),
        mock.patch.object(vispruner, "_fused_rounds", wraps=vispruner._fused_rounds) as spy,
    ):
        got = _run(*on_device(tokens, att), 6, 0.5, mask.to(DEVICE))
    assert spy.call_count == 1
    assert torch.equal(got.indices.cpu(), want.indices)


def test_enabled_off_sends_the_uniform_case_back_to_the_one_program_kernel():
    tokens, att = torch.randn(1, 24, 4), torch.rand(1, 24)
    want = _run(tokens, att, 8, 0.5)
    with (
        mock.patch.object(matching_rounds, "ENABLED", False),
        mock.patch.object(kernels, "fused_wanted", lambda x: True),
        mock.patch.object(matching_rounds, "match_rounds_uniform", side_effect=AssertionError("parallel rounds ran")),
        mock.patch.object(matching, "match_rounds", wraps=matching.match_rounds) as one_program,
    ):
        got = _run(*on_device(tokens, att), 8, 0.5)
    assert one_program.call_count == 1
    assert torch.equal(got.indices.cpu(), want.indices)


def test_cpu_tensors_take_the_torch_loop():
    sim, residual = torch.eye(4).unsqueeze(0), torch.arange(4).unsqueeze(0)
    with mock.patch.object(matching_rounds, "match_rounds_uniform", side_effect=AssertionError("kernels called on CPU")):
        assert vispruner._fused_uniform(sim, residual, [1]) is None


# -- CUDA: the whole reducer, no syncs, graph capture -------------------------------------------------

@cuda_only
@pytest.mark.parametrize("b", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_reducer_parallel_rounds_equal_torch_loop(b, dtype):
    assert kernels.fused_wanted(torch.zeros(1, device="cuda"))
    n, t = 576, 64
    tokens, context = vispruner_cuda_inputs(b, n, 4096, dtype)
    reducer = tr.create("vispruner", t)
    with (  # the parallel kernels, not the one-program kernel nor the loop
        graphs.eager(),
        mock.patch.object(matching, "match_rounds", side_effect=AssertionError("one-program kernel ran")),
        mock.patch.object(vispruner, "_match_round_dense", side_effect=AssertionError("torch loop ran")),
    ):
        got = reducer(tokens, context=context)
    with graphs.eager(), torch_loop():
        want = reducer(tokens, context=context)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.tokens, want.tokens)


@cuda_only
def test_cuda_wrapper_never_synchronises():
    sim = torch.nn.functional.normalize(torch.randn(2, 576, 256, device="cuda"), dim=-1)
    sim = sim @ sim.transpose(1, 2)
    residual = torch.stack([torch.randperm(576, device="cuda") for _ in range(2)])[:, 32:]
    sizes = _round_sizes(544, 32)
    for _ in range(2):  # the first call compiles
        torch.cuda.set_sync_debug_mode("error")
        try:
            matching_rounds.match_rounds_uniform(sim, residual, sizes)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@cuda_only
@pytest.mark.parametrize("n", [577, 2880])  # N not a multiple of 16; a wide list (several blocks of rank tiles)
def test_cuda_other_widths(n):
    sim = torch.nn.functional.normalize(torch.randn(2, n, 64, device="cuda"), dim=-1)
    sim = sim @ sim.transpose(1, 2)
    w = n - 20
    residual = torch.stack([torch.randperm(n, device="cuda")[:w] for _ in range(2)])
    sizes = _round_sizes(w, 40)
    want = dense_loop(sim, residual, sizes)[-1]
    got = matching_rounds.match_rounds_uniform(sim, residual, sizes)
    assert torch.equal(got, want)


@cuda_only
def test_cuda_graph_captures_the_parallel_rounds():
    graphs.clear()
    tokens, context = vispruner_cuda_inputs(8, 576, 4096, torch.bfloat16, seed=3)
    reducer = tr.create("vispruner", 64)
    with graphs.eager(), torch_loop():
        loop = reducer(tokens, context=context)
    with mock.patch.object(matching, "match_rounds", side_effect=AssertionError("one-program kernel ran")):
        first = reducer(tokens, context=context)  # eager, then captured
        replays = [reducer(tokens, context=context) for _ in range(2)]
        stats = graphs.stats()
        assert not stats["failed"], stats["failed"]
        assert any(e["reducer"] == "vispruner" for e in stats["entries"])
        for out in (first, *replays):
            assert torch.equal(out.indices, loop.indices)
            assert torch.equal(out.tokens, loop.tokens)
        # Other inputs through the same graph: the replay follows them.
        other, _ = vispruner_cuda_inputs(8, 576, 4096, torch.bfloat16, seed=4)
        with graphs.eager(), torch_loop():
            want = reducer(other, context=context)
        assert torch.equal(reducer(other, context=context).indices, want.indices)
    graphs.clear()


@cuda_only
def test_cuda_env_var_turns_the_kernels_off(monkeypatch):
    tokens, context = vispruner_cuda_inputs(1, 64, 32, torch.float32)
    reducer = tr.create("vispruner", 16)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    with (
        graphs.eager(),
        mock.patch.object(matching_rounds, "match_rounds_uniform", side_effect=AssertionError("kernels called")),
        mock.patch.object(matching, "match_rounds", side_effect=AssertionError("kernel called")),
    ):
        reducer(tokens, context=context)
