"""PruneVid: the official selection reproduced, conformance, segment/budget/merge properties, errors, video models."""

from __future__ import annotations

from pathlib import Path

import adapter_checks as checks
import numpy as np
import pytest
import test_adapter_onevision as onevision
import test_adapter_qwen as qwen_case
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import VIDEO_TOKEN, media_prompt, one_thread, qwen_vl_inputs, seeded_pixels  # noqa: F401 - fixture
from models import tiny_llava, tiny_onevision, tiny_qwen2_5_vl

import tokenreduce
from tokenreduce import ConfigError, MissingContextError, Pipeline, ReductionContext, Step, create
from tokenreduce.errors import InvalidInputError
from tokenreduce.reducer import observe
from tokenreduce.testing import check_reducer
from tokenreduce_plugins.prunevid import PruneVid, PruneVidLLM
from tokenreduce_plugins.prunevid_cluster import apportion, dpc_knn, refine_segments

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "prunevid.npz"
DATA = dict(np.load(FIXTURE))
ENCODER_CASES = sorted({int(k.split("_")[0][4:]) for k in DATA if k.endswith("_assignment")})
LLM_CASES = sorted({int(k.split("_")[0][4:]) for k in DATA if k.endswith("_attention_heads")})


def get(k: int, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(DATA[f"case{k}_{key}"]))


def video_context(frames: int, n: int) -> ReductionContext:
    return ReductionContext(frames=frames, grid=(n, 1))


def prunevid(budget, tokens, frames, mask=None, **params):
    return PruneVid(budget, **params)(tokens, mask=mask, context=video_context(frames, tokens.shape[1]))


def canonical(assign: torch.Tensor) -> list[int]:
    """A partition as, per token, the first token of its part (-1 stays -1)."""
    first: dict[int, int] = {}
    return [-1 if v < 0 else first.setdefault(v, i) for i, v in enumerate(assign.tolist())]


# -- the official code's output (fixtures/baselines/README.md) --------------------------------------


