"""SparseVLM: the official selection and recycling, conformance, properties, errors, and real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce import MissingContextError, Pipeline, ReductionContext, Stage, Step, create
from tokenreduce.errors import ConfigError, InvalidInputError, StageError
from tokenreduce.testing import check_reducer
from tokenreduce_plugins.sparsevlm import (
    PUBLISHED_LAYERS,
    PUBLISHED_SELECTED,
    SparseVLM,
    dpc_knn_clusters,
    rater_scores,
    recycle_counts,
    select_raters,
    split_budget,
    step_budgets,
)

from models import IMAGE_TOKEN, two_image_batch, one_thread, qwen_vl_inputs, tiny_llava, tiny_qwen2_5_vl  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "baselines" / "sparsevlm.npz"
EXAMPLE = ROOT / "docs" / "examples" / "reducers" / "sparsevlm.yaml"
DATA = dict(np.load(FIXTURE))
CASES = sorted({int(k.split("_")[0][4:]) for k in DATA})
EXAMPLES = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def fx(k: int, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(DATA[f"case{k}_{key}"]))


def ones(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, dtype=torch.bool)


# -- the official code's outputs (tests/fixtures/baselines/README.md) ------------------------------


def check_against_official(out, k: int, s: int, tokens: torch.Tensor) -> None:
    """Kept = official selected + cluster tokens at their centres; merged features = official."""
    kept, centres, merged = fx(k, f"kept{s}"), fx(k, f"centres{s}"), fx(k, f"merged{s}")
    assert out.info["selected"][0].nonzero()[:, 0].tolist() == kept.tolist()
    assert out.info["recycled"][0].nonzero()[:, 0].tolist() == sorted(fx(k, f"recycled{s}").tolist())
    assert out.indices[0].tolist() == sorted(kept.tolist() + centres.tolist())
    slot = {int(p): j for j, p in enumerate(out.indices[0])}
    assert torch.equal(out.tokens[0, [slot[int(p)] for p in kept]], tokens[0, kept])
    ours = out.tokens[0, [slot[int(p)] for p in centres]]
    # The official mean divides by n + 1e-6 and sums in another order.
    torch.testing.assert_close(ours, merged, rtol=1e-5, atol=1e-5)
    assert float(out.sizes[0].sum()) == len(kept) + len(fx(k, f"recycled{s}"))


@pytest.mark.parametrize("k", CASES)
def test_raters_match_official(k):
    tokens, text = fx(k, "tokens0")[None], fx(k, "text0")[None]
    raters = select_raters(tokens, ones(1, tokens.shape[1]), text, ones(1, text.shape[1]))
    assert raters[0].tolist() == fx(k, "raters").tolist()


@pytest.mark.parametrize("k", CASES)
def test_first_step_reproduces_official_selection_and_recycling(k):
    # The first pruning layer sees the input embeddings (the fixture's layers 0..2 are
    # identities), so the whole reducer, raters included, runs on the official inputs.
    tokens, text, attention = fx(k, "tokens0")[None], fx(k, "text0")[None], fx(k, "attention0")[None]
    out = create("sparsevlm", int(DATA[f"case{k}_budget0"]), stage="llm_layer")(
        tokens, context=ReductionContext(attention=attention, text_embeds=text)
    )
    assert out.info["raters"][0].tolist() == fx(k, "raters").tolist()
    torch.testing.assert_close(out.info["scores"][0], fx(k, "scores0"), rtol=1e-5, atol=1e-9)
    check_against_official(out, k, 0, tokens)


@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("k", CASES)
def test_later_steps_reproduce_official_with_its_raters(k, s):
    # The official code keeps the first step's raters; ours re-selects them per step (a
    # documented deviation), so these steps are checked from the official raters on.
    tokens, attention = fx(k, f"tokens{s}")[None], fx(k, f"attention{s}")[None]
    scores = rater_scores(attention, fx(k, "raters")[None])
    torch.testing.assert_close(scores[0], fx(k, f"scores{s}"), rtol=1e-5, atol=1e-9)
    budget = int(DATA[f"case{k}_budget{s}"])
    out = SparseVLM(budget, stage="llm_layer").sparsify(tokens, scores, torch.tensor([budget]), ones(1, tokens.shape[1]))
    check_against_official(out, k, s, tokens)


@pytest.mark.parametrize("k", CASES)
def test_budgets_and_counts_match_the_official_schedule(k):
    selected = PUBLISHED_SELECTED[int(DATA[f"case{k}_retained"])]
    budgets = [int(DATA[f"case{k}_budget{s}"]) for s in range(3)]
    assert list(step_budgets(selected, 576)) == budgets
    n = 576
    for s, t in enumerate(budgets):
        kk, r, c = split_budget(torch.tensor([t]), torch.tensor([n]), n, 0.3, 0.1)
        assert int(kk) == len(fx(k, f"kept{s}")) == min(selected[s], n - 1)
        assert (int(r), int(c)) == (len(fx(k, f"recycled{s}")), len(fx(k, f"centres{s}")))
        n = t


def test_published_schedules_and_yaml_example():
    assert {r: step_budgets(PUBLISHED_SELECTED[r], 576) for r in PUBLISHED_SELECTED} == {
        64: (82, 32, 18),
        96: (249, 55, 27),
        128: (312, 117, 39),
        192: (309, 204, 113),
    }
    loaded = tr.load_config(EXAMPLE)
    built = SparseVLM.schedule(64)
    assert [(s.stage, s.layer, s.reducer) for s in loaded] == [(s.stage, s.layer, s.reducer) for s in built]
    assert [s.layer for s in built] == list(PUBLISHED_LAYERS) == [3, 7, 16]
    # Defaults are the published parameters.
    assert loaded.steps[0].reducer == SparseVLM(82, stage="llm_layer", recycle=True, recycle_ratio=0.3, cluster_ratio=0.1)


def test_attention_contract_declared_for_the_adapter():
    assert (SparseVLM.attention_query, SparseVLM.attention_layer) == ("text", "previous")
    assert SparseVLM.required_context == frozenset({"attention", "text_embeds"})
    assert SparseVLM.stages == frozenset({Stage.LLM_LAYER})
    assert "arXiv:2410.04417" in SparseVLM.paper and "https://github.com/Gumpest/SparseVLMs" in SparseVLM.__doc__


# -- conformance ------------------------------------------------------------------------------------


def sparsevlm_context(tokens, valid, stage):
    """Text = a deterministic transform of a few tokens; attention = softmax over the image of text . image."""
    x = tokens.float()
    text = torch.tanh(-x[:, : min(3, x.shape[1])].flip(1) * 0.5 + 0.1)
    mask = torch.ones(text.shape[:2], dtype=torch.bool, device=tokens.device)
    if text.shape[1] > 1:
        mask[1:, -1] = False  # rows with fewer text tokens than others
    attention = torch.softmax(text @ x.transpose(1, 2) / x.shape[-1] ** 0.5, dim=2)
    return ReductionContext(attention=attention, text_embeds=text, text_mask=mask)


@pytest.mark.parametrize(
    "params",
    [{}, {"recycle": False}, {"recycle_ratio": 1.0, "cluster_ratio": 0.5}, {"recycle_ratio": 0.0}],
    ids=["published", "no-recycling", "recycle-all", "recycle-one"],
)
def test_conformance(params):
    check_reducer(SparseVLM, params=params, context_factory=sparsevlm_context, max_examples=15)


# -- properties ---------------------------------------------------------------------------------------


def reference_split(n: int, t: int, a: float = 0.3, b: float = 0.1) -> tuple[int, int, int]:
    """The largest k with k + c(k) <= t from the official formulas in plain Python."""
    def c_of(k):
        return recycle_counts(n - k, a, b)
    best = max((k for k in range(0, n + 1) if k + c_of(k)[1] <= t), default=None)
    if best is None:
        return 0, c_of(0)[0], t
    return best, c_of(best)[0], c_of(best)[1]


@EXAMPLES
@given(
    rows=st.lists(st.tuples(st.integers(1, 700), st.floats(0.0, 1.0)), min_size=1, max_size=4),
    a=st.sampled_from([0.3, 0.0, 0.5, 1.0]),
    b=st.sampled_from([0.1, 0.0, 0.25, 1.0]),
)
def test_budget_split_follows_the_official_formulas(rows, a, b):
    n_valid = [n for n, _ in rows]
    counts = [max(1, round(n * f)) for n, f in rows]
    k, r, c = split_budget(torch.tensor(counts), torch.tensor(n_valid), max(n_valid), a, b)
    for i, (n, t) in enumerate(zip(n_valid, counts)):
        rk, rr, rc = reference_split(n, t, a, b)
        assert (int(k[i]), int(r[i]), int(c[i])) == (rk, rr, rc)
        assert int(k[i]) + int(c[i]) == t and int(c[i]) <= int(r[i]) <= n - int(k[i])


def _case(seed: int, b: int, n: int, d: int, q: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, d, generator=g)
    text = torch.randn(b, q, d, generator=g)
    attention = torch.softmax(torch.randn(b, q, n, generator=g) * 2, dim=2)
    return tokens, text, attention


CASE = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(2, 60), st.integers(1, 8), st.integers(1, 6))


@EXAMPLES
@given(case=CASE, frac=st.floats(0.05, 0.95))
def test_selection_and_recycling_follow_the_rater_scores(case, frac):
    tokens, text, attention = _case(*case)
    b, n, _ = tokens.shape
    budget = max(1, min(n - 1, round(n * frac)))
    out = SparseVLM(budget, stage="llm_layer")(tokens, context=ReductionContext(attention=attention, text_embeds=text))
    scores = rater_scores(attention, out.info["raters"])
    torch.testing.assert_close(out.info["scores"], scores)
    sel, rec = out.info["selected"], out.info["recycled"]
    rest = ~sel & ~rec
    for row in range(b):
        s = scores[row]
        # Selected >= recycled >= discarded: the recycled tokens are the best of the dropped.
        if sel[row].any() and (rec[row] | rest[row]).any():
            assert s[sel[row]].min() >= s[rec[row] | rest[row]].max()
        if rec[row].any() and rest[row].any():
            assert s[rec[row]].min() >= s[rest[row]].max()
        k, r, c = (int(v) for v in split_budget(torch.tensor([budget]), torch.tensor([n]), n, 0.3, 0.1))
        assert (int(sel[row].sum()), int(rec[row].sum()), int(out.info["clusters"][row])) == (k, r, c)


@EXAMPLES
@given(case=CASE, frac=st.floats(0.05, 0.95))
def test_cluster_tokens_are_means_of_their_members(case, frac):
    tokens, text, attention = _case(*case)
    b, n, _ = tokens.shape
    budget = max(1, min(n - 1, round(n * frac)))
    out = SparseVLM(budget, stage="llm_layer")(tokens, context=ReductionContext(attention=attention, text_embeds=text))
    into, sel, rec = out.info["merged_into"], out.info["selected"], out.info["recycled"]
    assert bool(((into >= 0) == rec).all()), "exactly the recycled tokens are merged"
    for row in range(b):
        for slot, pos in enumerate(out.indices[row].tolist()):
            if sel[row, pos]:
                assert torch.equal(out.tokens[row, slot], tokens[row, pos]) and float(out.sizes[row, slot]) == 1
            else:
                members = (into[row] == pos).nonzero()[:, 0]
                assert pos in members.tolist(), "a cluster token stands at its centre"
                assert float(out.sizes[row, slot]) == len(members)
                torch.testing.assert_close(out.tokens[row, slot], tokens[row, members].mean(dim=0))
        assert float(out.sizes[row].sum()) == int(sel[row].sum()) + int(rec[row].sum())


@EXAMPLES
@given(case=CASE, frac=st.floats(0.05, 0.95), noise=st.floats(0.0, 1.0))
def test_only_rater_rows_and_real_text_matter(case, frac, noise):
    tokens, text, attention = _case(*case)
    n = tokens.shape[1]
    budget = max(1, min(n - 1, round(n * frac)))
    reducer = SparseVLM(budget, stage="llm_layer")
    base = reducer(tokens, context=ReductionContext(attention=attention, text_embeds=text))
    raters = base.info["raters"]
    # Other text rows' attention does not count.
    rand = torch.rand(attention.shape, generator=torch.Generator().manual_seed(case[0] + 2))
    other = torch.where(raters.unsqueeze(2), attention, rand * noise)
    again = reducer(tokens, context=ReductionContext(attention=other, text_embeds=text))
    assert torch.equal(base.indices, again.indices) and torch.equal(base.tokens, again.tokens)
    # Padded text (text_mask False) neither rates nor shifts the mean relevance.
    b, _, d = text.shape
    g = torch.Generator().manual_seed(case[0] + 1)
    pad_text = torch.cat([text, torch.randn(b, 2, d, generator=g) * 5], dim=1)
    pad_att = torch.cat([attention, torch.rand(b, 2, n, generator=g)], dim=1)
    mask = torch.cat([ones(*text.shape[:2]), torch.zeros(text.shape[0], 2, dtype=torch.bool)], dim=1)
    padded = reducer(tokens, context=ReductionContext(attention=pad_att, text_embeds=pad_text, text_mask=mask))
    assert torch.equal(base.indices, padded.indices) and torch.equal(base.tokens, padded.tokens)


@EXAMPLES
@given(case=CASE, frac=st.floats(0.05, 0.95), boost=st.floats(0.01, 1.0))
def test_more_rater_attention_never_unselects_a_token(case, frac, boost):
    tokens, text, attention = _case(*case)
    n = tokens.shape[1]
    budget = max(1, min(n - 1, round(n * frac)))
    reducer = SparseVLM(budget, stage="llm_layer")
    base = reducer(tokens, context=ReductionContext(attention=attention, text_embeds=text))
    chosen = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(case[0])))
    more = attention.clone()
    more[:, :, chosen] += boost
    out = reducer(tokens, context=ReductionContext(attention=more, text_embeds=text))
    was = base.info["selected"][:, chosen]
    assert bool(out.info["selected"][:, chosen][was].all())


@EXAMPLES
@given(case=CASE, frac=st.floats(0.05, 0.95))
def test_without_recycling_it_keeps_the_top_t_by_rater_attention(case, frac):
    tokens, text, attention = _case(*case)
    n = tokens.shape[1]
    budget = max(1, min(n - 1, round(n * frac)))
    out = SparseVLM(budget, stage="llm_layer", recycle=False)(
        tokens, context=ReductionContext(attention=attention, text_embeds=text)
    )
    scores = out.info["scores"]
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :budget]
    assert out.indices.tolist() == torch.sort(top, dim=1).values.tolist()
    assert torch.equal(out.tokens, torch.gather(tokens, 1, out.indices.unsqueeze(-1).expand(-1, -1, tokens.shape[2])))


def test_density_ties_go_to_the_better_scored_token():
    # c = 1: every density is exp(0) = 1, so the centre is the first (best-scored) token;
    # c = 2: mutual nearest neighbours tie, the earlier of each pair is the denser.
    x = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.2]]])
    mask = ones(1, 4)
    centres, assign = dpc_knn_clusters(x, mask, torch.tensor([1]), 1)
    assert centres.tolist() == [[0]] and assign.tolist() == [[0, 0, 0, 0]]
    centres, assign = dpc_knn_clusters(x, mask, torch.tensor([2]), 2)
    assert centres.tolist() == [[0, 2]] and assign.tolist() == [[0, 0, 1, 1]]


def test_single_text_token_rates_and_rows_without_text_keep_the_first_tokens():
    tokens = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(0))
    attention = torch.rand(2, 1, 10, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 1, 4)
    mask = torch.tensor([[True], [False]])
    out = SparseVLM(4, stage="llm_layer", recycle=False)(
        tokens, context=ReductionContext(attention=attention, text_embeds=text, text_mask=mask)
    )
    assert out.info["raters"].tolist() == [[True], [False]]
    assert out.indices[0].tolist() == sorted(torch.topk(attention[0, 0], 4).indices.tolist())
    assert out.indices[1].tolist() == [0, 1, 2, 3]


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"recycle_ratio": 1.5}, "recycle_ratio: Input should be less than or equal to 1"),
        ({"cluster_ratio": -0.1}, "cluster_ratio: Input should be greater than or equal to 0"),
        ({"recycle": "sometimes"}, "recycle: Input should be a valid boolean"),
        ({"recycle_ratio": True}, "recycle_ratio: a boolean is not allowed here"),
    ],
)
def test_bad_parameters_name_field_and_range(params, match):
    with pytest.raises(ConfigError, match=match):
        create("sparsevlm", budget=8, **params)


def test_bad_schedule_and_stage_are_refused():
    with pytest.raises(ConfigError, match="retained=100 has no official schedule; allowed: 64, 96, 128, 192"):
        SparseVLM.schedule(100)
    with pytest.raises(ConfigError, match="layers must list 3 layers"):
        SparseVLM.schedule(64, layers=(3, 7))
    with pytest.raises(StageError, match="does not support stage 'projector'"):
        create("sparsevlm", budget=8, stage="projector")
    with pytest.raises(ConfigError, match="reads the attention of the previous layer, so its layer must be >= 1"):
        Step("llm_layer", create("sparsevlm", 8), layer=0)


@pytest.mark.parametrize(
    ("ctx", "match"),
    [
        (ReductionContext(attention=torch.rand(2, 3, 10)), "needs context text_embeds;"),
        (ReductionContext(text_embeds=torch.rand(2, 3, 6)), "needs context attention;"),
        (
            ReductionContext(attention=torch.rand(2, 3, 10), text_embeds=torch.rand(2, 3, 5)),
            r"context.text_embeds must have shape \(B, L, D\)=\(2, L, 6\)",
        ),
        (
            ReductionContext(attention=torch.rand(2, 4, 10), text_embeds=torch.rand(2, 3, 6)),
            r"context.attention must have shape \(B, L, N\)=\(2, 3, 10\)",
        ),
        (
            ReductionContext(attention=torch.rand(2, 3, 10), text_embeds=torch.rand(2, 3, 6), text_mask=ones(2, 4)),
            r"context.text_mask must have shape \(B, L\)=\(2, 3\)",
        ),
        (
            ReductionContext(attention=torch.full((2, 3, 10), float("nan")), text_embeds=torch.rand(2, 3, 6)),
            "context.attention has non-finite values in the raters' rows",
        ),
    ],
)
def test_missing_or_malformed_context(ctx, match):
    error = MissingContextError if "needs context" in match else InvalidInputError
    with pytest.raises(error, match=match):
        create("sparsevlm", budget=4, stage="llm_layer")(torch.randn(2, 10, 6), context=ctx)


# -- in real (tiny) models through the adapters, under SDPA --------------------------------------------

NEW_TOKENS = 3


@pytest.fixture(scope="module")
def llava():
    model = tiny_llava(seed=0, attn_implementation="sdpa")
    return model, two_image_batch()


def _schedule(layers_budgets):
    return Pipeline([Step("llm_layer", create("sparsevlm", t), layer=k) for k, t in layers_budgets])


def test_runs_in_llava_generate_with_the_multi_layer_schedule(llava):
    model, inputs = llava
    assert model.config._attn_implementation == "sdpa"
    plain = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    with tr.apply(model, _schedule([(1, 20), (2, 10), (3, 6)])) as handle:
        with torch.no_grad():
            model(**inputs)
        records = list(handle.records)
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        again = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out, again)
    assert [(r.layer, r.tokens_before, r.tokens_after) for r in records] == [
        (1, [36, 36], [20, 20]),
        (2, [20, 20], [10, 10]),
        (3, [10, 10], [6, 6]),
    ]
    for rec in records:
        for row in range(2):
            info = rec.info[row]
            assert int(info["selected"].sum()) + int(info["clusters"]) == rec.tokens_after[row]
    assert torch.equal(model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False), plain)


def test_scores_are_the_raters_eager_attention_of_the_previous_layer(llava):
    # The adapter recomputes only the text rows from layer K-1's q/k; they equal the eager map.
    model, inputs = llava
    twin = tiny_llava(seed=0, attn_implementation="eager")
    with tr.apply(model, _schedule([(2, 12)])) as handle:
        with torch.no_grad():
            model(**inputs)
        rec = handle.records[0]
    with torch.no_grad():
        att = twin(**inputs, output_attentions=True).attentions[1].mean(dim=1)  # (B, L, L)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for row in range(2):
        img = (ids[row] == IMAGE_TOKEN).nonzero()[:, 0]
        text = ((torch.arange(ids.shape[1]) > img.max()) & mask[row]).nonzero()[:, 0]
        rows = att[row][text][:, img]  # (text, image)
        raters = rec.info[row]["raters"][: len(text)]
        expected = rows[raters].mean(dim=0)
        torch.testing.assert_close(rec.info[row]["scores"], expected, rtol=1e-4, atol=1e-6)
        top = torch.sort(expected, descending=True, stable=True).indices
        k = int(rec.info[row]["selected"].sum())
        assert set(rec.info[row]["selected"].nonzero()[:, 0].tolist()) == set(top[:k].tolist())


def test_runs_in_qwen2_5_vl_generate():
    model = tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa")
    inputs = qwen_vl_inputs([[(8, 8)], [(8, 12)]])  # 16 and 24 merged image tokens
    plain = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    with tr.apply(model, _schedule([(1, 0.5), (2, 0.5)])) as handle:
        with torch.no_grad():
            model(**inputs)
        records = list(handle.records)
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.shape[0] == 2
    assert [(r.tokens_before, r.tokens_after) for r in records] == [([16, 24], [8, 12]), ([8, 12], [4, 6])]
    assert torch.equal(model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False), plain)


def test_a_layer_outside_the_decoder_is_refused_at_patch_time(llava):
    model, _ = llava
    with pytest.raises(ConfigError, match=r"layer=9 is out of range; this decoder has layers 0..3"):
        tr.patch(model, _schedule([(9, 8)]))
