"""HoloV: the official selection reproduced, conformance, region/allocation properties, errors, models."""

from __future__ import annotations

from pathlib import Path

import adapter_checks as checks
import numpy as np
import pytest
import test_adapter_llava as llava_case
import test_adapter_llava_next as llava_next_case
import test_adapter_onevision as onevision_case
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import two_image_batch, one_thread, tiny_llava, tiny_qwen2_5_vl  # noqa: F401 - fixture

import tokenreduce as tr
from tokenreduce import ConfigError, MissingContextError, Pipeline, ReductionContext, Stage, Step, create
from tokenreduce.budget import resolve_budget
from tokenreduce.errors import InvalidInputError, StageError
from tokenreduce.testing import check_reducer
from tokenreduce_plugins.holov import HoloV, region_layout

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "holov.npz"


def holov(budget, cls_attention, tokens, mask=None, **params):
    return create("holov", budget, **params)(tokens, mask=mask, context=ReductionContext(cls_attention=cls_attention))


# -- the official code's output (fixtures/baselines/README.md) --------------------------------------


def _fixture():
    data = dict(np.load(FIXTURE))
    cases = sorted({int(k.split("_")[0][4:]) for k in data})
    return data, cases


@pytest.mark.parametrize("k", _fixture()[1])
def test_matches_the_official_selection(k):
    data, _ = _fixture()
    get = lambda key: torch.from_numpy(np.asarray(data[f"case{k}_{key}"]))  # noqa: E731
    tokens, att, positions, features = get("tokens"), get("cls_attention"), get("positions"), get("features")
    t, r = int(data[f"case{k}_budget"]), int(data[f"case{k}_regions"])
    out = holov(t, att, tokens, regions=r)
    n = tokens.shape[1]
    for b in range(tokens.shape[0]):
        real = positions[b] >= 0
        official = positions[b][real]
        ours = out.indices[b]
        assert len(set(ours.tolist())) == t
        # Every token the official code keeps is kept, with the same feature.
        assert set(official.tolist()) <= set(ours.tolist())
        slot = {int(p): j for j, p in enumerate(ours.tolist())}
        mine = out.tokens[b, [slot[int(p)] for p in official]]
        torch.testing.assert_close(mine, features[b][real], rtol=0, atol=0)
        assert bool((features[b][~real] == 0).all())  # the official zero padding
        # Per region, our allocation is the official one (capped at the region size).
        region = out.info["region"][b]
        kept_official = torch.bincount(region[official], minlength=out.info["allocation"].shape[1])
        assert out.info["allocation"][b].tolist() == kept_official.tolist()
        # Where the official code pads with zeros (overflow), the shortfall is filled with
        # the best remaining tokens by [CLS] attention.
        extra = sorted(set(ours.tolist()) - set(official.tolist()))
        assert extra == out.info["topped_up"][b].nonzero()[:, 0].tolist()
        assert len(extra) == t - int(real.sum())
        rest = torch.ones(n, dtype=torch.bool)
        rest[official] = False
        assert sorted(torch.topk(att[b].masked_fill(~rest, -1), len(extra)).indices.tolist()) == extra


def test_fixture_covers_plain_and_overflow_cases():
    data, cases = _fixture()
    short = [int((data[f"case{k}_positions"] < 0).sum()) for k in cases]
    assert any(s == 0 for s in short) and any(s > 0 for s in short)


# -- conformance ---------------------------------------------------------------------------------


def cls_context(tokens, valid, stage):
    # A softmax row, as the adapters give: a deterministic function of the tokens, with ties
    # wherever the kit plants duplicate tokens.
    f = tokens.float()
    return ReductionContext(cls_attention=torch.softmax(f.sum(dim=-1) + 0.5 * f[..., 0], dim=1))


@pytest.mark.parametrize("params", [{}, {"regions": 3}, {"regions": 1, "alpha": 0.0}], ids=["defaults", "r3", "r1"])
def test_conformance_at_every_claimed_stage(params):
    check_reducer(HoloV, params=params, context_factory=cls_context, max_examples=12)


