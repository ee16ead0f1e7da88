"""The properties that define each baseline method, checked against small direct references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce import ReductionContext
from tokenreduce_plugins.visionzip import VisionZip

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@st.composite
def batches(draw, max_n=30, min_n=2):
    """Seeded (tokens, valid, budget) with distinct random features and a padding mask."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(2, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tokens = torch.randn(b, n, d, generator=gen)
    valid = torch.rand(b, n, generator=gen) < draw(st.sampled_from([1.0, 0.8]))
    valid[:, 0] = True
    budget = draw(st.integers(1, n - 1))
    return tokens, valid, budget, gen


def kept_rows(out):
    return [set(out.indices[b][out.valid[b]].tolist()) for b in range(out.indices.shape[0])]


# -- attention / CLS scoring: exactly the top-T ------------------------------------------------


@SETTINGS
@given(batches(), st.sampled_from(["fastv", "pdrop", "cls_attn"]), st.integers(1, 4))
def test_scoring_baselines_keep_exactly_the_top_t_scored_tokens(case, name, q):
    tokens, valid, budget, gen = case
    b, n, _ = tokens.shape
    att = torch.rand(b, q, n, generator=gen)
    if name == "cls_attn":
        ctx, score = ReductionContext(cls_attention=att[:, 0]), att[:, 0]
    else:  # the query rows are averaged (one row with attention_query="last")
        ctx, score = ReductionContext(attention=att), att.mean(dim=1)
    stage = "projector" if name == "cls_attn" else "llm_layer"
    out = tr.create(name, budget=budget, stage=stage)(tokens, mask=valid, context=ctx)
    for row in range(b):
        idx = valid[row].nonzero()[:, 0]
        t = min(budget, len(idx))
        top = idx[torch.argsort(score[row, idx], descending=True)[:t]]
        assert kept_rows(out)[row] == set(top.tolist())
        assert torch.equal(out.tokens[row, :t], tokens[row, torch.sort(top).values])  # features untouched


def test_pdrop_published_pyramid_576_288_144_72():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 576, 16, generator=gen)
    counts = []
    pipe = tr.get_registry().reducer_class("pdrop").schedule()
    for step in pipe:
        att = torch.rand(1, 1, x.shape[1], generator=gen)
        out = step.reducer(x, context=ReductionContext(attention=att, layer=step.layer))
        # Each drop keeps the tokens with the highest attention among those still present.
        assert set(out.indices[0].tolist()) == set(torch.topk(att[0, 0], out.num_kept).indices.tolist())
        x = out.tokens
        counts.append(x.shape[1])
    assert counts == [288, 144, 72]


# -- ToMe: sizes partition the input, features are size-weighted means -------------------------


@SETTINGS
@given(batches(max_n=40))
def test_tome_merged_features_are_means_of_their_groups(case):
    tokens, valid, budget, _ = case
    out = tr.create("tome", budget=budget)(tokens, mask=valid)
    if out.info.get("identity"):  # budget >= every row's valid count: nothing merged
        return
    assign = out.info["assignment"]
    n_valid = valid.sum(dim=1)
    assert torch.equal(out.sizes.sum(dim=1), n_valid.float())  # every valid token counted once
    assert bool((assign[~valid] == -1).all()) and bool((assign[valid] >= 0).all())
    for row in range(tokens.shape[0]):
        for slot in range(int(out.counts[row])):
            members = (assign[row] == slot).nonzero()[:, 0]
            assert len(members) == int(out.sizes[row, slot])
            assert int(out.indices[row, slot]) in members.tolist()  # a token represents its own group
            # A size-weighted average of averages is the plain mean of all merged inputs.
            torch.testing.assert_close(out.tokens[row, slot], tokens[row, members].mean(dim=0), rtol=1e-5, atol=1e-5)