@pytest.mark.parametrize("k", ENCODER_CASES)
def test_merge_matches_the_official_partition_and_features(k):
    tokens, frames = get(k, "tokens"), int(get(k, "frames"))
    params = {
        "tau": float(get(k, "tau")),
        "segment_ratio": float(get(k, "segment_ratio")),
        "cluster_ratio": float(get(k, "cluster_ratio")),
        "k": int(get(k, "k")),
    }
    budget = int(get(k, "budget"))
    grid = tuple(get(k, "grid").tolist())
    out = PruneVid(budget, **params)(tokens, context=ReductionContext(frames=frames, grid=grid))
    info = out.info
    # The official thresholds give the budget the fixture recorded, and our split reproduces them.
    assert info["official_count"].tolist() == [budget] and out.counts.tolist() == [budget]
    assert torch.bincount(info["segment"][0]).tolist() == get(k, "windows").tolist()
    assert torch.equal(info["static"][0], get(k, "static"))
    # The same tokens are merged together...
    official = get(k, "assignment")
    ours = info["assignment"][0]
    assert canonical(ours) == canonical(official)
    # ... into the same features and sizes (slot of each official output token, via a member).
    slot = torch.empty(budget, dtype=torch.long)
    slot[official] = ours
    torch.testing.assert_close(out.tokens[0, slot], get(k, "features"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.sizes[0, slot], get(k, "sizes"))
    # Per segment, as many static and dynamic clusters as the official code returned.
    group = info["group"][0][out.indices[0]]
    segment = info["segment"][0]
    static_kept = torch.bincount(group[group >= frames] - frames, minlength=len(segment.unique()))
    dynamic_kept = torch.bincount(segment[group[group < frames]], minlength=len(segment.unique()))
    assert static_kept.tolist() == get(k, "static_sizes").tolist()
    assert dynamic_kept.tolist() == get(k, "dynamic_sizes").tolist()


def test_fixture_covers_clustered_small_and_relabelled_groups():
    windows = [get(k, "windows").tolist() for k in ENCODER_CASES]
    static = [get(k, "static_sizes").tolist() for k in ENCODER_CASES]
    assert any(max(s) > 14 for s in static) and any(0 < max(s) <= 14 for s in static)  # clustered and whole
    assert any(max(s) == 0 for s in static)  # a video without static tokens
    # Some segmentation differs from the runs of the raw DPC labels: the relabelling acted.
    runs = [torch.unique_consecutive(get(k, "temporal_labels"), return_counts=True)[1].tolist() for k in ENCODER_CASES]
    assert any(r != w for r, w in zip(runs, windows))


@pytest.mark.parametrize("k", LLM_CASES)
def test_llm_selection_matches_the_official_prefill(k):
    # The official rows are maximised over heads, then over the text tokens; given the
    # head maximum, the reducer keeps the official tokens, by ratio (floor) or by count.
    att = get(k, "attention_heads").amax(dim=0, keepdim=True)
    tokens = torch.randn(1, att.shape[-1], 4, generator=torch.Generator().manual_seed(k))
    official = get(k, "kept").tolist()
    for budget in (float(get(k, "alpha")), int(get(k, "budget"))):
        out = PruneVidLLM(budget, stage="llm_layer")(tokens, context=ReductionContext(attention=att))
        assert out.indices[0].tolist() == official


# -- conformance ---------------------------------------------------------------------------------


def frames_of(n: int) -> int:
    return max(f for f in (1, 2, 3, 4, 5) if n % f == 0)


def kit_context(tokens, valid, stage):
    return video_context(frames_of(tokens.shape[1]), tokens.shape[1])


def attention_context(tokens, valid, stage):
    f = tokens.float()
    att = torch.softmax(torch.stack([f.sum(-1), f[..., 0], -f.sum(-1)], dim=1), dim=-1)
    return ReductionContext(attention=att, text_mask=torch.tensor([True, True, False]).expand(tokens.shape[0], 3))


@pytest.mark.parametrize(
    "params",
    [{}, {"tau": 0.0, "k": 2, "small_group": 0, "segment_ratio": 1.0, "cluster_ratio": 0.2}],
    ids=["defaults", "greedy-merge"],
)
def test_conformance(params):
    check_reducer(PruneVid, params=params, context_factory=kit_context, max_examples=20)


def test_llm_conformance():
    check_reducer(PruneVidLLM, context_factory=attention_context, max_examples=20)


# -- properties ------------------------------------------------------------------------------------


def refine_reference(labels: list[int]) -> list[int]:
    """The segmentation rule, one frame run at a time in plain Python (see refine_segments)."""
    t = len(labels)
    runs, start = [], 0
    for i in range(1, t + 1):
        if i == t or labels[i] != labels[start]:
            runs.append((start, i - 1, labels[start]))
            start = i
    longest: dict[int, int] = {}
    for s, e, lab in runs:
        longest[lab] = max(longest.get(lab, 0), e - s + 1)
    out = list(labels)
    for s, e, lab in runs:
        if longest[lab] == 1 or e - s + 1 < longest[lab]:
            out[s : e + 1] = [-1] * (e - s + 1)
    i = 0
    while i < t:
        if out[i] != -1:
            i += 1
            continue
        s = i
        while i < t and out[i] == -1:
            i += 1
        e = i - 1
        left_len = right_len = 0
        if s > 0:
            j = s - 1
            while j >= 0 and out[j] == out[s - 1]:
                j -= 1
            left_len = s - 1 - j
        if e < t - 1:
            j = e + 1
            while j < t and out[j] == out[e + 1]:
                j += 1
            right_len = j - e - 1
        if right_len > left_len:
            new = out[e + 1]
        else:
            new = out[s - 1] if s > 0 else 0
        out[s : e + 1] = [new] * (e - s + 1)
    seg = [0]
    for i in range(1, t):
        seg.append(seg[-1] + (out[i] != out[i - 1]))
    return seg


@st.composite
def frame_labels(draw):
    """Rows of per-frame cluster labels; labels are centre indices, so below T."""
    t = draw(st.integers(1, 14))
    row = st.lists(st.integers(0, min(4, t - 1)), min_size=t, max_size=t)
    return draw(st.lists(row, min_size=1, max_size=3))


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(frame_labels())
def test_segments_follow_the_relabelling_rule(rows):
    labels = torch.tensor(rows)
    seg = refine_segments(labels)
    for b, row in enumerate(rows):
        assert seg[b].tolist() == refine_reference(row)
        # Every segment spans at least two frames (a longest run is >= 2, others join one).
        if len(row) > 1:
            assert int(torch.bincount(seg[b]).min()) >= 2


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=8), st.data())
def test_apportion_is_exact_and_proportional(weights, data):
    w = torch.tensor([weights])
    total = data.draw(st.integers(0, sum(weights)))
    share = apportion(torch.tensor([total]), w)[0]
    assert int(share.sum()) == total
    assert bool((share[w[0] == 0] == 0).all())
    if sum(weights):
        quota = total * w[0].double() / sum(weights)
        assert bool(((share - quota).abs() < 1).all())
    assert torch.equal(apportion(torch.tensor([sum(weights)]), w)[0], w[0])  # the whole: every weight