# -- properties ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 60), regions=st.integers(1, 20), drop=st.integers(0, 2**16))
def test_regions_are_contiguous_runs_of_near_equal_length(n, regions, drop):
    gen = torch.Generator().manual_seed(drop)
    valid = torch.rand(1, n, generator=gen) < 0.8
    valid[0, 0] = True
    pos, ok = region_layout(valid, regions)
    m = int(valid.sum())
    sizes = ok.sum(dim=-1)[0]
    expected = [m // regions + (1 if g < m % regions else 0) for g in range(min(regions, n))]
    assert sizes.tolist() == expected  # the first N mod R runs are one longer
    order = pos[0][ok[0]]  # region by region, slot by slot
    assert order.tolist() == valid[0].nonzero()[:, 0].tolist()  # every valid token once, in order


@st.composite
def scene(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(2, 48))
    d = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, d, generator=gen)
    att = torch.softmax(torch.randn(b, n, generator=gen) * draw(st.sampled_from([0.5, 2.0, 6.0])), dim=1)
    return tokens, att, draw(st.integers(1, n - 1)), draw(st.integers(1, 12))  # T < N: a real reduction


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(scene())
def test_allocation_follows_region_scores_and_selection_follows_attention(case):
    tokens, att, t, regions = case
    out = holov(t, att, tokens, regions=regions)
    info = out.info
    for b in range(tokens.shape[0]):
        region, alloc, scores = info["region"][b], info["allocation"][b], info["region_scores"][b]
        kept = out.keep_mask[b] & ~info["topped_up"][b]
        sizes = torch.bincount(region, minlength=alloc.shape[0])
        # Exactly T tokens: the allocation plus the top-up.
        assert int(alloc.sum()) + int(info["topped_up"][b].sum()) == t
        assert torch.equal(torch.bincount(region[kept], minlength=alloc.shape[0]), alloc)
        assert bool((alloc <= sizes).all())
        # A top-up happens only when some region got all its tokens (overflow).
        if bool(info["topped_up"][b].any()):
            assert bool(((alloc == sizes) & (sizes > 0)).any())
        # A higher-scoring region never gets fewer tokens, up to its size.
        for g in range(alloc.shape[0]):
            for h in range(alloc.shape[0]):
                if sizes[g] > 0 and sizes[h] > 0 and scores[g] > scores[h]:
                    assert alloc[g] >= min(int(alloc[h]), int(sizes[g]))
        # Inside a region, the kept tokens are its highest-attention ones.
        for g in range(alloc.shape[0]):
            inside = region == g
            if bool((inside & kept).any()) and bool((inside & ~kept).any()):
                assert att[b][inside & kept].min() >= att[b][inside & ~kept].max()


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(scene())
def test_padding_is_the_same_as_dropping_the_padded_tokens(case):
    # A padded row is cut into regions over its valid tokens only, as if they were the row.
    tokens, att, t, regions = case
    n = tokens.shape[1]
    keep = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.7
    keep[0] = True
    mask = keep.expand(tokens.shape[0], n)
    t = min(t, int(keep.sum()))
    padded = holov(t, att, tokens, mask=mask, regions=regions)
    where = keep.nonzero()[:, 0]
    alone = holov(t, att[:, keep], tokens[:, keep], regions=regions)
    assert torch.equal(padded.indices, where[alone.indices])


def test_equation_alpha_zero_allocates_by_attention_mass():
    # Two regions of 4; attention masses 0.7 / 0.3 -> floor(2.8), floor(1.2) = 2, 1; the one
    # left over goes to the heavier region: 3 + 1. Ties in a region go to the lower index.
    att = torch.tensor([[0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]])
    out = holov(4, att, torch.randn(1, 8, 3, generator=torch.Generator().manual_seed(0)), regions=2, alpha=0.0)
    assert out.info["allocation"].tolist() == [[3, 1]]
    assert out.indices.tolist() == [[0, 1, 2, 4]]
    torch.testing.assert_close(out.info["region_scores"], torch.tensor([[175.0, 75.0]]))


def test_equation_similarity_spread_moves_the_budget():
    # Equal attention (125 after the 1e3 scale). Region 0 = four equal tokens: similarities
    # (0, 1, 1, 1) per row -> mean 1, spread 1/3, scale 125 / (1/3) -> score 125 + 0.09 * 125
    # = 136.25. Region 1 = four orthogonal tokens: spread 0 -> 125. Weights 0.5215 / 0.4785
    # of T=4 -> 2 + 1, the left-over one to region 0.
    tokens = torch.cat([torch.ones(1, 4, 4), torch.eye(4).unsqueeze(0)], dim=1)
    att = torch.full((1, 8), 1 / 8)
    out = holov(4, att, tokens, regions=2)
    torch.testing.assert_close(out.info["region_scores"], torch.tensor([[136.25, 125.0]]), rtol=1e-5, atol=1e-3)
    assert out.info["allocation"].tolist() == [[3, 1]]
    flat = holov(4, att, tokens, regions=2, alpha=0.0)
    assert flat.info["allocation"].tolist() == [[2, 2]]


def test_one_token_regions_score_their_raw_attention():
    att = torch.tensor([[0.7, 0.2, 0.1]])
    out = holov(2, att, torch.randn(1, 3, 4), regions=5)
    torch.testing.assert_close(out.info["region_scores"], att)
    # Weights 0.7, 0.2, 0.1 of T=2 -> floor 1, 0, 0; the one left over goes to the top weight
    # again: 2 for a one-token region. The official code pads a zero vector for the excess;
    # here the best other token by attention fills the slot.
    assert out.info["allocation"].tolist() == [[1, 0, 0]]
    assert out.info["topped_up"].tolist() == [[False, True, False]]
    assert out.indices.tolist() == [[0, 1]]
    # With 0.5 / 0.3 / 0.2, w * T = 0.999999 (the 1e-6 in the denominator): floor 0 for all,
    # and the two left over go to the two highest weights.
    even = holov(2, torch.tensor([[0.5, 0.3, 0.2]]), torch.randn(1, 3, 4), regions=5)
    assert even.info["allocation"].tolist() == [[1, 1, 0]] and not bool(even.info["topped_up"].any())


