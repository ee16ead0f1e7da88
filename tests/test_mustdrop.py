"""MustDrop: the official encoder merge and prefill filter reproduced, conformance, properties, errors, models."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import test_adapter_llava_next as llava_next_case
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import IMAGE_TOKEN, two_image_batch, one_thread, qwen_vl_inputs, tiny_llava, tiny_qwen2_5_vl  # noqa: F401

import tokenreduce as tr
from tokenreduce import ConfigError, MissingContextError, Pipeline, ReductionContext, Stage, Step, create
from tokenreduce.errors import InvalidInputError, StageError
from tokenreduce.testing import check_reducer
from tokenreduce_plugins.mustdrop import OFFICIAL_PRUNING_LAYERS, MustDrop
from tokenreduce_plugins.mustdrop_merge import plan_rounds

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "mustdrop.npz"
EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "reducers" / "mustdrop.yaml"


def merge(budget, tokens, mask=None, grid=None, **params):
    return create("mustdrop", budget, stage="vision_encoder", **params)(tokens, mask=mask, context=ReductionContext(grid=grid))


def filt(budget, tokens, attention, mask=None, text_mask=None, **params):
    ctx = ReductionContext(attention=attention, text_mask=text_mask)
    return create("mustdrop", budget, stage="llm_layer", **params)(tokens, mask=mask, context=ctx)


# -- the official code's output (fixtures/baselines/README.md) --------------------------------------


def _fixture():
    data = dict(np.load(FIXTURE))
    cases = sorted({int(k.split("_")[0][4:]) for k in data})
    return data, {s: [k for k in cases if str(data[f"case{k}_stage"]) == s] for s in ("vision_encoder", "llm_layer")}


@pytest.mark.parametrize("k", _fixture()[1]["vision_encoder"])
def test_encoder_merge_matches_the_official_conditional_pooling(k):
    data, _ = _fixture()
    get = lambda key: torch.from_numpy(np.asarray(data[f"case{k}_{key}"]))  # noqa: E731
    tokens, t, ws = get("tokens"), int(data[f"case{k}_budget"]), int(data[f"case{k}_window"])
    assert t == tokens.shape[1] - int(data[f"case{k}_merged_windows"]) * (ws * ws - 1)
    out = merge(t, tokens, window_size=ws)
    # Official order: merged windows by similarity, then the rest; ours is by position.
    by_pos = torch.sort(get("kept"), dim=1)
    assert out.indices.tolist() == by_pos.values.tolist()
    feats = torch.gather(get("features"), 1, by_pos.indices.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
    torch.testing.assert_close(out.tokens, feats, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.sizes, torch.gather(get("sizes"), 1, by_pos.indices))
    if f"case{k}_index_masks" in data:  # the LightCompress variant marks the kept tokens
        assert torch.equal(out.keep_mask, get("index_masks"))


@pytest.mark.parametrize("k", _fixture()[1]["llm_layer"])
def test_prefill_filter_matches_the_official_dual_attention_filter(k):
    data, _ = _fixture()
    get = lambda key: torch.from_numpy(np.asarray(data[f"case{k}_{key}"]))  # noqa: E731
    att = get("attention_heads").mean(dim=1)  # (B, text, image), heads averaged as officially
    thr = {"global_thr": float(data[f"case{k}_global_thr"]), "individual_thr": float(data[f"case{k}_individual_thr"])}
    for b, t in enumerate(get("counts").tolist()):
        out = filt(t, get("tokens")[b : b + 1], att[b : b + 1], **thr)
        assert out.indices[0].tolist() == get("kept")[b, :t].tolist()


def test_fixture_covers_both_encoder_rules_and_batched_filters():
    data, by_stage = _fixture()
    assert any(f"case{k}_threshold" in data for k in by_stage["vision_encoder"])  # official threshold rule
    assert any(f"case{k}_index_masks" in data for k in by_stage["vision_encoder"])  # LightCompress fix_r
    assert any(int(data[f"case{k}_window"]) == 2 for k in by_stage["vision_encoder"])
    assert any(len(data[f"case{k}_counts"]) > 1 for k in by_stage["llm_layer"])


# -- conformance ---------------------------------------------------------------------------------


def text_attention(tokens, valid, stage):
    # Three "text" rows, the last one padding in rows after the first.
    x = tokens.float()
    a = torch.stack([torch.softmax(x.sum(-1), 1), torch.softmax(-x[..., 0], 1), torch.softmax(x.sum(-1), 1).flip(1)], 1)
    mask = torch.ones(a.shape[:2], dtype=torch.bool, device=tokens.device)
    mask[1:, -1] = False
    return ReductionContext(attention=a, text_mask=mask)


def test_conformance_llm_layer():
    check_reducer(MustDrop, stage="llm_layer", context_factory=text_attention, max_examples=15)


@pytest.mark.parametrize(("params", "max_n"), [({}, 40), ({"window_size": 2}, 100)])
def test_conformance_vision_encoder(params, max_n):
    # Budgets below the window count take several rounds (window 2 on up to 10x10 grids).
    check_reducer(MustDrop, stage="vision_encoder", params=params, square_grid=True, max_n=max_n, max_examples=15)


# -- encoder properties ----------------------------------------------------------------------------


def _window_scores(x, h, w, k):
    """Plain per-window mean pairwise cosine similarity (self-pairs excluded), raster order."""
    x = x / x.norm(dim=-1, keepdim=True)
    scores = {}
    for wi, wj in itertools.product(range(math.ceil(h / k)), range(math.ceil(w / k))):
        cells = [r * w + c for r in range(wi * k, min(h, wi * k + k)) for c in range(wj * k, min(w, wj * k + k))]
        pairs = [float(x[i] @ x[j]) for i in cells for j in cells if i != j]
        scores[tuple(cells)] = sum(pairs) / len(pairs) if pairs else float("-inf")
    return scores


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    wins=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    cut=st.tuples(st.sampled_from([0, 0, 1]), st.sampled_from([0, 0, 1])),
    k=st.sampled_from([2, 3]),
    frac=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_whole_windows_merge_by_decreasing_similarity_into_their_last_token(wins, cut, k, frac, seed):
    # Grids of whole windows, sometimes with a cut edge row/column (smaller edge windows).
    h, w = wins[0] * k + cut[0], wins[1] * k + cut[1]
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, h * w, 4, generator=g)
    scores = _window_scores(tokens[0], h, w, k)
    mergeable = sorted((c for c in scores if len(c) > 1), key=lambda c: -scores[c])
    # A budget for the r best windows, all of them whole.
    whole = next((i for i, c in enumerate(mergeable) if len(c) != k * k), len(mergeable))
    r = max(1, int(frac * whole))
    if whole == 0:
        return
    out = merge(h * w - r * (k * k - 1), tokens, grid=(h, w), window_size=k)
    groups = {}
    for i, s in enumerate(out.info["assignment"][0].tolist()):
        groups.setdefault(s, []).append(i)
    merged = sorted(tuple(v) for v in groups.values() if len(v) > 1)
    assert merged == sorted(mergeable[:r])
    for s, members in groups.items():
        assert int(out.indices[0, s]) == max(members)  # the window's bottom-right token stands for it
        torch.testing.assert_close(out.tokens[0, s], tokens[0, members].mean(dim=0), rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(1, 10), min_size=1, max_size=3), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_merging_conserves_every_token_at_any_budget(sizes, frac, seed):
    # Square grids of different sizes per row; budgets below one token per window too.
    g = torch.Generator().manual_seed(seed)
    n = max(s * s for s in sizes)
    tokens = torch.randn(len(sizes), n, 5, generator=g, dtype=torch.float64).float()
    mask = torch.arange(n)[None] < torch.tensor([s * s for s in sizes])[:, None]
    out = merge(frac, tokens, mask=mask)
    for b, s in enumerate(sizes):
        t = int(out.counts[b])
        assert float(out.sizes[b, :t].sum()) == s * s
        total = (out.tokens[b, :t] * out.sizes[b, :t, None]).sum(dim=0)
        torch.testing.assert_close(total, tokens[b, : s * s].sum(dim=0), rtol=1e-4, atol=1e-4)


def test_budget_of_one_token_per_window_averages_every_window():
    tokens = torch.randn(2, 36, 6, generator=torch.Generator().manual_seed(0))
    out = merge(4, tokens)  # 6x6 grid, four 3x3 windows
    assert out.indices.tolist() == [[14, 17, 32, 35]] * 2
    windows = tokens.view(2, 2, 3, 2, 3, 6).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 9, 6).mean(dim=2)
    torch.testing.assert_close(out.tokens, windows, rtol=1e-5, atol=1e-6)
    assert out.sizes.tolist() == [[9.0] * 4] * 2


def test_below_the_window_count_merging_repeats_on_the_grid_of_windows():
    assert plan_rounds(36, 2, 6, 6, 3) == [(6, 6, 32), (2, 2, 2)]
    assert plan_rounds(576, 64, 24, 24, 3) == [(24, 24, 512)]
    assert plan_rounds(576, 60, 24, 24, 3) == [(24, 24, 512), (8, 8, 4)]
    assert plan_rounds(25, 25, 5, 5, 3) == [(5, 5, 0)]
    out = merge(1, torch.randn(1, 81, 4, generator=torch.Generator().manual_seed(1)))
    assert out.indices.tolist() == [[80]] and out.sizes.tolist() == [[81.0]]


def test_partial_window_merges_its_tokens_most_similar_to_the_last_one():
    # One 3x3 window (the others far apart): remove 3 tokens -> the 3 closest to cell 8.
    x = torch.randn(1, 9, 8, generator=torch.Generator().manual_seed(2))
    sims = torch.nn.functional.cosine_similarity(x[0, :8], x[0, 8:9], dim=-1)
    expect = sorted(torch.topk(sims, 3).indices.tolist())
    out = merge(6, x, grid=(3, 3))
    merged = [i for i, s in enumerate(out.info["assignment"][0].tolist()) if i != 8 and s == out.info["assignment"][0, 8]]
    assert merged == expect


def test_a_window_wider_than_the_grid_is_the_whole_grid():
    x = torch.randn(1, 36, 4, generator=torch.Generator().manual_seed(5))
    out = merge(1, x, window_size=10)
    assert out.indices.tolist() == [[35]]
    torch.testing.assert_close(out.tokens[0, 0], x[0].mean(dim=0), rtol=1e-5, atol=1e-6)
    assert merge(30, x, window_size=10).counts.tolist() == [30]


def test_rectangular_grid_from_the_context():
    x = torch.randn(1, 24, 4, generator=torch.Generator().manual_seed(3))
    out = merge(8, x, grid=(4, 6))
    assert out.counts.tolist() == [8] and float(out.sizes.sum()) == 24


# -- prefill filter properties ---------------------------------------------------------------------


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    n=st.integers(2, 80),
    q=st.integers(1, 12),
    gthr=st.floats(1e-3, 0.05),
    ithr=st.floats(1e-3, 0.2),
    seed=st.integers(0, 2**16),
)
def test_budgeted_filter_equals_the_threshold_rule_at_its_own_count(n, q, gthr, ithr, seed):
    g = torch.Generator().manual_seed(seed)
    att = torch.softmax(torch.randn(1, q, n + 5, generator=g) * 3, dim=-1)[..., :n]
    total = att[0].sum()
    keep = (att[0].sum(0) >= total * gthr) | (att[0].amax(0) >= ithr)  # the official rule
    t = int(keep.sum())
    if not 0 < t < n:
        return
    out = filt(t, torch.randn(1, n, 3, generator=g), att, global_thr=gthr, individual_thr=ithr)
    assert out.indices[0].tolist() == keep.nonzero()[:, 0].tolist()


@settings(max_examples=20, deadline=None, derandomize=True)
@given(n=st.integers(3, 60), q=st.integers(1, 8), factor=st.floats(0.01, 100.0), seed=st.integers(0, 2**16))
def test_only_the_threshold_ratio_matters_and_budgets_nest(n, q, factor, seed):
    g = torch.Generator().manual_seed(seed)
    att, x = torch.rand(2, q, n, generator=g), torch.randn(2, n, 3, generator=g)
    t = n // 2 + 1
    ref = filt(t, x, att)
    scaled = filt(t, x, att, global_thr=0.011 * factor, individual_thr=0.01 * factor)
    assert torch.equal(ref.indices, scaled.indices)
    bigger = filt(t + 1, x, att) if t + 1 < n else None
    if bigger is not None:
        for b in range(2):
            assert set(ref.indices[b].tolist()) <= set(bigger.indices[b].tolist())


def test_padded_text_rows_are_ignored():
    g = torch.Generator().manual_seed(4)
    att, x = torch.rand(1, 4, 20, generator=g), torch.randn(1, 20, 3, generator=g)
    junk = att.clone()
    junk[0, 3] = torch.rand(20, generator=g) * 50  # a padded row with huge values
    rows = torch.tensor([[True, True, True, False]])
    assert torch.equal(filt(7, x, junk, text_mask=rows).indices, filt(7, x, att[:, :3]).indices)


# -- stages, context needs, errors -----------------------------------------------------------------


def test_required_context_follows_the_stage():
    assert MustDrop.required_context == frozenset({"attention"})  # class: what docs and CLI show
    assert MustDrop(8, stage="llm_layer").required_context == frozenset({"attention"})
    assert MustDrop(8, stage="vision_encoder").required_context == frozenset()
    assert MustDrop(8).required_context == frozenset()  # default stage: vision_encoder
    assert (MustDrop.attention_query, MustDrop.attention_layer) == ("text", "previous")
    step = Step("llm_layer", MustDrop(8), layer=3)  # the stage set by the step counts
    assert step.reducer.required_context == frozenset({"attention"})


@pytest.mark.parametrize(
    ("params", "field"),
    [({"window_size": 1}, "window_size"), ({"global_thr": 0.0}, "global_thr"), ({"individual_thr": -1.0}, "individual_thr")],
)
def test_bad_parameters_name_the_parameter(params, field):
    with pytest.raises(ConfigError, match=rf"{field}: Input should be greater than"):
        MustDrop(8, **params)


def test_bad_stage_grid_and_context_give_clear_errors():
    with pytest.raises(StageError, match="supports: llm_layer, vision_encoder"):
        MustDrop(8, stage="projector")
    with pytest.raises(InvalidInputError, match=r"needs context.grid=\(h, w\).*got 10 tokens"):
        merge(4, torch.randn(1, 10, 3))
    with pytest.raises(MissingContextError, match="needs context attention"):
        MustDrop(4, stage="llm_layer")(torch.randn(1, 10, 3))
    with pytest.raises(InvalidInputError, match=r"context.attention must have shape \(B, Q, N\)=\(1, Q>=1, 10\)"):
        filt(4, torch.randn(1, 10, 3), torch.rand(1, 10))
    with pytest.raises(InvalidInputError, match="2 layers but 1 budgets"):
        MustDrop.schedule(layers=(3, 7), budgets=(64,))


# -- YAML example and models ---------------------------------------------------------------------


def test_yaml_example_is_the_schedule_at_the_official_pruning_layers():
    pipe = tr.load_config(EXAMPLE)
    assert [(s.stage, s.layer) for s in pipe] == [(Stage.VISION_ENCODER, None)] + [
        (Stage.LLM_LAYER, k + 1) for k in OFFICIAL_PRUNING_LAYERS
    ]
    assert pipe.steps[-1].reducer.budget == 64
    built = MustDrop.schedule()
    assert [(s.stage, s.layer, s.reducer) for s in built] == [(s.stage, s.layer, s.reducer) for s in pipe]
    for step in pipe:  # the example writes out the defaults
        assert step.reducer == MustDrop(step.reducer.budget, stage=step.stage)


@pytest.mark.usefixtures("one_thread")
def test_multi_stage_pipeline_runs_in_llava_generate_and_matches_eager_signals():
    model = tiny_llava(seed=0, attn_implementation="sdpa")
    twin = tiny_llava(seed=0, attn_implementation="eager")
    kw = two_image_batch()
    plain = model.generate(**kw, max_new_tokens=3, do_sample=False)
    pipe = Pipeline([Step("vision_encoder", create("mustdrop", 20))] + [
        Step("llm_layer", create("mustdrop", t), layer=k) for k, t in ((1, 12), (2, 8), (3, 6))
    ])
    with tr.apply(model, pipe) as handle:
        out = model.generate(**kw, max_new_tokens=3, do_sample=False)
        records = list(handle.records)
        again = model.generate(**kw, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, again) and out.shape[1] == kw["input_ids"].shape[1] + 3
    assert [(r.stage.value, r.layer, r.tokens_before, r.tokens_after) for r in records] == [
        ("vision_encoder", None, [36, 36], [20, 20]),
        ("llm_layer", 1, [20, 20], [12, 12]),
        ("llm_layer", 2, [12, 12], [8, 8]),
        ("llm_layer", 3, [8, 8], [6, 6]),
    ]
    # Encoder: two of the four 3x3 windows of the 6x6 grid merged, on the selected layer's features.
    with torch.no_grad():
        feats = twin.model.vision_tower(kw["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    assert [i.tolist() for i in records[0].indices] == merge(20, feats, grid=(6, 6)).indices.tolist()
    assert torch.equal(model.generate(**kw, max_new_tokens=3, do_sample=False), plain)  # restored


@pytest.mark.usefixtures("one_thread")
def test_llm_step_applies_the_official_rule_to_the_eager_text_attention_of_the_previous_layer():
    model = tiny_llava(seed=0, attn_implementation="sdpa")
    twin = tiny_llava(seed=0, attn_implementation="eager")
    kw = two_image_batch()
    with tr.apply(model, Step("llm_layer", create("mustdrop", 15), layer=2)) as handle:
        model.generate(**kw, max_new_tokens=2, do_sample=False)
        kept = [i.tolist() for i in handle.records[0].indices]
    with torch.no_grad():
        att = twin(**kw, output_attentions=True).attentions[1].mean(dim=1)  # layer K-1, heads averaged
    img = kw["input_ids"] == IMAGE_TOKEN
    for row in range(2):
        cols = img[row].nonzero()[:, 0]
        text = torch.arange(int(cols.max()) + 1, img.shape[1])  # every token after the image
        a = att[row][text][:, cols]
        score = torch.maximum(a.sum(0) / a.sum() / 0.011, a.amax(0) / 0.01)
        assert kept[row] == sorted(torch.topk(score, 15).indices.tolist())


@pytest.mark.usefixtures("one_thread")
def test_runs_through_the_llava_next_and_qwen_adapters():
    case = llava_next_case.CASE
    model = case.build(0, "sdpa")
    kw = case.inputs(case.all_rows())
    with tr.apply(model, Step("vision_encoder", create("mustdrop", 0.5))) as handle:
        logits = model(**kw).logits
        assert handle.records and all(sum(r.tokens_after) < sum(r.tokens_before) for r in handle.records)
    assert torch.isfinite(logits).all()
    qwen = tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa")
    inputs = qwen_vl_inputs([[(8, 8)], [(8, 12)]])  # 4x4 and 4x6 merged-token grids
    pipe = Pipeline([Step("vision_encoder", create("mustdrop", 6))] + [
        Step("llm_layer", create("mustdrop", 0.5), layer=k) for k in (1, 2)
    ])
    with tr.apply(qwen, pipe) as handle:
        with torch.no_grad():
            qwen(**inputs)
        records = list(handle.records)
    assert [(r.stage.value, r.tokens_before, r.tokens_after) for r in records] == [
        ("vision_encoder", [16, 24], [6, 6]),
        ("llm_layer", [6, 6], [3, 3]),
        ("llm_layer", [3, 3], [2, 2]),
    ]


def test_filter_at_layer_zero_is_refused_at_patch_time():
    # The filter reads the previous layer's attention: there is none before layer 0.
    model = tiny_llava(seed=0, attn_implementation="sdpa")
    with pytest.raises(ConfigError, match="reads the attention of the previous layer, so its layer must be >= 1"):
        tr.patch(model, Step("llm_layer", create("mustdrop", 8), layer=0))