@st.composite
def video(draw):
    b = draw(st.integers(1, 2))
    t = draw(st.integers(1, 6))
    per = draw(st.integers(2, 20))
    d = draw(st.integers(2, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = torch.randn(b, 1, per, d, generator=gen)
    # Frames = a shared base plus noise of a drawn level per position: static and dynamic mixed.
    level = torch.rand(b, 1, per, 1, generator=gen) * draw(st.sampled_from([0.2, 1.0, 3.0]))
    tokens = (base + level * torch.randn(b, t, per, d, generator=gen)).reshape(b, t * per, d)
    budget = draw(st.integers(1, t * per - 1))  # below N: a real reduction
    params = {"tau": draw(st.sampled_from([0.5, 0.8, 0.95])), "small_group": draw(st.sampled_from([0, 3, 14]))}
    return tokens, t, budget, params


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(video())
def test_clusters_are_means_of_whole_groups(case):
    tokens, t, budget, params = case
    b, n, _ = tokens.shape
    per = n // t
    out = prunevid(budget, tokens, t, **params)
    info = out.info
    for r in range(b):
        assign, group = info["assignment"][r], info["group"][r]
        seg, static = info["segment"][r], info["static"][r].view(t, per)
        assert int(out.counts[r]) == min(budget, n)
        # Every output token is the mean of the input tokens merged into it; sizes count them.
        for j in range(int(out.counts[r])):
            members = assign == j
            torch.testing.assert_close(out.tokens[r, j], tokens[r][members].mean(0), rtol=1e-5, atol=1e-5)
            assert float(out.sizes[r, j]) == int(members.sum())
            assert len(set(group[members].tolist())) == 1  # clusters never mix groups
            assert bool(members[out.indices[r, j]])  # kept at the place of one of its members
        # A static position's tokens of one segment all go to one output token.
        a = assign.view(t, per)
        for s in seg.unique().tolist():
            fr = (seg == s).nonzero()[:, 0]
            for pos in static[fr[0]].nonzero()[:, 0].tolist():
                assert bool(static[fr, pos].all()) and len(set(a[fr, pos].tolist())) == 1


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(video())
def test_the_official_count_gives_every_group_its_official_clusters(case):
    tokens, t, _, params = case
    b, n, _ = tokens.shape
    counts = PruneVid(1, **params)(tokens, context=video_context(t, n)).info["official_count"]
    for r in range(b):
        count = int(counts[r])
        if not 0 < count < n:  # nothing to cluster, or the identity
            continue
        out = prunevid(count, tokens[r : r + 1], t, **params)
        group = out.info["group"][0]
        # A group's size in tokens; a static group holds each position once per frame of its segment.
        size = torch.bincount(group, minlength=2 * t)
        frames = torch.bincount(out.info["segment"][0], minlength=t).clamp(min=1)
        size = torch.cat([size[:t], size[t:] // frames])
        official = torch.where(size > params["small_group"], size // 2, size)  # int(n * 0.5)
        assert torch.equal(torch.bincount(group[out.indices[0]], minlength=2 * t), official)


def test_a_still_video_keeps_one_frame_of_merged_tokens():
    frame = torch.randn(1, 1, 16, 8, generator=torch.Generator().manual_seed(0))
    tokens = frame.expand(1, 6, 16, 8).reshape(1, 96, 8)
    out = prunevid(16, tokens, 6)
    assert out.info["segment"].tolist() == [[0] * 6] and bool(out.info["static"].all())
    assert out.indices.tolist() == [list(range(16))]  # at the first frame's places
    torch.testing.assert_close(out.tokens[0], frame[0, 0])
    assert out.sizes.tolist() == [[6.0] * 16]


def test_budgets_above_the_merged_count_turn_the_least_similar_static_positions_dynamic():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 1, 8, 4, generator=gen)
    noise = torch.linspace(0.01, 0.3, 8).view(1, 1, 8, 1)  # position 7 is the least similar
    tokens = (base + noise * torch.randn(1, 4, 8, 4, generator=gen)).reshape(1, 32, 4)
    merged = prunevid(8, tokens, 4, tau=0.5)  # similarities 0.94-1.00 at positions 0-6, 0.60 at 7
    assert bool(merged.info["static"].all())
    more = prunevid(11, tokens, 4, tau=0.5)  # 3 more tokens: position 7 back to its 4 frames
    static = more.info["static"].view(4, 8)
    assert static[:, :7].all() and not static[:, 7].any()
    assert more.indices[0].tolist() == list(range(8)) + [15, 23, 31]


def test_dpc_knn_equations_on_a_line():
    # Points 0, 1, 3, 10 (D = 1), k = 2 (itself and its nearest): squared nearest distances
    # 1, 1, 4, 49 -> densities e^-0.5, e^-0.5 (a tie: the lower index counts as denser),
    # e^-2, e^-24.5. Distance to the nearest denser point: 10 (the largest, for the densest),
    # 1, 2, 7 -> scores 6.07, 0.61, 0.27, ~0. Two centres: points 0 and 1; 3 and 10 are
    # nearer to 1 (2 < 3, 9 < 10).
    pts = torch.tensor([[[0.0], [1.0], [3.0], [10.0]]])
    every = torch.ones(1, 4, dtype=torch.bool)
    assign, center = dpc_knn(pts, every, torch.tensor([2]), k=2)
    assert center.tolist() == [[True, True, False, False]] and assign.tolist() == [[0, 1, 1, 1]]
    assign, center = dpc_knn(pts, every, torch.tensor([3]), k=2)  # + point 3 (score 0.27)
    assert center.tolist() == [[True, True, True, False]] and assign.tolist() == [[0, 1, 2, 2]]
    # Padding is no token: the same points with a padded slot in between cluster the same.
    padded = torch.tensor([[[0.0], [1.0], [99.0], [3.0], [10.0]]])
    mask = torch.tensor([[True, True, False, True, True]])
    assign, _ = dpc_knn(padded, mask, torch.tensor([2]), k=2)
    assert assign.tolist() == [[0, 1, -1, 1, 1]]


def test_low_precision_inputs_compute_in_float32_and_keep_their_dtype():
    k = ENCODER_CASES[1]
    tokens, frames = get(k, "tokens"), int(get(k, "frames"))
    ref = prunevid(60, tokens, frames)
    for dtype in (torch.float16, torch.bfloat16):
        out = prunevid(60, tokens.to(dtype), frames)
        assert out.tokens.dtype == dtype
        assert (out.keep_mask == ref.keep_mask).float().mean() > 0.9


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"tau": 1.5}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"segment_ratio": 0.0}, "segment_ratio"),
        ({"cluster_ratio": 1.2}, "cluster_ratio"),
        ({"k": 0}, "k"),
        ({"k": True}, "k"),
        ({"small_group": -1}, "small_group"),
        ({"alpha": 0.4}, "alpha"),
    ],
)
def test_bad_parameters_name_the_field(params, field):
    with pytest.raises(ConfigError, match=field):
        PruneVid(8, **params)


