"""HoliTom: the official outer-LLM merging and inner-LLM merging, conformance, properties, errors, real video models."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import test_adapter_onevision as onevision
import torch
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from models import (  # noqa: F401 - one_thread is a fixture
    VIDEO_TOKEN,
    media_prompt,
    one_thread,
    qwen_vl_inputs,
    seeded_pixels,
    tiny_onevision,
    tiny_qwen2_5_vl,
)

import tokenreduce
from tokenreduce import MissingContextError, Pipeline, ReductionContext, Stage, Step
from tokenreduce.errors import ConfigError, InvalidInputError, StageError
from tokenreduce.testing import check_reducer
from tokenreduce_plugins.holitom import ATTENTION_KEY, HoliTom, HoliTomLLM
from tokenreduce_plugins.holitom_ops import (
    pair_similar,
    segment_starts,
    self_attention_received,
    static_runs,
    window_gains,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "baselines" / "holitom.npz"
EXAMPLE = ROOT / "docs" / "examples" / "reducers" / "holitom.yaml"
DATA = dict(np.load(FIXTURE))
CASES = sorted({int(k.split("_")[0][4:]) for k in DATA})
OUTER = [k for k in CASES if f"case{k}_stage" not in DATA]
INNER = [k for k in CASES if f"case{k}_stage" in DATA]
EXAMPLES = settings(max_examples=20, deadline=None, derandomize=True, database=None)
CLASSES = {"holitom": HoliTom, "holitom-llm": HoliTomLLM}


def fx(k: int, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(DATA[f"case{k}_{key}"]))


def official_reducer(k: int, budget) -> HoliTom:
    beta = float(fx(k, "beta"))
    return HoliTom(
        budget,
        tau=float(fx(k, "tau")),
        beta=None if math.isnan(beta) else beta,
        k=int(fx(k, "k")),
        max_window=int(fx(k, "max_window")),
    )


def outer_context(k: int) -> ReductionContext:
    return ReductionContext(frames=int(fx(k, "frames")), extra={ATTENTION_KEY: fx(k, "attention")})


# -- the official code's outputs (tests/fixtures/baselines/README.md) ------------------------------


def test_fixture_covers_segments_merging_cap_and_one_frame():
    assert len(OUTER) == 8 and len(INNER) == 3
    assert any(len(set(fx(k, "segment_start").tolist())) > 2 for k in OUTER)  # several multi-frame segments
    assert any(int(fx(k, "frames")) == 1 for k in OUTER)
    assert any(int(fx(k, "max_window")) < int(fx(k, "frames")) for k in OUTER)
    assert any(math.isnan(float(fx(k, "beta"))) for k in OUTER)


@pytest.mark.parametrize("k", OUTER)
def test_outer_merging_reproduces_official_segments_tokens_and_features(k):
    kept = fx(k, "kept")
    out = official_reducer(k, len(kept))(fx(k, "tokens"), context=outer_context(k))
    assert out.info["segment_start"][0].tolist() == fx(k, "segment_start").tolist()
    assert out.indices[0].tolist() == kept.tolist()
    torch.testing.assert_close(out.tokens[0], fx(k, "features"), rtol=1e-5, atol=1e-5)


def test_outer_merging_batched_equals_each_video():
    same = [k for k in OUTER if tuple(fx(k, "tokens").shape) == tuple(fx(OUTER[0], "tokens").shape)]
    same = [k for k in same if float(fx(k, "tau")) == float(fx(same[0], "tau")) and int(fx(k, "max_window")) == 1024]
    assert len(same) >= 2
    tokens = torch.cat([fx(k, "tokens") for k in same])
    att = torch.cat([fx(k, "attention") for k in same])
    budget = len(fx(same[0], "kept"))
    ctx = ReductionContext(frames=int(fx(same[0], "frames")), extra={ATTENTION_KEY: att})
    out = HoliTom(budget, tau=float(fx(same[0], "tau")))(tokens, context=ctx)
    for row, k in enumerate(same):
        alone = HoliTom(budget, tau=float(fx(k, "tau")))(fx(k, "tokens"), context=outer_context(k))
        assert torch.equal(out.indices[row], alone.indices[0])
        torch.testing.assert_close(out.tokens[row], alone.tokens[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", INNER)
def test_inner_merging_reproduces_official_selection_and_halving_merges(k):
    r = float(fx(k, "r"))
    out = HoliTomLLM(1 - r, stage="llm_layer")(fx(k, "tokens"), context=ReductionContext(attention=fx(k, "attention")))
    n = fx(k, "tokens").shape[1]
    assert out.indices[0].tolist() == fx(k, "kept").tolist() and len(fx(k, "kept")) == round(n * (1 - r))
    torch.testing.assert_close(out.tokens[0], fx(k, "features"), rtol=1e-5, atol=1e-5)


# -- conformance kit ---------------------------------------------------------------------------------


def video_context(tokens: torch.Tensor, valid: torch.Tensor, stage: Stage) -> ReductionContext:
    """N tokens as the largest of 4, 3, 2, 1 whole frames (adapters' frame_index: 0 at padding)."""
    n = tokens.shape[1]
    frames = next(f for f in (4, 3, 2, 1) if n % f == 0)
    index = (torch.arange(n, device=tokens.device) // (n // frames)).expand(tokens.shape[0], n)
    return ReductionContext(frames=frames, frame_index=index.masked_fill(~valid.to(tokens.device), 0))


def last_row_attention(tokens: torch.Tensor, valid: torch.Tensor, stage: Stage) -> ReductionContext:
    gen = torch.Generator().manual_seed(tokens.shape[1])
    logits = torch.randn(tokens.shape[0], 1, tokens.shape[1], generator=gen).to(tokens.device)
    return ReductionContext(attention=logits.masked_fill(~valid.unsqueeze(1), float("-inf")).softmax(-1))


def test_conformance_kit_outer():
    check_reducer(HoliTom, context_factory=video_context, max_examples=12)


def test_conformance_kit_outer_short_windows_and_plain_mean():
    check_reducer(HoliTom, stage="projector", params={"max_window": 2, "beta": None, "tau": 0.0, "k": 2},
                  context_factory=video_context, max_examples=10)


def test_conformance_kit_inner():
    check_reducer(HoliTomLLM, context_factory=last_row_attention, max_examples=15)


# -- properties ----------------------------------------------------------------------------------------


def drift_video(seed: int, t: int, n: int, d: int, p_change: float, eps: float = 0.1) -> torch.Tensor:
    """(1, T n, D): each position keeps its token (+ noise) and changes with probability p_change per frame."""
    gen = torch.Generator().manual_seed(seed)
    cur, frames = torch.randn(n, d, generator=gen), []
    for i in range(t):
        if i:
            change = torch.rand(n, generator=gen) < p_change
            cur = torch.where(change[:, None], torch.randn(n, d, generator=gen), cur)
        frames.append(cur + eps * torch.randn(n, d, generator=gen))
    return torch.cat(frames)[None]


# (video, frames): drift_video(seed, T, n, D, p_change) with T <= 6, n <= 9.
video_and_frames = st.tuples(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 9), st.integers(2, 8),
                             st.sampled_from([0.0, 0.1, 0.3, 0.7])).map(lambda a: (drift_video(*a), a[1]))


@EXAMPLES
@given(video=video_and_frames, r=st.floats(0.05, 1.0), max_window=st.sampled_from([1, 2, 1024]))
def test_official_count_of_any_ratio_gives_the_official_group_counts(video, r, max_window):
    """Budget = the official count for a ratio r (exact arithmetic) -> each frame keeps ceil(n_dyn rho)
    dynamic tokens and each segment round(n_static rho) static ones, rho = min(r N / S, 1)."""
    x, t = video
    n_all = x.shape[1]
    n = n_all // t
    assume(n_all > 1)
    probe = HoliTom(n_all, max_window=max_window)(x, 1, context=ReductionContext(frames=t))
    static = probe.info["static"][0].view(t, n)
    start = probe.info["segment_start"][0].tolist()
    n_dyn = [n - int(static[f].sum()) for f in range(t)]
    n_static = {s: int(static[s].sum()) for s in set(start) if start.count(s) > 1}
    left = sum(n_dyn) + sum(n_static.values())
    rho = min(Fraction(r) * n_all / left, Fraction(1))
    want_dyn = [math.ceil(m * rho) for m in n_dyn]
    want_static = {s: round(m * rho) for s, m in n_static.items()}
    total = sum(want_dyn) + sum(want_static.values())
    assume(total >= 1)  # every token static and rounded away: the official code keeps none
    out = HoliTom(total, max_window=max_window)(x, context=ReductionContext(frames=t))
    kept = out.indices[0]  # (the segmentation does not depend on the budget: the probe's holds)
    frame, pos = kept // n, kept % n
    is_static = static[frame, pos]
    assert [int(((frame == f) & ~is_static).sum()) for f in range(t)] == want_dyn
    assert {s: int(((frame == s) & is_static).sum()) for s in n_static} == want_static
    assert not bool(is_static[[start[f] != f for f in frame.tolist()]].any())  # static tokens at their segment's start


def brute_force_best(gain: torch.Tensor, max_window: int) -> int:
    t = gain.shape[0]
    best = 0
    for cuts in itertools.product([False, True], repeat=max(t - 1, 0)):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [t]
        if all(e - s <= max_window for s, e in zip(bounds, bounds[1:])):
            best = max(best, sum(int(gain[s, e - 1]) for s, e in zip(bounds, bounds[1:])))
    return best


@EXAMPLES
@given(video=video_and_frames, tau=st.sampled_from([0.0, 0.5, 0.9]), max_window=st.integers(1, 6))
def test_segmentation_is_an_optimal_partition(video, tau, max_window):
    x, t = video
    n = x.shape[1] // t
    frames = x.view(1, t, n, -1)
    gain = window_gains(static_runs(pair_similar(frames, torch.ones(1, t, n, dtype=torch.bool), tau)))
    start = segment_starts(gain, max_window)[0].tolist()
    bounds = sorted(set(start)) + [t]
    assert bounds[0] == 0 and all(e - s <= max_window for s, e in zip(bounds, bounds[1:]))
    ours = sum(int(gain[0, s, e - 1]) for s, e in zip(bounds, bounds[1:]))
    assert ours == brute_force_best(gain[0], max_window)


@EXAMPLES
@given(video=video_and_frames, budget=st.integers(1, 60))
def test_no_temporal_merging_keeps_each_frames_most_attended_tokens_balanced(video, budget):
    x, t = video
    n = x.shape[1] // t
    budget = min(budget, x.shape[1])
    att = torch.rand(1, x.shape[1], generator=torch.Generator().manual_seed(budget))
    ctx = ReductionContext(frames=t, extra={ATTENTION_KEY: att})
    out = HoliTom(budget, tau=1.0)(x, context=ctx)  # cosine > 1 never: nothing is static
    kept = out.indices[0][out.valid[0]]
    per_frame = torch.bincount(kept // n, minlength=t)
    assert int(per_frame.max() - per_frame.min()) <= 1 and int(per_frame.sum()) == budget
    for f in range(t):
        want = torch.sort(att[0, f * n : (f + 1) * n], descending=True, stable=True).indices[: int(per_frame[f])]
        assert sorted((want + f * n).tolist()) == kept[kept // n == f].tolist()
    assert torch.equal(out.tokens[0][out.valid[0]], x[0, kept])


@EXAMPLES
@given(seed=st.integers(0, 1000), t=st.integers(2, 5), n=st.integers(2, 9), budget=st.integers(1, 40))
def test_a_still_video_is_one_segment_kept_in_its_first_frame(seed, t, n, budget):
    frame = torch.randn(1, n, 6, generator=torch.Generator().manual_seed(seed))
    x = frame.repeat(1, t, 1)
    budget = min(budget, t * n - 1)
    out = HoliTom(budget)(x, context=ReductionContext(frames=t))
    assert out.info["segment_start"][0].tolist() == [0] * t and bool(out.info["static"].all())
    kept = out.indices[0][out.valid[0]]
    assert len(kept) == budget
    if budget <= n:  # temporal merging leaves n tokens: all kept ones are frame 0's
        assert bool((kept < n).all())
        assert float(out.sizes[0].sum()) <= t * n
    else:  # above that, copies of later frames are kept as they are
        assert bool((kept[:n] == torch.arange(n)).all())
        torch.testing.assert_close(out.tokens[0, n:budget], x[0, kept[n:]])
        assert float(out.sizes[0].sum()) == t * n


@EXAMPLES
@given(video=video_and_frames)
def test_stand_in_attention_is_the_tokens_self_attention(video):
    x, t = video
    n = x.shape[1] // t
    stand_in = self_attention_received(x.view(1, t, n, -1), torch.ones(1, t, n, dtype=torch.bool)).reshape(1, -1)
    budget = max(1, x.shape[1] // 3)
    a = HoliTom(budget)(x, context=ReductionContext(frames=t))
    b = HoliTom(budget)(x, context=ReductionContext(frames=t, extra={ATTENTION_KEY: stand_in}))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(stand_in.view(1, t, n).sum(-1), torch.ones(1, t))  # a distribution per frame


def sequential_merge(x: torch.Tensor, scores: torch.Tensor, keep: int) -> tuple[list[int], torch.Tensor]:
    """The official loop on one row: top by score, then h[j] = (h[j] + x[i]) / 2 for each other i in order."""
    top = torch.sort(scores, descending=True, stable=True).indices[:keep]
    h = x.clone()
    rest = [i for i in range(x.shape[0]) if i not in set(top.tolist())]
    if rest:
        sim = torch.nn.functional.normalize(x[rest], dim=-1) @ torch.nn.functional.normalize(x[top], dim=-1).T
        for i, j in zip(rest, sim.argmax(dim=1).tolist()):
            h[top[j]] = (h[top[j]] + x[i]) / 2
    kept = sorted(top.tolist())
    return kept, h[kept]


@EXAMPLES
@given(seed=st.integers(0, 1000), n=st.integers(1, 30), d=st.integers(1, 8), keep=st.integers(1, 30))
def test_inner_merging_equals_the_official_halving_loop(seed, n, d, keep):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, d, generator=gen)
    att = torch.rand(1, 1, n, generator=gen)
    keep = min(keep, n)
    out = HoliTomLLM(keep, stage="llm_layer")(x, context=ReductionContext(attention=att))
    kept, h = sequential_merge(x[0], att[0, 0], keep)
    assert out.indices[0].tolist() == kept
    torch.testing.assert_close(out.tokens[0], h, rtol=1e-5, atol=1e-6)
    assert float(out.sizes[0].sum()) == n


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params,match",
    [
        ({"tau": 1.5}, "tau"),
        ({"tau": -2}, "tau"),
        ({"beta": 1.2}, "beta"),
        ({"k": 0}, "k"),
        ({"max_window": 0}, "max_window"),
        ({"window": 3}, "window"),
    ],
)
def test_bad_parameters_are_refused_by_name(params, match):
    with pytest.raises(ConfigError, match=match):
        HoliTom(0.2, **params)


def test_bad_context_is_refused_clearly():
    x = torch.randn(2, 12, 4)
    with pytest.raises(MissingContextError, match="frames"):
        HoliTom(4)(x)
    with pytest.raises(InvalidInputError, match="not 5 whole frames"):
        HoliTom(4)(x, context=ReductionContext(frames=5))
    with pytest.raises(InvalidInputError, match="frames must be an int"):
        HoliTom(4)(x, context=ReductionContext(frames=0))
    shifted = (torch.arange(12) // 4).roll(1).expand(2, 12)
    with pytest.raises(InvalidInputError, match="frame_index"):
        HoliTom(4)(x, context=ReductionContext(frames=3, frame_index=shifted))
    with pytest.raises(InvalidInputError, match=r"\(B, N\)=\(2, 12\)"):
        HoliTom(4)(x, context=ReductionContext(frames=3, extra={ATTENTION_KEY: torch.rand(2, 11)}))
    with pytest.raises(InvalidInputError, match="non-finite"):
        HoliTom(4)(x, context=ReductionContext(frames=3, extra={ATTENTION_KEY: torch.full((2, 12), float("nan"))}))
    with pytest.raises(StageError, match="llm_layer"):
        HoliTom(4, stage="llm_layer")
    with pytest.raises(StageError, match="projector"):
        HoliTomLLM(4, stage="projector")
    with pytest.raises(MissingContextError, match="attention"):
        HoliTomLLM(4, stage="llm_layer")(x)
    with pytest.raises(InvalidInputError, match="attention must have shape"):
        HoliTomLLM(4, stage="llm_layer")(x, context=ReductionContext(attention=torch.rand(2, 12)))


# -- real models: LLaVA-OneVision and Qwen2.5-VL video ---------------------------------------------------


def example_pipeline(layer: int) -> Pipeline:
    """docs/examples/reducers/holitom.yaml with the decoder layer moved into the tiny models."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    steps = []
    for s in cfg["pipeline"]:
        reducer = CLASSES[s["reducer"]](s["budget"], stage=s["stage"], **s.get("params", {}))
        steps.append(Step(s["stage"], reducer, layer=layer if "layer" in s else None))
    return Pipeline(steps, video_budget=cfg["video_budget"])


def test_example_is_the_published_two_step_setting():
    cfg = yaml.safe_load(EXAMPLE.read_text())
    assert cfg["video_budget"] == "per_video"
    (outer, inner) = cfg["pipeline"]
    assert (outer["stage"], outer["reducer"], outer["budget"]) == ("projector", "holitom", 0.15)
    assert outer["params"] == {"tau": 0.8}
    assert (inner["stage"], inner["layer"], inner["reducer"], inner["budget"]) == ("llm_layer", 18, "holitom-llm", 0.5)


def onevision_videos(pixels: list[torch.Tensor], row_ids: list[int] | None = None) -> dict:
    """One video per row (the row's text depends on its id only)."""
    per_video = 4 * pixels[0].shape[0] + 1  # 2x2 pooled tokens per frame + the newline
    ids, mask = media_prompt([[(VIDEO_TOKEN, per_video)] for _ in pixels], row_ids=row_ids)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": torch.stack(pixels)}


def test_onevision_video_runs_both_steps_and_a_still_video_keeps_its_first_frame():
    model = tiny_onevision(0)
    moving = seeded_pixels((onevision.FRAMES, 3, 16, 16), 1, 0)
    still = seeded_pixels((1, 3, 16, 16), 2, 0).expand(onevision.FRAMES, -1, -1, -1).clone()
    kw = onevision_videos([moving, still])
    with tokenreduce.apply(model, example_pipeline(layer=2)) as handle:
        with torch.no_grad():
            logits = model(**kw).logits
    assert torch.isfinite(logits).all()
    outer, inner = handle.records
    assert (outer.reducer, outer.tokens_before, outer.tokens_after) == ("holitom", [12, 12], [2, 2])
    assert outer.indices[1].max() < 4  # the still video: one segment, its tokens in frame 0
    assert (inner.reducer, inner.layer) == ("holitom-llm", 2)
    assert all(b > a for b, a in zip(inner.tokens_before, inner.tokens_after))


def test_onevision_generate_with_cache_equals_recompute_and_batch_equals_rows():
    import adapter_checks as checks

    outer = Step("projector", HoliTom(0.5, stage="projector"))
    # Cache vs recompute for the encoder-side step only: a recomputed forward would rank the image
    # tokens by the attention of the newest token at the decoder layer, the cached prefill by the
    # prompt's last token (as the official code, which merges at prefill only).
    checks.check_generate_matches_recompute(onevision.CASE, checks.pipeline(outer, video_budget="per_video"), rows=[1])
    inner = Step("llm_layer", HoliTomLLM(0.5, stage="llm_layer"), layer=2)
    pipe = checks.pipeline(outer, inner, video_budget="per_video")
    model = tiny_onevision(0)
    videos = [seeded_pixels((onevision.FRAMES, 3, 16, 16), r, 0) for r in (3, 4)]
    with tokenreduce.apply(model, pipe):
        batch = model.generate(**onevision_videos(videos), max_new_tokens=3, do_sample=False)[:, -3:]
        for r in range(2):
            one = onevision_videos(videos[r : r + 1], [r])
            alone = model.generate(**one, max_new_tokens=3, do_sample=False)[:, -3:]
            assert torch.equal(batch[r], alone[0])


def still_qwen_video(kw: dict, t: int) -> dict:
    pv = kw["pixel_values_videos"]
    kw["pixel_values_videos"] = pv.view(t, -1, pv.shape[-1])[:1].expand(t, -1, -1).reshape(pv.shape).clone()
    return kw


@pytest.mark.parametrize("still", [False, True])
def test_qwen2_5_vl_video_runs_both_steps(still):
    model = tiny_qwen2_5_vl(0)
    kw = qwen_vl_inputs([[]], [[(4, 4, 8)]])  # 4 temporal patches ("frames") of 8 merged tokens
    if still:
        kw = still_qwen_video(kw, 4)
    pipe = Pipeline(
        [
            Step("projector", HoliTom(0.25, stage="projector")),
            Step("llm_layer", HoliTomLLM(0.5, stage="llm_layer"), layer=1),
        ],
        video_budget="per_video",
    )
    with tokenreduce.apply(model, pipe) as handle:
        with torch.no_grad():
            out = model(**kw)
    assert torch.isfinite(out.logits).all()
    outer, inner = handle.records
    assert (outer.tokens_before, outer.tokens_after) == ([32], [8])
    assert inner.tokens_before == [8] and inner.tokens_after == [4]
    if still:
        assert outer.indices[0].max() < 8  # one segment: every kept token in the first frame
        assert outer.info[0]["segment_start"].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("build", [tiny_onevision, tiny_qwen2_5_vl])
def test_per_frame_budgets_are_refused_at_patch_time(build):
    model = build(0)
    pipe = Pipeline([Step("projector", HoliTom(0.25, stage="projector"))])
    with pytest.raises(MissingContextError, match="per_video"), tokenreduce.apply(model, pipe):
        pass
