"""CDPruner: the official-code fixture, conformance, DPP properties, errors, and runs inside tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce import MissingContextError, Pipeline, ReductionContext, Stage, Step, create
from tokenreduce.errors import InvalidInputError
from tokenreduce.testing import check_reducer
from tokenreduce_plugins.cdpruner import CDPruner, conditional_kernel, unit_rows

from models import IMAGE_TOKEN, two_image_batch, one_thread, qwen_vl_inputs, tiny_llava, tiny_qwen2_5_vl  # noqa: F401

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "cdpruner.npz"
EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "reducers" / "cdpruner.yaml"
PROPS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def _fixture() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE))


CASES = sorted({int(k.split("_")[0][4:]) for k in _fixture()})


def _case(k: int):
    data = _fixture()

    def get(key):
        return torch.from_numpy(np.asarray(data[f"case{k}_{key}"]))

    theta = float(data[f"case{k}_theta"])
    return get, int(data[f"case{k}_budget"]), None if math.isnan(theta) else theta


def text_context(tokens, valid, stage):
    # Instruction embeddings in the tokens' width, a deterministic function of the tokens
    # (rows stay paired with their context); the last row has one text token fewer.
    text = torch.tanh(tokens.float()[:, : min(3, tokens.shape[1])].flip(1) * 0.9) - 0.2
    mask = torch.ones(text.shape[:2], dtype=torch.bool, device=tokens.device)
    mask[-1, -1] = text.shape[1] == 1  # never an empty row
    return ReductionContext(text_embeds=text, text_mask=mask)


def _ctx(text: torch.Tensor, mask: torch.Tensor | None = None) -> ReductionContext:
    return ReductionContext(text_embeds=text, text_mask=mask)


# -- the official code's selection ---------------------------------------------------------------


@pytest.mark.parametrize("k", CASES)
def test_reproduces_official_greedy_map_selection(k):
    get, budget, theta = _case(k)
    out = CDPruner(budget, theta=theta)(get("tokens"), context=_ctx(get("text_embeds"), get("text_mask")))
    assert out.info["selection_order"].tolist() == get("selection_order").tolist()
    assert out.indices.tolist() == get("kept").tolist()
    kept = get("kept")[..., None].expand(-1, -1, out.tokens.shape[2])
    assert torch.equal(out.tokens, torch.gather(get("tokens"), 1, kept))  # features unchanged


@pytest.mark.parametrize("k", CASES)
def test_fixture_selection_depends_on_the_instruction(k):
    # The fixture would not catch a reducer that ignored the relevance term: without it
    # (theta=0) or with its sign flipped, the official picks are not reproduced.
    get, budget, theta = _case(k)
    ctx = _ctx(get("text_embeds"), get("text_mask"))
    official = get("selection_order").tolist()
    assert CDPruner(budget, theta=0.0)(get("tokens"), context=ctx).info["selection_order"].tolist() != official
    flipped = CDPruner(budget, theta=theta, negate_relevance=False)(get("tokens"), context=ctx)
    assert flipped.info["selection_order"].tolist() != official


# -- conformance ------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"theta": 0.5, "negate_relevance": False}])
def test_conformance(params):
    check_reducer(CDPruner, params=params, context_factory=text_context, max_examples=15)


# -- properties of the method -----------------------------------------------------------------------


def _tokens(seed: int, b: int, n: int, d: int, l: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.randn(b, l, d, generator=g)


@PROPS
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), t=st.integers(1, 9), theta=st.sampled_from([None, 0.3]))
def test_each_pick_maximises_the_determinant_of_the_selected_kernel(seed, n, t, theta):
    # Greedy MAP: step i adds the token j maximising det(L[S + j, S + j]) (checked in float64
    # on the kernel itself, with a relative tolerance for float32 near-ties).
    t = min(t, n - 1)  # t = n is the identity (no selection)
    x, text = _tokens(seed, 1, n, n + 3)
    out = CDPruner(t, theta=theta)(x, context=_ctx(text))
    kernel = conditional_kernel(unit_rows(x, torch.ones(1, n, dtype=torch.bool)), out.info["relevance"])[0].double()
    chosen: list[int] = []
    for pick in out.info["selection_order"][0].tolist():
        dets = {j: float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]])) for j in range(n) if j not in chosen}
        assert dets[pick] >= max(dets.values()) * (1 - 1e-4) - 1e-12
        chosen.append(pick)


@PROPS
@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), negate=st.booleans())
def test_first_pick_is_the_most_relevant_token(seed, n, negate):
    # The kernel's diagonal is r_i^2 (unit cosine self-similarity), so the first pick is the
    # token least (negate) or most similar, on average, to the instruction.
    x, text = _tokens(seed, 1, n, 6)
    out = CDPruner(1, negate_relevance=negate)(x, context=_ctx(text))
    mean_cos = (torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).mT).mean(-1)
    expected = mean_cos.argmin(dim=1) if negate else mean_cos.argmax(dim=1)
    assert out.indices[:, 0].tolist() == expected.tolist()
    rel = out.info["relevance"][0]
    assert float(rel.max()) == pytest.approx(1.0, abs=1e-4) and float(rel.min()) == pytest.approx(0.0, abs=1e-4)


@PROPS
@given(seed=st.integers(0, 10_000), n=st.integers(3, 30), t=st.integers(1, 12), scale=st.floats(0.01, 100.0))
def test_selection_is_invariant_to_scale_and_to_text_order_and_padding(seed, n, t, scale):
    # Cosine similarities only: scaling tokens or text changes nothing; relevance is a
    # mean over the valid text tokens, so their order and masked-out rows change nothing.
    x, text = _tokens(seed, 2, n, 12, l=4)
    ref = CDPruner(t)(x, context=_ctx(text)).indices
    assert torch.equal(CDPruner(t)(x * scale, context=_ctx(text / scale)).indices, ref)
    assert torch.equal(CDPruner(t)(x, context=_ctx(text.flip(1))).indices, ref)
    padded = torch.cat([text, torch.randn(2, 2, 12)], dim=1)
    mask = torch.arange(6)[None].expand(2, 6) < 4
    assert torch.equal(CDPruner(t)(x, context=_ctx(padded, mask)).indices, ref)


@PROPS
@given(seed=st.integers(0, 10_000), n=st.integers(3, 24), t=st.integers(1, 10))
def test_theta_zero_ignores_the_instruction(seed, n, t):
    t = min(t, n - 1)
    x, text = _tokens(seed, 1, n, 8)
    _, other = _tokens(seed + 1, 1, n, 8)
    a = CDPruner(t, theta=0.0)(x, context=_ctx(text))
    assert torch.equal(a.info["relevance"], torch.ones(1, n))
    assert torch.equal(a.indices, CDPruner(t, theta=0.0)(x, context=_ctx(other)).indices)


@PROPS
@given(seed=st.integers(0, 10_000), n=st.integers(3, 20), t=st.integers(2, 19), theta=st.sampled_from([0.0, 0.5]))
def test_an_exact_duplicate_is_never_kept_with_its_twin(seed, n, t, theta):
    # Once one of two identical tokens is picked, the other's conditional variance is ~0:
    # with D > N the other tokens are in general position, so it is never the best next pick
    # while a distinct token is left. (theta keeps every weight >= 1; with the official
    # weights the least relevant token weighs ~1e-6, as little as float32 rounding.)
    t = min(t, n - 1)
    x, text = _tokens(seed, 1, n, n + 4)
    x[0, -1] = x[0, 0]
    kept = set(CDPruner(t, theta=theta)(x, context=_ctx(text)).indices[0].tolist())
    assert not {0, n - 1} <= kept


def test_degenerate_kernel_keeps_distinct_tokens_in_position_order():
    # All tokens identical: constant relevance (1), kernel of ones, rank 1. The first pick is
    # token 0; every later conditional variance is 0 (the official code would take sqrt(0)
    # and divide by it), so the picks go to the lowest unpicked index.
    x = torch.ones(2, 7, 5)
    out = CDPruner(4)(x, context=_ctx(torch.randn(2, 2, 5)))
    assert out.info["selection_order"].tolist() == [[0, 1, 2, 3]] * 2
    assert torch.equal(out.info["relevance"], torch.ones(2, 7))


def test_padding_is_never_picked_and_does_not_change_the_valid_rows_choice():
    x, text = _tokens(3, 1, 12, 16)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, 8:] = False
    padded = CDPruner(5)(x, mask=mask, context=_ctx(text))
    alone = CDPruner(5)(x[:, :8], context=_ctx(text))
    assert padded.indices.tolist() == alone.indices.tolist()
    assert padded.info["selection_order"].tolist() == alone.info["selection_order"].tolist()


def test_hot_path_never_reads_the_device():
    # On the meta device any host read (.item(), bool(), .tolist(), nonzero) raises: with the
    # count known on the host (uniform_count, as Reducer.__call__ sets it without a mask),
    # the relevance, the kernel, the T greedy steps and the output run without a sync.
    b, n, d, l, t = 2, 30, 8, 4, 6
    x, text = torch.empty(b, n, d, device="meta"), torch.empty(b, l, d, device="meta")
    valid = torch.ones(b, n, dtype=torch.bool, device="meta")
    text_mask = torch.ones(b, l, dtype=torch.bool, device="meta")
    ctx = ReductionContext(text_embeds=text, text_mask=text_mask, uniform_count=t)
    out = CDPruner(t, theta=0.5).reduce(x, torch.full((b,), t, device="meta"), valid, ctx)
    assert out.indices.shape == (b, t) and out.tokens.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_power_of_two_scaling_to_near_the_dtype_range_changes_nothing_but_the_scale(dtype):
    # Cosines only: tokens (and text) scaled by 2^123, exact in float32 and bfloat16, whose
    # float32 squared norms would overflow, keep the same picks; features scale exactly.
    x, text = _tokens(7, 2, 36, 8)
    x, text = x.to(dtype), text.to(dtype)
    x[0] = x[0].abs()
    x[1, 5] = x[1, 0]
    k = 2.0**123
    out, big = CDPruner(9)(x, context=_ctx(text)), CDPruner(9)(x * k, context=_ctx(text * k))
    assert torch.equal(big.info["selection_order"], out.info["selection_order"])
    assert torch.equal(big.tokens, out.tokens * k) and bool(torch.isfinite(big.tokens.float()).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype_and_the_float32_choice(dtype):
    x, text = _tokens(5, 2, 50, 32)
    x = x.to(dtype)
    out = CDPruner(10)(x, context=_ctx(text.to(dtype)))
    ref = CDPruner(10)(x.float(), context=_ctx(text.to(dtype).float()))
    assert out.tokens.dtype == dtype and torch.equal(out.indices, ref.indices)


# -- errors, stages, registration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"theta": 1.0}, "theta: Input should be less than 1"),
        ({"theta": -0.1}, "theta: Input should be greater than or equal to 0"),
        ({"negate_relevance": "sometimes"}, "negate_relevance: Input should be a valid boolean"),
        ({"alpha": 0.5}, "alpha: Extra inputs are not permitted"),
    ],
)
def test_bad_parameters_name_field_and_range(params, match):
    with pytest.raises(tr.ConfigError, match=match):
        create("cdpruner", budget=8, **params)


def test_missing_and_malformed_context_errors():
    x = torch.randn(2, 10, 6)
    with pytest.raises(MissingContextError, match="needs context text_embeds;"):
        CDPruner(4)(x)
    shape = r"text_embeds must have shape \(B, L, D\)=\(2, L, 6\).*got \(2, 3, 5\)"
    with pytest.raises(InvalidInputError, match=shape):
        CDPruner(4)(x, context=_ctx(torch.randn(2, 3, 5)))
    with pytest.raises(InvalidInputError, match=r"text_mask must have shape \(B, L\)=\(2, 3\), got \(2, 4\)"):
        CDPruner(4)(x, context=_ctx(torch.randn(2, 3, 6), torch.ones(2, 4, dtype=torch.bool)))


@pytest.mark.parametrize("stage", ["vision_encoder", "llm_layer"])
def test_other_stages_are_refused_with_the_supported_one_named(stage):
    with pytest.raises(tr.StageError, match=f"does not support stage '{stage}'; it supports: projector"):
        create("cdpruner", budget=8, stage=stage)
    with pytest.raises(tr.ConfigError, match="does not support stage"):
        tr.loads_config(f"pipeline:\n  - {{stage: {stage}, reducer: cdpruner, budget: 8}}\n")


def test_registered_with_paper_and_published_yaml_example():
    cls = tr.get_registry().reducer_class("cdpruner")
    assert cls is CDPruner and set(cls.stages) == {Stage.PROJECTOR}
    assert "arXiv:2506.10967" in cls.paper and "github.com/Theia-4869/CDPruner" in cls.paper
    pipe = tr.load_config(EXAMPLE)
    assert [(s.stage, s.layer, s.reducer.budget) for s in pipe] == [(Stage.PROJECTOR, None, 64)]
    assert pipe.steps[0].reducer == CDPruner(64, stage="projector")


# -- inside tiny models, through the adapters -----------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_runs_in_llava_generate_on_the_instruction_embeddings():
    model = tiny_llava(seed=0, attn_implementation="sdpa")
    inputs = two_image_batch()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    seen = []

    def record(reducer, tokens, valid, context, reduction):
        seen.append((tokens.clone(), context, reduction))

    with tr.apply(model, Pipeline([Step("projector", create("cdpruner", 8))])) as handle:
        with tr.observe(record):
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        records = list(handle.records)
    assert out.shape == (2, ids.shape[1] + 3)
    assert [(r.reducer, r.tokens_before, r.tokens_after) for r in records] == [("cdpruner", [36, 36], [8, 8])]
    tokens, context, reduction = seen[0]
    # The context's text is the LLM input embeddings of each prompt's text after its image.
    embed = model.get_input_embeddings()
    for row in range(2):
        real = ids[row][mask[row].bool()]
        after = real[(real == IMAGE_TOKEN).nonzero()[-1, 0] + 1 :]
        got = context.text_embeds[row][context.text_mask[row]]
        torch.testing.assert_close(got, embed(after))
    # The adapter's choice is the reducer's on those tokens and that text.
    again = CDPruner(8)(tokens, context=_ctx(context.text_embeds, context.text_mask))
    assert torch.equal(again.indices, reduction.indices)
    assert [i.tolist() for i in records[0].indices] == reduction.indices.tolist()
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), plain)


@pytest.mark.usefixtures("one_thread")
def test_runs_in_qwen2_5_vl_generate():
    model = tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa")
    inputs = qwen_vl_inputs([[(8, 8)], [(8, 12)]])
    plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with tr.apply(model, Pipeline([Step("projector", create("cdpruner", 6))])) as handle:
        with torch.no_grad():
            model(**inputs)
        records = list(handle.records)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    assert [(r.reducer, r.tokens_before, r.tokens_after) for r in records] == [("cdpruner", [16, 24], [6, 6])]
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), plain)