def test_missing_or_inconsistent_layout_is_refused():
    tokens = torch.randn(1, 12, 4)
    with pytest.raises(MissingContextError, match="frames"):
        PruneVid(4)(tokens, context=ReductionContext(grid=(12, 1)))
    with pytest.raises(MissingContextError, match="grid"):
        PruneVid(4)(tokens, context=ReductionContext(frames=3))
    with pytest.raises(InvalidInputError, match="grid h\\*w = N"):
        PruneVid(4)(tokens, context=ReductionContext(frames=3, grid=(3, 3)))
    with pytest.raises(InvalidInputError, match="divisible by frames"):
        PruneVid(4)(tokens, context=ReductionContext(frames=5, grid=(12, 1)))
    with pytest.raises(InvalidInputError, match="frames must be an int >= 1"):
        PruneVid(4)(tokens, context=ReductionContext(frames=0, grid=(12, 1)))


def test_llm_attention_of_the_wrong_shape_is_refused():
    with pytest.raises(InvalidInputError, match="context.attention must have shape"):
        PruneVidLLM(2, stage="llm_layer")(torch.randn(1, 6, 4), context=ReductionContext(attention=torch.rand(1, 3, 5)))


# -- inside video models -------------------------------------------------------------------------------

VIDEO_COUNT = onevision.lengths()["video"]  # 3 frames x 2x2 pooled tokens + the newline


