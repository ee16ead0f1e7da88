"""VisPruner: the official selection reproduced, conformance, budget-split properties, errors, models."""

from __future__ import annotations

from pathlib import Path

import adapter_checks as checks
import numpy as np
import pytest
import test_adapter_llava_next as llava_next_case
import test_adapter_onevision as onevision_case
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import two_image_batch, one_thread, tiny_llava, tiny_qwen2_5_vl  # noqa: F401 - fixture

import tokenreduce as tr
from tokenreduce import ConfigError, MissingContextError, Pipeline, ReductionContext, Stage, Step, create
from tokenreduce.errors import InvalidInputError, StageError
from tokenreduce.testing import check_reducer
from tokenreduce_plugins.vispruner import VisPruner, _round_sizes

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "vispruner.npz"
EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "reducers" / "vispruner.yaml"


def vispruner(budget, cls_attention, tokens, mask=None, **params):
    return create("vispruner", budget, **params)(tokens, mask=mask, context=ReductionContext(cls_attention=cls_attention))


# -- the official code's output (fixtures/baselines/README.md) --------------------------------------


def _fixture():
    data = dict(np.load(FIXTURE))
    return data, sorted({int(k.split("_")[0][4:]) for k in data})


@pytest.mark.parametrize("k", _fixture()[1])
def test_matches_the_official_selection(k):
    data, _ = _fixture()
    get = lambda key: torch.from_numpy(np.asarray(data[f"case{k}_{key}"]))  # noqa: E731
    tokens = get("tokens")
    att = get("cls_attention_heads").mean(dim=1)  # the official code averages the heads first
    out = vispruner(int(data[f"case{k}_budget"]), att, tokens, important_ratio=float(data[f"case{k}_important_ratio"]))
    assert out.indices.tolist() == get("kept").tolist()
    torch.testing.assert_close(out.tokens, torch.stack([tokens[b, out.indices[b]] for b in range(tokens.shape[0])]), rtol=0, atol=0)


def test_fixture_covers_the_published_splits_and_both_extremes():
    data, cases = _fixture()
    splits = {(int(data[f"case{k}_budget"]), float(data[f"case{k}_important_ratio"])) for k in cases}
    assert {(64, 0.5), (128, 0.5), (64, 0.75)} <= splits
    assert {r for _, r in splits} >= {0.0, 1.0}


# -- conformance ---------------------------------------------------------------------------------


def _score(tokens):
    # Ties wherever the kit plants duplicate tokens.
    return torch.softmax(tokens.float().sum(dim=-1) + tokens.float()[..., 0] * 0.5, dim=1)


def cls_context(tokens, valid, stage):
    return ReductionContext(cls_attention=_score(tokens))


@pytest.mark.parametrize(("params", "stage"), [({}, None), ({"important_ratio": 0.0}, "vision_encoder"), ({"important_ratio": 1.0}, "projector")])
def test_conformance(params, stage):
    check_reducer(VisPruner, stage=stage, params=params, context_factory=cls_context, max_examples=12)


# -- properties ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(2, 60),
    frac=st.floats(0.05, 0.95),
    ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_budget_split_important_by_cls_attention_rest_diverse(n, frac, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    tokens, att = torch.randn(2, n, 6, generator=g), torch.rand(2, n, generator=g)
    t = max(1, int(frac * n))
    out = vispruner(t, att, tokens, important_ratio=ratio)
    imp = int(t * ratio)
    for b in range(2):
        kept = set(out.indices[b].tolist())
        top = set(torch.sort(att[b], descending=True, stable=True).indices[:imp].tolist())
        assert set(out.info["important"][b].nonzero()[:, 0].tolist()) == top
        assert top <= kept and len(kept) == t  # the other t - imp are diverse picks from the rest


@settings(max_examples=20, deadline=None, derandomize=True)
@given(n=st.integers(4, 50), frac=st.floats(0.1, 0.9), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 7.0, 1e30]))
def test_selection_is_invariant_to_feature_scale_and_attention_scale(n, frac, seed, scale):
    # Duplicates are judged by cosine similarity and importance by rank only.
    g = torch.Generator().manual_seed(seed)
    tokens, att = torch.randn(1, n, 5, generator=g), torch.rand(1, n, generator=g)
    t = max(1, int(frac * n))
    ref = vispruner(t, att, tokens)
    assert torch.equal(vispruner(t, att * 3.0, tokens * scale).indices, ref.indices)


def test_ratio_one_is_fastervlm_cls_attention_selection():
    g = torch.Generator().manual_seed(3)
    tokens, att = torch.randn(3, 50, 8, generator=g), torch.rand(3, 50, generator=g)
    ours = vispruner(17, att, tokens, important_ratio=1.0)
    fastervlm = create("cls_attn", 17)(tokens, context=ReductionContext(cls_attention=att))
    assert torch.equal(ours.indices, fastervlm.indices)