def test_tome_one_round_merges_the_most_similar_pairs():
    # A/B alternate; tokens 0 and 1 are near-identical, as are 2 and 3; 4 and 5 are orthogonal.
    x = torch.tensor([[[1.0, 0, 0], [1.0, 0.01, 0], [0, 1.0, 0], [0, 1.0, 0.02], [0, 0, 1.0], [1.0, -1.0, -5.0]]])
    out = tr.create("tome", budget=4)(x)
    assert out.indices[0].tolist() == [1, 3, 4, 5]
    assert out.sizes[0].tolist() == [2.0, 2.0, 1.0, 1.0]
    torch.testing.assert_close(out.tokens[0, 0], x[0, :2].mean(dim=0))
    assert out.info["rounds"] == 1


def test_tome_reaches_budgets_below_half_by_repeated_rounds():
    x = torch.randn(2, 100, 8, generator=torch.Generator().manual_seed(1))
    out = tr.create("tome", budget=3)(x)
    assert out.counts.tolist() == [3, 3] and out.info["rounds"] == math.ceil(math.log2(100 / 3))
    assert out.sizes.sum(dim=1).tolist() == [100.0, 100.0]


# -- DivPrune: greedy max-min, step by step ------------------------------------------------------


@SETTINGS
@given(batches(max_n=30))
def test_divprune_follows_the_greedy_max_min_rule_step_by_step(case):
    tokens, valid, budget, _ = case
    out = tr.create("divprune", budget=budget)(tokens, mask=valid)
    if out.info.get("identity"):
        return
    order = out.info["selection_order"]
    for row in range(tokens.shape[0]):
        idx = valid[row].nonzero()[:, 0]
        x = torch.nn.functional.normalize(tokens[row, idx], dim=1)
        dist = 1 - x @ x.T
        picks = [idx.tolist().index(int(p)) for p in order[row][order[row] >= 0]]
        assert len(picks) == min(budget, len(idx)) == len(set(picks))
        if len(idx) == 1:
            continue
        # First pick: the token whose nearest other token is farthest.
        nearest_other = (dist + torch.eye(len(idx)) * 1e9).min(dim=0).values
        assert float(nearest_other[picks[0]]) >= float(nearest_other.max()) - 1e-5
        # Each next pick: the farthest from its nearest selected token among the unselected.
        for step in range(1, len(picks)):
            to_selected = dist[picks[:step]].min(dim=0).values
            free = torch.ones(len(idx), dtype=torch.bool)
            free[picks[:step]] = False
            assert float(to_selected[picks[step]]) >= float(to_selected[free].max()) - 1e-5, f"step {step}"


# -- DART: pivots kept, the rest least similar to the pivots ------------------------------------


@SETTINGS
@given(batches(max_n=30), st.integers(1, 3))
def test_dart_keeps_key_norm_pivots_and_least_similar_tokens(case, n_pivots):
    tokens, valid, budget, gen = case
    keys = torch.randn(*tokens.shape[:2], 5, generator=gen)
    reducer = tr.create("dart", budget=budget, pivot_image_tokens=n_pivots, pivot_text_tokens=0)
    out = reducer(tokens, mask=valid, context=ReductionContext(keys=keys))
    for row in range(tokens.shape[0]):
        idx = valid[row].nonzero()[:, 0]
        t = min(budget, len(idx))
        norms = keys[row, idx].abs().sum(dim=1)
        pivots = idx[torch.argsort(norms, descending=True)[: min(n_pivots, t)]]
        kept = kept_rows(out)[row]
        assert set(pivots.tolist()) <= kept and len(kept) == t
        if n_pivots == 1 and 1 < t < len(idx):
            # One pivot: the others are the T-1 tokens least similar to it.
            sim = torch.nn.functional.cosine_similarity(tokens[row], tokens[row, pivots[0]][None], dim=1)
            others = torch.tensor(sorted(kept - set(pivots.tolist())))
            dropped = torch.tensor(sorted(set(idx.tolist()) - kept))
            assert float(sim[others].max()) <= float(sim[dropped].min()) + 1e-6


