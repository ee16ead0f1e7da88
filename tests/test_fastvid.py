"""FastVID: the official selection and merging reproduced, conformance, DySeg/budget/DTM properties, errors, models."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import adapter_checks as checks
import numpy as np
import pytest
import test_adapter_onevision as onevision_case
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import (  # noqa: F401 - fixture
    VIDEO_TOKEN,
    media_prompt,
    one_thread,
    qwen_vl_inputs,
    seeded_pixels,
    tiny_llava,
    tiny_onevision,
    tiny_qwen2_5_vl,
)

import tokenreduce as tr
from tokenreduce import ConfigError, MissingContextError, Pipeline, ReductionContext, Stage, Step
from tokenreduce.errors import InvalidInputError, StageError
from tokenreduce.testing import check_reducer
from tokenreduce_plugins.fastvid import FastVID
from tokenreduce_plugins.fastvid_parts import density_scores

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "fastvid.npz"


def video_context(frames: int, n: int, b: int = 1, whole: bool = True) -> ReductionContext:
    """A whole video's context as the adapters give it: ``frames`` equal frames, one after another."""
    per = n // frames
    index = (torch.arange(n) // per).expand(b, n)
    return ReductionContext(frames=frames, frame_index=index, grid=(n, 1) if whole else None)


def scenes(seed: int, lengths: list[int], n: int, d: int, noise: float = 0.2) -> torch.Tensor:
    """(1, F*n, D) tokens: frames of a scene share a base (similar), scenes differ."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        base = torch.randn(n, d, generator=gen) + 0.5 * torch.randn(1, d, generator=gen)
        out += [base + noise * torch.randn(n, d, generator=gen) for _ in range(length)]
    return torch.cat(out).unsqueeze(0)


# -- the official code's output (fixtures/baselines/README.md) --------------------------------------


def _fixture():
    data = dict(np.load(FIXTURE))
    return data, sorted({int(k.split("_")[0][4:]) for k in data})


@pytest.mark.parametrize("whole", [True, False], ids=["whole-video", "frame-index"])
@pytest.mark.parametrize("k", _fixture()[1])
def test_matches_the_official_selection_and_merging(k, whole):
    data, _ = _fixture()
    get = lambda key: data[f"case{k}_{key}"]  # noqa: E731
    tokens = torch.from_numpy(get("tokens"))
    frames, n = int(get("frames")), tokens.shape[1]
    params = {
        "min_segments": int(get("min_segments")),
        "tau": float(get("tau")),
        "context_ratio": float(get("context_ratio")),
        "anchor_interval": int(get("anchor_interval")),
        "beta": float(get("beta")),
    }
    out = FastVID(int(get("budget")), **params)(tokens, context=video_context(frames, n, whole=whole))
    # The official kept set (salient + anchors), its merged features, its segments.
    assert out.indices.tolist() == get("kept").tolist()
    torch.testing.assert_close(out.tokens, torch.from_numpy(get("features")), rtol=1e-5, atol=1e-5)
    assert torch.bincount(out.info["segment"][0]).tolist() == get("segment_sizes").tolist()
    # A budget equal to the official count recovers the official retention, with no top-up.
    assert out.info["frame_retention"].tolist() == [int(n // frames * float(get("retention_ratio")))]
    assert not bool(out.info["topped_up"].any())
    # The salient score fed to the official code is our [CLS]-free stand-in.
    stand_in = torch.from_numpy(get("salient_scores"))
    torch.testing.assert_close(out.info["salient_scores"], stand_in, rtol=1e-5, atol=1e-7)


def test_fixture_covers_multi_anchor_segments_and_the_published_setting():
    data, cases = _fixture()
    for k in cases:  # every case has a segment with two or more anchor frames
        assert int(data[f"case{k}_segment_sizes"].max()) > int(data[f"case{k}_anchor_interval"])
    shapes = {
        (int(data[f"case{k}_frames"]), data[f"case{k}_tokens"].shape[1], float(data[f"case{k}_retention_ratio"]))
        for k in cases
    }
    assert (32, 32 * 196, 0.1) in shapes  # LLaVA-OneVision: 32 frames of 14x14, 10% per frame


# -- conformance ---------------------------------------------------------------------------------


def frames_for(n: int) -> int:
    return max(1, min(5, n // 3))


def whole_context(tokens, valid, stage):
    # Equal frames in order; the grid only where every token is present and frames are equal.
    b, n = valid.shape
    f = frames_for(n)
    index = (torch.arange(n, device=valid.device) * f // n).expand(b, n)
    grid = (n, 1) if n % f == 0 and bool(valid.all()) else None
    return ReductionContext(frames=f, frame_index=index, grid=grid)


def uneven_context(tokens, valid, stage):
    # Frames of unequal size (as after an earlier step), no grid: the block length is read.
    b, n = valid.shape
    f = frames_for(n) + 1
    index = (torch.arange(n, device=valid.device) ** 2 * f // max(1, n * n)).clamp(max=f - 1).expand(b, n)
    return ReductionContext(frames=f, frame_index=index)


@pytest.mark.parametrize(
    ("params", "factory"),
    [
        ({}, whole_context),
        ({"min_segments": 2, "anchor_interval": 2, "tau": 0.5}, uneven_context),
        ({"min_segments": 1, "anchor_interval": 1, "context_ratio": 1.0, "beta": 0.0}, whole_context),
    ],
    ids=["defaults", "uneven-frames", "all-context"],
)
def test_conformance_at_every_claimed_stage(params, factory):
    check_reducer(FastVID, params=params, context_factory=factory, max_examples=8, max_n=48)


# -- properties ------------------------------------------------------------------------------------


def official_cuts(sim: list[float], c: int, tau: float) -> set[int]:
    """DySeg as the official code: the c-1 smallest similarities and every one below tau."""
    order = sorted(range(len(sim)), key=lambda i: (sim[i], i))
    return set(order[: min(c - 1, len(sim))]) | {i for i, s in enumerate(sim) if s < tau}


def official_plan(sizes: list[int], retain: int, d: float, p: int) -> tuple[list[int], list[int]]:
    """The official anchor distribution loop: (salient, anchors) per frame at retention ``retain``."""
    context = int(retain * d)
    salient = retain - context
    anchors = []
    for length in sizes:
        groups = (length + p - 1) // p
        cur = context * length // groups
        anchors += [cur if (length - 1 - i) % p == 0 else 0 for i in range(length)]
    return [salient] * len(anchors), anchors


@st.composite
def videos(draw):
    frames = draw(st.integers(1, 9))
    side = draw(st.integers(2, 4))
    lengths, left = [], frames
    while left:
        lengths.append(draw(st.integers(1, left)))
        left -= lengths[-1]
    tokens = scenes(draw(st.integers(0, 2**16)), lengths, side * side, draw(st.integers(2, 8)))
    params = {
        "min_segments": draw(st.integers(1, 5)),
        "tau": draw(st.sampled_from([0.5, 0.9, 0.99])),
        "context_ratio": draw(st.sampled_from([0.0, 0.25, 0.4, 0.5])),
        "anchor_interval": draw(st.integers(1, 4)),
    }
    return tokens, frames, params


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(videos(), st.integers(1, 10**6))
def test_segments_counts_and_salient_tokens_follow_the_official_rules(video, draw_budget):
    tokens, frames, params = video
    n = tokens.shape[1]
    per = n // frames
    budget = 1 + draw_budget % (n - 1)
    out = FastVID(budget, **params)(tokens, context=video_context(frames, n))
    info = out.info
    seg = info["segment"][0].tolist()
    sim = info["frame_similarity"][0].tolist()
    # DySeg: contiguous segments, cut exactly at the official cut set.
    cuts = {t for t in range(frames - 1) if seg[t + 1] != seg[t]}
    assert seg[0] == 0 and all(seg[t + 1] - seg[t] in (0, 1) for t in range(frames - 1))
    assert cuts == official_cuts(sim, params["min_segments"], params["tau"])
    sizes = torch.bincount(info["segment"][0]).tolist()
    # The retention R: its official counts fit the budget, one more would not (or R is all).
    r = int(info["frame_retention"][0])

    def official_count(retain):
        sal, anc = official_plan(sizes, retain, params["context_ratio"], params["anchor_interval"])
        return sum(min(s + a, per) if a else min(s, per) for s, a in zip(sal, anc))

    best = max(official_count(q) for q in range(per + 1) if official_count(q) <= budget)
    assert r == min(q for q in range(per + 1) if official_count(q) == best)
    assert int(out.counts[0]) == budget
    assert int(info["topped_up"][0].sum()) == budget - official_count(r)
    # Every frame keeps its top-S tokens by salient score; anchors only on anchor frames.
    sal, anc = official_plan(sizes, r, params["context_ratio"], params["anchor_interval"])
    scores = info["salient_scores"][0].view(frames, per)
    salient = info["salient"][0].view(frames, per)
    anchors = info["anchor"][0].view(frames, per)
    density = info["density_scores"][0].view(frames, per)
    for f in range(frames):
        assert int(salient[f].sum()) == min(sal[f], per)
        assert int(anchors[f].sum()) == min(anc[f], per - min(sal[f], per))
        if bool(salient[f].any()) and bool((~salient[f]).any()):
            assert scores[f][salient[f]].min() >= scores[f][~salient[f]].max()
        others = ~salient[f] & ~anchors[f]
        if bool(anchors[f].any()) and bool(others.any()):  # anchors: the densest peaks of the rest
            assert density[f][anchors[f]].min() >= density[f][others].max()


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(videos(), st.integers(1, 10**6))
def test_merging_changes_only_anchors_and_beta_one_is_pure_pruning(video, draw_budget):
    tokens, frames, params = video
    n = tokens.shape[1]
    budget = 1 + draw_budget % (n - 1)
    ctx = video_context(frames, n)
    out = FastVID(budget, **params)(tokens, context=ctx)
    plain = out.indices[0]
    is_anchor = out.info["anchor"][0][plain]
    torch.testing.assert_close(out.tokens[0][~is_anchor], tokens[0][plain][~is_anchor], rtol=0, atol=0)
    assert float(out.sizes.sum()) <= n + 1e-4 and bool((out.sizes[0][~is_anchor] == 1).all())
    pruned = FastVID(budget, **params, beta=1.0)(tokens, context=ctx)
    assert torch.equal(pruned.indices, out.indices)
    torch.testing.assert_close(pruned.tokens[0], tokens[0][plain], rtol=0, atol=0)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(videos(), st.integers(1, 10**6), st.integers(0, 2**16))
def test_padding_is_the_same_as_dropping_the_padded_tokens(video, draw_budget, seed):
    tokens, frames, params = video
    n = tokens.shape[1]
    keep = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.7
    keep[0] = True
    m = int(keep.sum())
    budget = 1 + draw_budget % m
    ctx = video_context(frames, n, whole=False)
    padded = FastVID(budget, **params)(tokens, mask=keep.unsqueeze(0), context=ctx)
    alone_ctx = ReductionContext(frames=frames, frame_index=ctx.frame_index[:, keep])
    alone = FastVID(budget, **params)(tokens[:, keep], context=alone_ctx)
    where = keep.nonzero()[:, 0]
    k = int(alone.counts[0])
    assert padded.indices[0, :k].tolist() == where[alone.indices[0]].tolist()
    torch.testing.assert_close(padded.tokens[0, :k], alone.tokens[0], rtol=1e-5, atol=1e-5)


def test_density_score_is_the_dpc_knn_formula():
    # A direct, loop-based reading of the official density computation on one frame.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, 9, 5, generator=gen)
    pool = torch.ones(1, 1, 9, dtype=torch.bool)
    pool[0, 0, 3] = False
    got = density_scores(x, pool)[0, 0]
    idx = [i for i in range(9) if i != 3]
    pts = x[0, 0, idx]
    dist = torch.cdist(pts, pts) / math.sqrt(5)
    rho = torch.exp(-(dist.topk(4, largest=False).values ** 2).mean(-1))
    for a, i in enumerate(idx):
        higher = [dist[a, b] for b in range(len(idx)) if rho[b] > rho[a]]
        delta = min(higher) if higher else dist.max()
        torch.testing.assert_close(got[i], delta * rho[a], rtol=1e-5, atol=1e-7)
    assert float(got[3]) == 0.0


def test_equation_two_identical_frames_form_one_segment_merged_on_the_last_frame():
    # Two frames of the same 6 tokens: one segment (c=1, similarity 1); with p=4 the last
    # frame is its only anchor frame. R = 4 (d = 0.5): S = 2 salient per frame, C = 2,
    # cur = C * 2 // 1 = 4 anchors on frame 1. Budget = 2 * 2 + 4 = 8.
    gen = torch.Generator().manual_seed(7)
    frame = torch.randn(6, 4, generator=gen)
    tokens = torch.cat([frame, frame]).unsqueeze(0)
    reducer = FastVID(8, min_segments=1, tau=0.0, context_ratio=0.5, anchor_interval=4)
    out = reducer(tokens, context=video_context(2, 12))
    info = out.info
    assert info["segment"].tolist() == [[0, 0]] and info["multi_frame"].tolist() == [[False, True]]
    assert info["frame_retention"].tolist() == [4] and not bool(info["topped_up"].any())
    assert info["salient"][0].view(2, 6).sum(1).tolist() == [2, 2]
    assert info["anchor"][0].view(2, 6).sum(1).tolist() == [0, 4]
    # Frame 0's 4 non-salient tokens and frame 1's 4 anchors are the same vectors, so each
    # anchor is joined by itself and its twin in frame 0: 0.6 x + 0.4 x = x, 2 members.
    anchors = info["anchor"][0][out.indices[0]]
    torch.testing.assert_close(out.tokens[0][anchors], tokens[0][out.indices[0][anchors]])
    assert info["joined"][0][~info["salient"][0]].tolist() == [1.0] * 8
    assert out.sizes[0][anchors].tolist() == [2.0] * 4  # itself + its dropped twin


def test_equation_single_frame_anchor_blends_with_its_cluster():
    # One frame, S = 0 (d = 1), one anchor: every token joins it; w = max(1/(4+1), 0.6) = 0.6.
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 0.1], [3.0, -0.1], [1.5, 0.0]]])
    out = FastVID(1, context_ratio=1.0)(tokens, context=video_context(1, 4))
    a = int(out.indices[0, 0])
    expected = 0.6 * tokens[0, a] + 0.4 * tokens[0].mean(0)
    torch.testing.assert_close(out.tokens[0, 0], expected)
    assert out.sizes.tolist() == [[4.0]]


def test_ratio_budget_rounds_down_and_tops_up_to_the_whole_video_budget():
    tokens = scenes(3, [4, 4], 16, 8)
    out = FastVID(0.1)(tokens, context=video_context(8, 128))  # int(12.8) = 12 of 128
    assert out.counts.tolist() == [12]
    # Per frame int(16 * 0.1) = 1 salient token (C = 0): 8 kept, 4 topped up video-wide.
    assert out.info["frame_retention"].tolist() == [1] and int(out.info["topped_up"].sum()) == 4


SYNC_CHECK = """
import torch
from tokenreduce import ReductionContext
from tokenreduce.sync import HostSyncError, no_host_sync
from tokenreduce_plugins.fastvid import FastVID

gen = torch.Generator().manual_seed(11)
tokens = torch.randn(2, 128, 8, generator=gen)
tokens[:, :48] += torch.randn(2, 1, 8, generator=gen)  # a first scene of 3 frames
valid = torch.ones(2, 128, dtype=torch.bool)
counts = torch.full((2,), 30)
index = (torch.arange(128) // 16).expand(2, 128)
reducer = FastVID(30, min_segments=2)
whole = ReductionContext(frames=8, frame_index=index, grid=(128, 1), uniform_count=30)
eager = reducer.reduce(tokens, counts, valid, whole)
with no_host_sync():
    graphed = reducer.reduce(tokens, counts, valid, whole)
assert torch.equal(eager.indices, graphed.indices) and torch.equal(eager.tokens, graphed.tokens)
uneven = ReductionContext(frames=8, frame_index=index, uniform_count=30)
try:
    with no_host_sync():
        reducer.reduce(tokens, counts, valid, uneven)
except HostSyncError:
    print("uneven frames: one host read")
"""


def test_a_whole_video_is_reduced_without_reading_the_device():
    # The hot path of a whole video (grid set, no mask) decides everything from host-known
    # sizes; frames of unequal size (no grid) read the block length back, once. Run in a
    # fresh interpreter: no_host_sync patches torch.Tensor.__getitem__, and once restored
    # torch.tensor() of a list of 0-d tensors fails in this process (Qwen's rope code does that).
    done = subprocess.run([sys.executable, "-c", SYNC_CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "uneven frames: one host read"


def test_low_precision_inputs_compute_in_float32_and_keep_their_dtype():
    tokens = scenes(5, [3, 2, 3], 16, 8)
    ctx = video_context(8, 128)
    ref = FastVID(30)(tokens, context=ctx)
    for dtype in (torch.float16, torch.bfloat16):
        out = FastVID(30)(tokens.to(dtype), context=ctx)
        assert out.tokens.dtype == dtype and out.counts.tolist() == [30]
        assert (out.indices == ref.indices).float().mean() > 0.8


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"min_segments": 0}, "min_segments"),
        ({"tau": 1.5}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"context_ratio": -0.1}, "context_ratio"),
        ({"anchor_interval": 0}, "anchor_interval"),
        ({"anchor_interval": 2.5}, "anchor_interval"),
        ({"beta": 1.2}, "beta"),
        ({"segments": 4}, "segments"),
    ],
)
def test_bad_parameters_are_refused_by_name(params, field):
    with pytest.raises(ConfigError, match=field):
        tr.create("fastvid", 8, **params)


def test_missing_or_malformed_temporal_context_is_refused():
    tokens = torch.randn(2, 12, 4)
    index = (torch.arange(12) // 4).expand(2, 12)
    with pytest.raises(MissingContextError, match="frames"):
        FastVID(4)(tokens)
    with pytest.raises(MissingContextError, match="frame_index"):
        FastVID(4)(tokens, context=ReductionContext(frames=3))
    with pytest.raises(InvalidInputError, match="frames must be an int >= 1"):
        FastVID(4)(tokens, context=ReductionContext(frames=0, frame_index=index))
    with pytest.raises(InvalidInputError, match="frame_index must be an integer tensor of shape"):
        FastVID(4)(tokens, context=ReductionContext(frames=3, frame_index=index[:, :10]))
    with pytest.raises(InvalidInputError, match=r"frame_index must lie in 0..frames-1 = 0..1"):
        FastVID(4)(tokens, context=ReductionContext(frames=2, frame_index=index))
    with pytest.raises(StageError, match="llm_layer"):
        tr.create("fastvid", 4, stage="llm_layer")


# -- in models -------------------------------------------------------------------------------------

FRAMES = 8


def onevision_video(frames: int = FRAMES) -> dict:
    """One row: text, a video of ``frames`` 16-px frames (2x2 pooled tokens each + newline), text."""
    pixels = seeded_pixels((frames, 3, 16, 16), 9)
    # Frames repeat in pairs, so DySeg sees near-identical neighbours.
    pixels[1::2] = pixels[0::2] + 0.01 * seeded_pixels((frames // 2, 3, 16, 16), 10)
    ids, mask = media_prompt([[(VIDEO_TOKEN, 4 * frames + 1)]])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixels.unsqueeze(0)}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stage", ["projector", "vision_encoder"])
def test_runs_through_onevision_videos_per_video(stage):
    model = tiny_onevision(0)
    kw = onevision_video()
    stock = checks.logits(model, kw)
    pipe = Pipeline([Step(stage, FastVID(10, min_segments=2, anchor_interval=2))], video_budget="per_video")
    with tr.apply(model, pipe) as handle:
        out = model(**kw).logits
        (rec,) = handle.records
        gen = model.generate(**kw, max_new_tokens=2, do_sample=False)
    assert rec.reducer == "fastvid" and rec.stage.value == stage
    assert (rec.tokens_before, rec.tokens_after) == ([4 * FRAMES], [10])
    assert torch.isfinite(out).all() and out.shape[1] == stock.shape[1] - (4 * FRAMES - 10)
    assert gen.shape[1] == kw["input_ids"].shape[1] + 2
    assert torch.equal(checks.logits(model, kw), stock)  # restored


@pytest.mark.usefixtures("one_thread")
def test_onevision_picks_equal_fastvid_on_the_stock_pooled_video_features():
    model = tiny_onevision(0)
    kw = onevision_video()
    reducer = FastVID(12, min_segments=2, anchor_interval=2)
    with tr.apply(model, Pipeline([Step("projector", reducer)], video_budget="per_video")) as handle:
        with torch.no_grad():
            model(**kw)
        rec = handle.records[0]
    feats = onevision_case.video_features(model, kw["pixel_values_videos"])[:, :-1]  # without the newline
    ref = reducer(feats, context=video_context(FRAMES, feats.shape[1]))
    assert [i.tolist() for i in rec.indices] == ref.indices.tolist()
    assert rec.info[0]["segment"].tolist() == ref.info["segment"][0].tolist()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stage", ["projector", "vision_encoder"])
def test_runs_through_qwen2_5_vl_videos_per_video(stage):
    model = tiny_qwen2_5_vl(0)
    kw = qwen_vl_inputs([[]], [[(8, 4, 8)]])
    stock = checks.logits(model, kw)
    pipe = Pipeline([Step(stage, FastVID(0.5, min_segments=2))], video_budget="per_video")
    with tr.apply(model, pipe) as handle:
        out = model(**kw).logits
        (rec,) = handle.records
        gen = model.generate(**kw, max_new_tokens=2, do_sample=False)
    n = rec.tokens_before[0]
    assert rec.tokens_after == [n // 2] and rec.info[0]["segment"].shape[-1] > 1
    assert torch.isfinite(out).all() and out.shape[1] == stock.shape[1] - (n - n // 2)
    assert gen.shape[1] == kw["input_ids"].shape[1] + 2
    assert torch.equal(checks.logits(model, kw), stock)  # restored


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("build", "why"),
    [(tiny_onevision, "per_video"), (tiny_qwen2_5_vl, "per_video"), (tiny_llava, "frame_index, frames")],
    ids=["onevision-per-frame", "qwen-per-frame", "llava-images-only"],
)
def test_refused_at_patch_time_without_whole_videos(build, why):
    model = build(0)
    with pytest.raises(MissingContextError, match=why):
        tr.patch(model, Pipeline([Step("projector", FastVID(8))]))  # video_budget per_frame
    with pytest.raises(StageError):
        FastVID(8, stage="llm_layer")


def test_registered_and_published_at_the_projector():
    from benchmarks.end_to_end import published_stage

    assert tr.get_registry().reducer_class("fastvid") is FastVID
    assert FastVID(8)._default_stage() is Stage.PROJECTOR
    assert published_stage(FastVID) == ("projector", ())
