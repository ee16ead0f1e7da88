"""The cheaper formulations of issue 19 ("Reducer cost") equal what they replace.

Each rewrite of a hot loop is checked against the formulation it replaced (kept here as the
reference, written as it was) on random inputs, bit for bit; ToMe's uniform path (which now
works on the live tokens only) against its general, masked path; and the graph cache's
detection of context tensors a captured call never reads (no copy-in before its replays),
with a stand-in for a CUDA graph, so it runs on CPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce import graphs
from tokenreduce_plugins.cdpruner import greedy_map
from tokenreduce_plugins.holitom_ops import pair_similar, segment_starts, static_runs, window_gains
from tokenreduce_plugins.prunevid_cluster import refine_segments

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- PruneVid's temporal segments ---------------------------------------------------------


def refine_segments_reference(labels: torch.Tensor) -> torch.Tensor:
    """``refine_segments`` as it was before issue 19 (per-frame masks, fills and a copy a step)."""
    b, t = labels.shape
    dev = labels.device
    pos = torch.arange(t, device=dev).expand(b, t)
    change = torch.ones(b, t, dtype=torch.bool, device=dev)
    change[:, 1:] = labels[:, 1:] != labels[:, :-1]
    run_id = change.long().cumsum(dim=1) - 1
    run_len = torch.zeros(b, t, dtype=torch.long, device=dev).scatter_add_(1, run_id, torch.ones_like(run_id))
    run_len = run_len.gather(1, run_id)
    longest = torch.zeros(b, t, dtype=torch.long, device=dev).scatter_reduce(1, labels, run_len, "amax")
    longest = longest.gather(1, labels)
    kept = (run_len == longest) & (longest > 1)
    first_kept = torch.where(kept, pos, torch.full_like(pos, t)).flip(1).cummin(dim=1).values.flip(1)
    has_right = first_kept < t
    right_label = labels.gather(1, first_kept.clamp(max=t - 1))
    right_len = torch.where(has_right, run_len.gather(1, first_kept.clamp(max=t - 1)), torch.zeros_like(run_len))
    final = torch.empty_like(labels)
    prev_label = torch.full((b,), -1, dtype=torch.long, device=dev)
    prev_len = torch.zeros(b, dtype=torch.long, device=dev)
    for i in range(t):
        starts = ~kept[:, i] if i == 0 else ~kept[:, i] & kept[:, i - 1]
        chosen = torch.where(
            right_len[:, i] > prev_len,
            right_label[:, i],
            torch.where(prev_len > 0, prev_label, torch.zeros_like(prev_label)),
        )
        label = torch.where(kept[:, i], labels[:, i], torch.where(starts, chosen, prev_label))
        prev_len = torch.where(label == prev_label, prev_len + 1, torch.ones_like(prev_len))
        prev_label = label
        final[:, i] = label
    new = torch.zeros(b, t, dtype=torch.long, device=dev)
    new[:, 1:] = (final[:, 1:] != final[:, :-1]).long()
    return new.cumsum(dim=1)


@SETTINGS
@given(b=st.integers(1, 4), t=st.integers(1, 20), labels=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_prunevid_segments_equal_the_previous_loop(b, t, labels, seed):
    gen = torch.Generator().manual_seed(seed)
    # Few labels over many frames: runs of every length, repeated labels, ties of run lengths.
    lab = torch.randint(0, min(labels, t), (b, t), generator=gen)
    assert torch.equal(refine_segments(lab), refine_segments_reference(lab))


# -- CDPruner's greedy MAP ----------------------------------------------------------------


def greedy_map_reference(kernel, counts, valid, t):
    """``greedy_map`` as it was before issue 19 (guarded square root, scalar fills each step)."""
    b, n, _ = kernel.shape
    cis = kernel.new_zeros(b, t, n)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    slots = tr.ops.slot_mask(counts, t)
    available = valid.clone()
    floor = -torch.finfo(kernel.dtype).max
    picks = []
    for i in range(t):
        score = torch.where(available, di2s.nan_to_num(nan=floor, neginf=floor), float("-inf"))
        j = score.argmax(dim=1, keepdim=True)
        d2 = di2s.gather(1, j)
        ok = d2 > 0
        num = kernel.gather(1, j.unsqueeze(2).expand(b, 1, n)).squeeze(1)
        if i > 0:
            done = cis[:, :i]
            num = num - (done.gather(2, j.unsqueeze(1).expand(b, i, 1)) * done).sum(dim=1)
        eis = torch.where(ok, num / torch.sqrt(torch.where(ok, d2, 1.0)), 0.0)
        cis[:, i] = eis
        di2s = di2s - torch.square(eis)
        available.scatter_(1, j, False)
        picks.append(j)
    return torch.cat(picks, dim=1).masked_fill(~slots, -1), slots


@SETTINGS
@given(
    b=st.integers(1, 3),
    n=st.integers(2, 24),
    d=st.sampled_from([2, 4, 32]),
    seed=st.integers(0, 2**16),
    degenerate=st.sampled_from(["none", "duplicates", "zeros", "low_rank"]),
    data=st.data(),
)
def test_cdpruner_greedy_map_equals_the_previous_loop(b, n, d, seed, degenerate, data):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen)
    if degenerate == "duplicates":
        x[:, n // 2 :] = x[:, : n - n // 2].clone()
    elif degenerate == "zeros":
        x[:, ::3] = 0
    elif degenerate == "low_rank":
        x = x[..., :1].expand(b, n, d).contiguous()  # more picks than the kernel's rank
    x = torch.nn.functional.normalize(x, dim=-1)
    rel = torch.rand(b, n, generator=gen) + 1e-3
    kernel = rel.unsqueeze(2) * (x @ x.transpose(1, 2)) * rel.unsqueeze(1)
    valid = torch.rand(b, n, generator=gen) > 0.2
    valid[:, 0] = True
    t = data.draw(st.integers(1, n))
    counts = valid.sum(dim=1).clamp(max=t)
    got, got_slots = greedy_map(kernel, counts, valid, t)
    want, want_slots = greedy_map_reference(kernel, counts, valid, t)
    assert torch.equal(got, want) and torch.equal(got_slots, want_slots)


# -- ToMe: the uniform path on live tokens only -------------------------------------------


@SETTINGS
@given(
    b=st.integers(1, 3),
    n=st.integers(2, 80),
    d=st.sampled_from([4, 16, 64]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    data=st.data(),
)
def test_tome_uniform_path_equals_the_masked_path(b, n, d, seed, dtype, data):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen).to(dtype)
    t = data.draw(st.integers(1, n - 1))
    reducer = tr.create("tome", t)
    fast = reducer(x)  # no mask: uniform_count, rounds planned on the host
    general = reducer(x, mask=torch.ones(b, n, dtype=torch.bool))  # per-row counts, sorts
    assert torch.equal(fast.indices, general.indices)
    assert torch.equal(fast.sizes, general.sizes)
    assert torch.equal(fast.info["assignment"], general.info["assignment"])
    assert fast.info["rounds"] == general.info["rounds"]
    # Similarities of a smaller matrix may round differently in the last bit: features are
    # equal up to float32 rounding (and the kept sets above exactly).
    torch.testing.assert_close(fast.tokens.float(), general.tokens.float(), rtol=1e-5, atol=1e-5)


# -- the graph cache: context tensors a captured call never reads -------------------------


class _ReplayOnCPU:
    """A stand-in for a captured CUDA graph: ``replay()`` reruns the call, writing its result
    into the captured output's buffers, as a replay does."""

    def __init__(self, run, static, out):
        self.run, self.static, self.out = run, static, out

    def replay(self) -> None:
        new = self.run(*self.static)
        for k, v in new.items():
            self.out[k].copy_(v)