def _one_row_reference(tokens, att, t, ratio):
    """The paper's rule for one row, written plainly: lists, Python loops, one round at a time."""
    n = len(att)
    x = (tokens / tokens.norm(dim=-1, keepdim=True)).tolist()
    dot = lambda i, j: sum(p * q for p, q in zip(x[i], x[j]))  # noqa: E731
    imp = int(t * ratio)
    div = t - imp
    order = sorted(range(n), key=lambda i: (-float(att[i]), i))
    important, res = order[:imp], order[imp:]
    while div > 0 and len(res) > div:
        r = min(8, len(res) - div, (len(res) + 1) // 2)
        a, b = res[0::2], res[1::2]
        score = [max((dot(i, j) for j in b), default=float("-inf")) for i in a]
        ranked = sorted(range(len(a)), key=lambda i: (-score[i], i))
        res = [a[i] for i in ranked[r:]] + b
    return sorted(important + (res if div > 0 else []))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(1, 45), min_size=1, max_size=3),
    frac=st.floats(0.02, 1.0),
    ratio=st.sampled_from([0.0, 0.3, 0.5, 0.75, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_batched_padded_selection_equals_the_plain_rule_row_by_row(sizes, frac, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    n = max(sizes)
    tokens, att = torch.randn(len(sizes), n, 7, generator=g), torch.rand(len(sizes), n, generator=g)
    mask = torch.arange(n)[None] < torch.tensor(sizes)[:, None]
    out = vispruner(frac, att, tokens, mask=mask, important_ratio=ratio)
    for b, nv in enumerate(sizes):
        t = int(out.counts[b])
        assert out.indices[b, :t].tolist() == _one_row_reference(tokens[b, :nv].double(), att[b, :nv], t, ratio)


def test_round_sizes_follow_the_official_schedule():
    assert _round_sizes(544, 32) == [8] * 64  # 576 tokens, 64 kept, ratio 0.5
    assert _round_sizes(20, 17) == [3]
    assert _round_sizes(10, 0) == []  # no diverse tokens: no rounds
    assert _round_sizes(5, 1) == [3, 1]  # odd counts: at most ceil(R/2) per round
    assert sum(_round_sizes(181, 25)) == 156


def test_padding_rows_match_rows_alone_and_without_mask():
    g = torch.Generator().manual_seed(1)
    tokens, att = torch.randn(2, 40, 6, generator=g), torch.rand(2, 40, generator=g)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 29:] = False
    out = vispruner(12, att, tokens, mask=mask)
    alone = vispruner(12, att[1:, :29], tokens[1:, :29])
    assert out.indices[1].tolist() == alone.indices[0].tolist()
    assert out.indices[0].tolist() == vispruner(12, att[:1], tokens[:1]).indices[0].tolist()


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_bad_important_ratio_names_the_parameter_and_range(ratio):
    with pytest.raises(ConfigError, match=r"important_ratio.*(greater than or equal to 0|less than or equal to 1)"):
        VisPruner(8, important_ratio=ratio)


def test_bad_stage_and_context_give_clear_errors():
    with pytest.raises(StageError, match="supports: projector, vision_encoder"):
        VisPruner(8, stage="llm_layer")
    with pytest.raises(MissingContextError, match="needs context cls_attention"):
        VisPruner(8)(torch.randn(1, 10, 4))
    with pytest.raises(InvalidInputError, match=r"context.cls_attention must have shape \(B, N\)=\(1, 10\)"):
        vispruner(4, torch.rand(1, 9), torch.randn(1, 10, 4))


# -- YAML example and models ---------------------------------------------------------------------


def test_yaml_example_is_the_published_setting():
    pipe = tr.load_config(EXAMPLE)
    assert [(s.stage, s.layer, s.reducer.budget) for s in pipe] == [(Stage.VISION_ENCODER, None, 64)]
    assert pipe.steps[0].reducer == VisPruner(64, stage="vision_encoder")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stage", ["vision_encoder", "projector"])
def test_runs_in_llava_generate_and_matches_the_eager_signals(stage):
    model = tiny_llava(seed=0, attn_implementation="sdpa")
    twin = tiny_llava(seed=0, attn_implementation="eager")
    kw = two_image_batch()
    plain = model.generate(**kw, max_new_tokens=3, do_sample=False)
    with tr.apply(model, Step(stage, create("vispruner", 10))) as handle:
        out = model.generate(**kw, max_new_tokens=3, do_sample=False)
        rec = handle.records[0]
        again = model.generate(**kw, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, again) and out.shape[1] == kw["input_ids"].shape[1] + 3
    assert (rec.reducer, rec.tokens_before, rec.tokens_after) == ("vispruner", [36, 36], [10, 10])
    # The same picks as VisPruner on the eager [CLS] attention of layer -2 and the features
    # the step sees (the selected layer's, or their projection).
    with torch.no_grad():
        vis = twin.model.vision_tower(kw["pixel_values"], output_attentions=True, output_hidden_states=True)
        att = vis.attentions[-2][:, :, 0, 1:].mean(dim=1)
        feats = vis.hidden_states[-2][:, 1:]
        if stage == "projector":
            feats = twin.model.multi_modal_projector(feats)
    ref = vispruner(10, att, feats)
    assert [i.tolist() for i in rec.indices] == ref.indices.tolist()
    assert torch.equal(model.generate(**kw, max_new_tokens=3, do_sample=False), plain)  # restored


@pytest.mark.usefixtures("one_thread")
def test_runs_through_the_llava_next_adapter():
    case = llava_next_case.CASE
    model = case.build(0, "sdpa")
    kw = case.inputs(case.all_rows())
    stock = checks.logits(model, kw)
    with tr.apply(model, Step("vision_encoder", create("vispruner", 0.5))) as handle:
        logits = model(**kw).logits
        records = list(handle.records)
    assert records and all(r.reducer == "vispruner" for r in records)
    assert all(sum(r.tokens_after) < sum(r.tokens_before) for r in records)
    assert torch.isfinite(logits).all() and logits.shape[1] < stock.shape[1]
    assert torch.equal(checks.logits(model, kw), stock)  # restored


def test_models_without_cls_are_refused_at_patch_time():
    qwen = tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa")
    with pytest.raises(MissingContextError, match="cls_attention"):
        tr.patch(qwen, Pipeline([Step("projector", create("vispruner", 8))]))
    onevision = onevision_case.CASE.build(0, "sdpa")  # SigLIP tower: no [CLS]
    with pytest.raises(MissingContextError, match="cls_attention"):
        tr.patch(onevision, Step("vision_encoder", create("vispruner", 8)))