def test_ratio_budgets_round_down_as_the_official_script():
    att = torch.softmax(torch.randn(1, 10, generator=torch.Generator().manual_seed(1)), dim=1)
    out = holov(0.55, att, torch.randn(1, 10, 4))  # int(5.5) = 5, where half-up would keep 6
    assert out.counts.tolist() == [5]


def test_huge_bfloat16_tokens_still_score_finitely():
    # Sums of squares of bfloat16 values near its top overflow float32: normalised by the peak.
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randn(1, 32, 8, generator=gen)
    att = torch.softmax(torch.randn(1, 32, generator=gen), dim=1)
    big = (tokens / tokens.abs().max() * 0.99 * torch.finfo(torch.bfloat16).max).to(torch.bfloat16)
    out = holov(6, att, big, regions=4)
    ref = holov(6, att, tokens.to(torch.bfloat16), regions=4)
    assert bool(torch.isfinite(out.info["region_scores"]).all())
    torch.testing.assert_close(out.info["region_scores"], ref.info["region_scores"], rtol=1e-3, atol=1e-2)
    assert torch.equal(out.indices, ref.indices)


def test_low_precision_inputs_compute_in_float32_and_keep_their_dtype():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 64, 16, generator=gen)
    att = torch.softmax(torch.randn(2, 64, generator=gen), dim=1)
    ref = holov(12, att, tokens)
    for dtype in (torch.float16, torch.bfloat16):
        out = holov(12, att.to(dtype), tokens.to(dtype))
        assert out.tokens.dtype == dtype
        assert (out.indices == ref.indices).float().mean() > 0.8


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"regions": 0}, "regions"),
        ({"regions": 2.5}, "regions"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"crops": 4}, "crops"),
    ],
)
def test_bad_parameters_are_refused_by_name(params, field):
    with pytest.raises(ConfigError, match=field):
        create("holov", 8, **params)


def test_missing_or_misshapen_attention_is_refused():
    tokens = torch.randn(2, 10, 4)
    with pytest.raises(MissingContextError, match="cls_attention"):
        create("holov", 4)(tokens)
    with pytest.raises(InvalidInputError, match="cls_attention must have shape"):
        holov(4, torch.rand(2, 9), tokens)
    with pytest.raises(InvalidInputError, match="cls_attention must be finite"):
        holov(4, torch.full((2, 10), float("nan")), tokens)
    with pytest.raises(StageError, match="llm_layer"):
        create("holov", 4, stage="llm_layer")


# -- in models -------------------------------------------------------------------------------------

FAMILIES = {"llava": llava_case.CASE, "llava_next": llava_next_case.CASE}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("stage", ["projector", "vision_encoder"])
def test_runs_through_the_llava_adapters_under_sdpa(family, stage):
    case = FAMILIES[family]
    model = case.build(0, "sdpa")
    kw = case.inputs(case.all_rows())
    stock = checks.logits(model, kw)
    step = Step(stage, create("holov", 6, regions=4))
    with tr.apply(model, step) as handle:
        out = model(**kw).logits
        records = list(handle.records)
        gen = model.generate(**kw, max_new_tokens=2, do_sample=False)
    assert records and all(r.reducer == "holov" and r.stage.value == stage for r in records)
    for rec in records:
        assert rec.tokens_after == [resolve_budget(6, n) for n in rec.tokens_before]
    assert torch.isfinite(out).all() and out.shape[1] < stock.shape[1]
    assert gen.shape[1] == kw["input_ids"].shape[1] + 2
    assert torch.equal(checks.logits(model, kw), stock)  # restored


def test_llava_picks_equal_holov_on_the_eager_cls_attention_and_projected_features():
    model = tiny_llava(seed=0, attn_implementation="sdpa")
    twin = tiny_llava(seed=0, attn_implementation="eager")
    batch = two_image_batch()
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    with tr.apply(model, Pipeline([Step("projector", create("holov", 8, regions=4))])) as handle:
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2, do_sample=False)
        rec = handle.records[0]
    with torch.no_grad():
        vis = twin.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        att = vis.attentions[-2][:, :, 0, 1:].mean(dim=1)
        feats = twin.model.multi_modal_projector(vis.hidden_states[-2][:, 1:])
    ref = holov(8, att, feats, regions=4)
    assert [i.tolist() for i in rec.indices] == ref.indices.tolist()


def test_refused_at_patch_time_where_there_is_no_cls_token():
    qwen = tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa")
    with pytest.raises(MissingContextError, match="cls_attention"):
        tr.patch(qwen, Pipeline([Step("projector", create("holov", 8))]))
    onevision = onevision_case.CASE.build(0, "sdpa")
    with pytest.raises(MissingContextError, match="cls_attention"):
        tr.patch(onevision, Step("projector", create("holov", 8)))


def test_published_stage_is_the_projector():
    from benchmarks.end_to_end import published_stage

    assert tr.get_registry().reducer_class("holov") is HoloV
    assert HoloV(8)._default_stage() is Stage.PROJECTOR
    assert published_stage(HoloV) == ("projector", ())  # the end-to-end benchmark's row