def _unread(run, static):
    with graphs._Reads() as reads:
        out = run(*static)
    return graphs._unread_inputs(_ReplayOnCPU(run, static, out), static, out, reads.storages)


def _inputs():
    return [
        torch.randn(2, 5, 3),  # tokens: always copied
        torch.rand(2, 5),  # read by an operator
        torch.rand(2, 5),  # never read
        torch.ones(2, 4, dtype=torch.bool),  # never read
        torch.arange(5).expand(2, 5),  # never read, but an integer input: always copied
    ]


def test_inputs_no_operator_reads_are_not_copied():
    def run(x, a, unused, mask, positions):
        return {"out": x.sum(-1) * a}

    assert _unread(run, _inputs()) == {2, 3}


def test_a_read_the_operators_do_not_see_keeps_every_copy():
    # A kernel launched outside PyTorch's operators (Triton, an extension) reads input 2:
    # simulated by reading it with the recording mode switched off.
    from torch.utils._python_dispatch import _disable_current_modes

    def run(x, a, hidden, mask, positions):
        with _disable_current_modes():
            extra = hidden * 2
        return {"out": x.sum(-1) * a + extra}

    assert _unread(run, _inputs()) == frozenset()


def test_an_output_that_is_an_input_keeps_every_copy():
    def run(x, a, returned, mask, positions):
        return {"out": x.sum(-1), "context": returned}  # returned as is: no operator sees it

    assert _unread(run, _inputs()) == frozenset()