def onevision_videos(rows: list[int], still: bool = False) -> dict:
    """One 3-frame video per row (row-seeded pixels), left-padded prompts."""
    videos = []
    for r in rows:
        px = seeded_pixels((onevision.FRAMES, 3, 16, 16), 50 + r, 0)
        videos.append(px[:1].expand_as(px) if still else px)
    ids, mask = media_prompt([[(VIDEO_TOKEN, VIDEO_COUNT)] for _ in rows], row_ids=rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": torch.stack(videos)}


VIDEO_CASE = checks.Case(
    build=tiny_onevision, inputs=onevision_videos, tokens={"video": VIDEO_TOKEN},
    stock_features=onevision.stock_features, rows=2,
)


def two_step(budget=6, llm_budget=0.5, layer=2, **params) -> Pipeline:
    return PruneVid.schedule(budget, llm_budget, layer=layer, **params)


def encoder_only(budget=6, stage="projector", **params) -> Pipeline:
    return checks.pipeline(Step(stage, PruneVid(budget, stage=stage, **params)), video_budget="per_video")


def test_onevision_videos_generate_like_recompute_and_batch_like_rows_alone():
    # The merge depends on the video alone: generate() with the cache = recomputing every step.
    checks.check_generate_matches_recompute(VIDEO_CASE, encoder_only())
    # The LLM step selects once, at the prefill, from the prompt's question rows (a full
    # recompute would rank again with the generated tokens as queries): compare the padded
    # batch with each row alone instead, both decoding on the reduced cache.
    checks.check_batch_matches_rows(VIDEO_CASE, two_step())


@pytest.mark.parametrize("stage", ["vision_encoder", "projector"])
def test_onevision_still_video_merges_into_one_frame(stage):
    model = tiny_onevision(0)
    kw = onevision_videos([0], still=True)
    with tokenreduce.apply(model, encoder_only(4, stage)) as handle:
        got = checks.logits(model, kw)
        (rec,) = handle.records
    assert rec.tokens_before == [12] and rec.indices[0].tolist() == [0, 1, 2, 3]
    assert bool(rec.info[0]["static"].all())
    if stage == "projector":  # (at vision_encoder the adapter pools before the projector, not after)
        # = the stock model given a one-frame video of that frame, with the same text.
        ids, mask = media_prompt([[(VIDEO_TOKEN, 4 + 1)]], row_ids=[0])
        one = {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": kw["pixel_values_videos"][:, :1]}
        torch.testing.assert_close(got, checks.logits(model, one), atol=1e-5, rtol=1e-5)


def test_onevision_llm_step_ranks_by_the_question_rows():
    model = tiny_onevision(0)
    kw = onevision_videos([1])
    seen = []

    def spy(reducer, tokens, valid, context, out):
        if reducer.name == "prunevid-llm":
            seen.append((context.attention, context.text_mask, out))

    with tokenreduce.apply(model, two_step(6, 3)) as handle, observe(spy), torch.no_grad():
        model(**kw)
        enc, llm = handle.records
    ((att, text_mask, out),) = seen
    assert enc.tokens_after == [6] and llm.tokens_before == [7] and llm.tokens_after == [3]
    assert att.shape[1] == 5 and bool(text_mask.all())  # the five prompt tokens after the video
    best = torch.topk(att[0].amax(0), 3).indices.sort().values
    assert out.indices[0].tolist() == best.tolist()


def test_qwen_video_runs_both_steps_and_the_merge_generates_like_recompute():
    model = tiny_qwen2_5_vl(0)
    kw = qwen_vl_inputs([[]], [[(4, 4, 8)]])  # 4 temporal patches of 2x4 merged tokens
    with tokenreduce.apply(model, two_step(12, 0.5)) as handle:
        with torch.no_grad():
            model(**kw)
        enc, llm = handle.records
    with tokenreduce.apply(model, encoder_only(12)):
        qwen_case.assert_cache_matches_recompute(model, kw, steps=3)
    assert (enc.tokens_before, enc.tokens_after) == ([32], [12])
    assert (llm.tokens_before, llm.tokens_after) == ([12], [6])


def test_qwen_videos_of_different_sizes_each_keep_their_share():
    model = tiny_qwen2_5_vl(0)
    kw = qwen_vl_inputs([[], []], [[(4, 4, 8)], [(2, 4, 4)]])  # 4 x 8 and 2 x 4 merged tokens
    with tokenreduce.apply(model, two_step(0.5, 0.5)) as handle, torch.no_grad():
        model(**kw)
    enc, llm = handle.records
    assert (enc.tokens_before, enc.tokens_after) == ([32, 8], [16, 4])
    assert (llm.tokens_before, llm.tokens_after) == ([16, 4], [8, 2])


def test_qwen_still_video_keeps_its_first_temporal_patch():
    model = tiny_qwen2_5_vl(0)
    kw = qwen_vl_inputs([[]], [[(4, 4, 8)]])
    px = kw["pixel_values_videos"].view(4, 32, -1)
    kw["pixel_values_videos"] = px[:1].expand_as(px).reshape(128, -1)
    with tokenreduce.apply(model, encoder_only(8)) as handle, torch.no_grad():
        model(**kw)
    (rec,) = handle.records
    assert rec.indices[0].tolist() == list(range(8)) and bool(rec.info[0]["static"].all())


@pytest.mark.parametrize("build", [tiny_onevision, tiny_qwen2_5_vl, tiny_llava])
def test_without_whole_videos_the_merge_is_refused_at_patch_time(build):
    model = build(0)
    pipe = checks.pipeline(Step("projector", PruneVid(8, stage="projector")))  # per_frame budgets
    with pytest.raises(MissingContextError, match="frames"), tokenreduce.apply(model, pipe):
        pass


def test_after_another_encoder_step_the_grid_is_gone_and_the_merge_is_refused():
    model = tiny_onevision(0)
    merge = Step("projector", PruneVid(4, stage="projector"))
    pipe = checks.pipeline(Step("vision_encoder", create("pool", 0.75)), merge, video_budget="per_video")
    with tokenreduce.apply(model, pipe), pytest.raises(MissingContextError, match="grid"), torch.no_grad():
        model(**onevision_videos([0]))


def test_images_have_no_frames_and_are_refused_under_per_video_budgets():
    model = tiny_onevision(0)
    kw = onevision.make_inputs()([0])  # one anyres image
    with tokenreduce.apply(model, encoder_only(4)), pytest.raises(MissingContextError, match="frames"), torch.no_grad():
        model(**kw)