def test_dart_splits_the_budget_equally_over_image_and_text_pivots():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 40, 6, generator=gen)
    text = torch.randn(1, 5, 6, generator=gen)
    ctx = ReductionContext(text_embeds=text)
    # 2 image pivots + 1 text pivot; 11 - 2 = 9 others, 3 per pivot.
    out = tr.create("dart", budget=11, pivot_by="token_norm", pivot_image_tokens=2, pivot_text_tokens=1)(x, context=ctx)
    img_piv = torch.topk(x[0].abs().sum(dim=1), 2).indices.tolist()
    txt_piv = int(torch.topk(text[0].abs().sum(dim=1), 1).indices)
    assert out.info["pivots"][0].tolist() == sorted(img_piv)
    remaining = set(range(40)) - set(img_piv)
    expected = set(img_piv)
    for pivot in [x[0, min(img_piv)], x[0, max(img_piv)], text[0, txt_piv]]:  # sequence order
        sim = torch.nn.functional.cosine_similarity(x[0], pivot[None], dim=1)
        pick = sorted(remaining, key=lambda i: float(sim[i]))[:3]
        expected |= set(pick)
        remaining -= set(pick)
    assert set(out.indices[0].tolist()) == expected


# -- VisionZip: budget split, dominant by CLS, contextual merge ---------------------------------


@pytest.mark.parametrize(
    ("budget", "dominant", "contextual"), [(64, 54, 10), (128, 108, 20), (192, 162, 30), (1, 1, 0)]
)
def test_visionzip_published_dominant_contextual_splits(budget, dominant, contextual):
    d, c = VisionZip(budget).split(torch.tensor([budget]))
    assert (int(d), int(c)) == (dominant, contextual)


@SETTINGS
@given(batches(max_n=40), st.sampled_from([10 / 64, 0.5, 1.0]))
def test_visionzip_dominant_by_cls_and_contextual_is_target_plus_mean(case, ratio):
    tokens, valid, budget, gen = case
    b, n, _ = tokens.shape
    cls_att, keys = torch.rand(b, n, generator=gen), torch.randn(b, n, 4, generator=gen)
    reducer = tr.create("visionzip", budget=budget, contextual_ratio=ratio)
    out = reducer(tokens, mask=valid, context=ReductionContext(cls_attention=cls_att, keys=keys))
    if out.info.get("identity"):
        return
    n_dom, _ = reducer.split(out.counts)
    merged_into = out.info["merged_into"]
    for row in range(b):
        idx = valid[row].nonzero()[:, 0]
        if len(idx) <= budget:
            continue  # identity
        dom = out.info["dominant"][row].nonzero()[:, 0]
        top = idx[torch.argsort(cls_att[row, idx], descending=True)[: int(n_dom[row])]]
        assert set(dom.tolist()) == set(top.tolist())
        for slot in range(int(out.counts[row])):
            i = int(out.indices[row, slot])
            if i in dom.tolist():
                assert torch.equal(out.tokens[row, slot], tokens[row, i]) and out.sizes[row, slot] == 1
                continue
            members = (merged_into[row] == i).nonzero()[:, 0]
            expected = tokens[row, i] + (tokens[row, members].mean(dim=0) if len(members) else 0)
            torch.testing.assert_close(out.tokens[row, slot], expected, rtol=1e-5, atol=1e-5)
            assert int(out.sizes[row, slot]) == 1 + len(members)
            # Each merged token went to the contextual target with the most similar key.
            targets = out.info["contextual"][row].nonzero()[:, 0]
            for m in members.tolist():
                sims = torch.nn.functional.cosine_similarity(keys[row, targets], keys[row, m][None], dim=1)
                assert float(sims[targets.tolist().index(i)]) >= float(sims.max()) - 1e-6
        assert float(out.sizes[row].sum()) == (len(idx) if int(out.counts[row] - n_dom[row]) > 0 else budget)