def test_results_compare_bit_for_bit_with_nan_at_the_same_places():
    a = torch.tensor([1.0, float("nan")])
    assert graphs._same({"x": a, "n": 3}, {"x": a.clone(), "n": 3})
    assert not graphs._same({"x": a}, {"x": torch.tensor([1.0, 2.0])})
    assert not graphs._same({"x": a}, {"x": a.double()})
    assert not graphs._same({"x": a, "n": 3}, {"x": a, "n": 4})


@pytest.mark.parametrize("name", ["holitom", "holitom-llm", "fastvid"])
def test_the_video_and_inner_llm_reducers_are_graph_safe(name):
    # Replayed from CUDA graphs since issue 19; test_graph_safe.py proves they read nothing back.
    assert tr.get_registry().reducers[name].cls.graph_safe


# -- HoliTom's segment DP and backtrack ---------------------------------------------------


def segment_starts_reference(gain: torch.Tensor, max_window: int) -> torch.Tensor:
    """``segment_starts`` as it was before issue 19 (per-frame index tensors; a T-step backtrack)."""
    b, t, _ = gain.shape
    dev = gain.device
    dp = gain.new_zeros(b, t + 1)
    first = gain.new_zeros(b, t)
    for i in range(t):
        starts = torch.arange(i, i - min(i + 1, max_window), -1, device=dev)
        cand = dp[:, starts] + gain[:, starts, i]
        best = cand.argmax(dim=1, keepdim=True)
        dp[:, i + 1] = cand.gather(1, best).squeeze(1)
        first[:, i] = i - best.squeeze(1)
    is_start = torch.zeros(b, t + 1, dtype=torch.bool, device=dev)
    cur = torch.full((b,), t - 1, dtype=torch.long, device=dev)
    for _ in range(t):
        active = cur >= 0
        s = first.gather(1, cur.clamp(min=0).unsqueeze(1)).squeeze(1)
        is_start.scatter_(1, torch.where(active, s, t).unsqueeze(1), True)
        cur = torch.where(active, s - 1, cur)
    frame = torch.arange(t, device=dev).expand(b, t)
    return torch.where(is_start[:, :t], frame, 0).cummax(dim=1).values


@SETTINGS
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 40),
    max_window=st.integers(1, 12),
    high=st.sampled_from([1, 3, 50]),
    seed=st.integers(0, 2**16),
)
def test_holitom_segments_equal_the_previous_loops(b, t, max_window, high, seed):
    gen = torch.Generator().manual_seed(seed)
    # Gains as window_gains makes them (0 on and below the diagonal), small ranges for ties.
    gain = torch.randint(0, high + 1, (b, t, t), generator=gen).triu(diagonal=1)
    assert torch.equal(segment_starts(gain, max_window), segment_starts_reference(gain, max_window))


@SETTINGS
@given(b=st.integers(1, 2), frames=st.integers(1, 12), side=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_holitom_segments_equal_the_previous_loops_on_real_gains(b, frames, side, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, side * side, 8, generator=gen)
    # Frames that repeat the previous one at some positions: long static runs, as in video.
    x = base + (torch.rand(b, frames, side * side, 1, generator=gen) > 0.7) * torch.randn(
        b, frames, side * side, 8, generator=gen
    )
    ok = torch.ones(b, frames, side * side, dtype=torch.bool)
    gain = window_gains(static_runs(pair_similar(x, ok, 0.8)))
    for max_window in (1, 2, 4, frames):
        assert torch.equal(segment_starts(gain, max_window), segment_starts_reference(gain, max_window))


# -- MustDrop: round one's groups are the tokens themselves --------------------------------


@SETTINGS
@given(
    b=st.integers(1, 3),
    side=st.integers(2, 9),
    d=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**16),
    duplicate=st.booleans(),
    data=st.data(),
)
def test_mustdrop_without_a_mask_equals_the_grouping_pass(b, side, d, seed, duplicate, data):
    gen = torch.Generator().manual_seed(seed)
    n = side * side
    x = torch.randn(b, n, d, generator=gen)
    if duplicate:
        x[:, 1::2] = x[:, 0::2][:, : x[:, 1::2].shape[1]]  # equal windows: ties in every similarity
    x[:, 0, 0] = -0.0  # a signed zero, which the grouping pass's sums make +0.0
    t = data.draw(st.integers(1, n - 1))
    reducer = tr.create("mustdrop", t, stage="vision_encoder")
    context = tr.ReductionContext(grid=(side, side))
    fast = reducer(x, context=context)  # no mask: round one skips the grouping pass
    general = reducer(x, mask=torch.ones(b, n, dtype=torch.bool), context=context)
    for field in ("tokens", "indices", "sizes"):
        assert torch.equal(getattr(fast, field), getattr(general, field)), field
    assert torch.equal(fast.info["assignment"], general.info["assignment"])
