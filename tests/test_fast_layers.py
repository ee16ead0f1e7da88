"""llm_layer steps on the fast path (fast_layers): the decoder split at each step's layer, inside the
captured prefill and decoding steps. On CPU nothing is captured, but every call the graphs hold runs:
the split prefill on the static cache, the per-group masks and positions of the decoding steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import llava_prompt, qwen_vl_inputs, seeded_pixels, tiny_llava, tiny_qwen2_5_vl

import tokenreduce
from tokenreduce import Pipeline, Stage, Step, create
from tokenreduce_plugins.adapters.fast_layers import TEXT_STEP, LayerSplit, Plan

LLM_REDUCERS = sorted(
    name for name, entry in tokenreduce.get_registry().reducers.items()
    if Stage.LLM_LAYER in entry.cls.stages and getattr(entry.cls, "acts_at", "prefill") != "decode"
)


def llava_inputs(images=(1, 1)):
    """Rows of different lengths (left padding), each with the same number of images."""
    ids, mask = llava_prompt(list(images), row_ids=list(range(len(images))))
    pixels = [seeded_pixels((3, 24, 24), r, i) for r, k in enumerate(images) for i in range(k)]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(pixels)}


def both_paths(model, kw, steps, new=5, positions=None):
    """``{fast: (tokens, kept indices, warnings)}`` of two generate() calls each (the second replays)."""
    out = {}
    for fast in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad(), tokenreduce.apply(model, Pipeline(steps, fast=fast, positions=positions)) as handle:
                first = model.generate(**kw, max_new_tokens=new, do_sample=False)
                tokens = model.generate(**kw, max_new_tokens=new, do_sample=False)
                assert torch.equal(first, tokens)
                out[fast] = (tokens, [i for r in handle.records for i in r.indices], [str(w.message) for w in caught])
    return out


def assert_same(runs):
    assert not [w for w in runs[True][2] if "tokenreduce fast path" in w], runs[True][2]  # the fast path ran
    assert torch.equal(runs[False][0], runs[True][0])
    assert len(runs[False][1]) == len(runs[True][1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1]))


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(0)


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl(0)


def params(name):
    return {"basis_tokens": 1} if name.startswith("apet") else {}


@pytest.mark.parametrize("name", LLM_REDUCERS)
def test_every_llm_layer_reducer_keeps_indices_and_greedy_tokens_on_llava(llava, name):
    runs = both_paths(llava, llava_inputs(), [Step("llm_layer", create(name, budget=0.5, **params(name)), layer=1)])
    assert_same(runs)


@pytest.mark.parametrize("name", ["fastv", "sparsevlm", "dart", "random"])
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_qwen_split_keeps_indices_and_greedy_tokens_with_mrope_positions(qwen, name, positions):
    kw = qwen_vl_inputs([[(8, 8)], [(8, 8)]])
    assert_same(both_paths(qwen, kw, [Step("llm_layer", create(name, budget=0.5), layer=1)], positions=positions))


def test_several_steps_and_an_encoder_side_step_before_them(llava):
    steps = [
        Step("projector", create("random", budget=0.75, seed=1)),
        Step("llm_layer", create("fastv", budget=0.5), layer=1),
        Step("llm_layer", create("pdrop", budget=0.5), layer=2),
        Step("llm_layer", create("random", budget=3, seed=4), layer=3),
    ]
    assert_same(both_paths(llava, llava_inputs((2, 2)), steps, new=8))


def test_a_step_at_the_first_layer_and_many_decoded_tokens(llava):
    assert_same(both_paths(llava, llava_inputs(), [Step("llm_layer", create("random", budget=5, seed=2), layer=0)], new=20))


def test_rows_with_different_image_counts_run_eagerly_with_a_warning(llava):
    kw = llava_inputs((1, 2))
    runs = both_paths(llava, kw, [Step("llm_layer", create("fastv", budget=0.5), layer=1)])
    assert any("different numbers of image tokens ([36, 72])" in w for w in runs[True][2])
    assert torch.equal(runs[False][0], runs[True][0])


def test_records_say_the_step_is_not_timed_on_its_own(llava):
    with torch.no_grad(), tokenreduce.apply(llava, Pipeline([Step("llm_layer", create("fastv", budget=0.5), layer=1)], fast=True)) as h:
        llava.generate(**llava_inputs(), max_new_tokens=2, do_sample=False)
        (record,) = h.records
        assert record.tokens_before == [36, 36] and record.tokens_after == [18, 18]
        assert record.seconds != record.seconds  # nan
        (entry,) = h.adapter.fast.entries.values()
        assert entry.plan == Plan(36, (18,), TEXT_STEP, (6, 6))


@settings(max_examples=30, deadline=None)
@given(
    counts=st.integers(0, 50),
    budgets=st.lists(st.one_of(st.integers(1, 60), st.floats(0.05, 1.0)), min_size=1, max_size=3),
    text=st.lists(st.integers(0, 40), min_size=1, max_size=3),
)
def test_plan_counts_follow_the_budgets_and_bound_the_instruction(llava, counts, budgets, text):
    steps = [Step("llm_layer", create("random", budget=b), layer=i) for i, b in enumerate(budgets)]
    split = LayerSplit(llava.model.language_model, steps, "compact", lambda r: None)
    rows = len(text)
    length = counts + max(text) + 3
    media = torch.zeros(rows, length, dtype=torch.bool)
    valid = torch.zeros(rows, length, dtype=torch.bool)
    for r, t in enumerate(text):  # left padding, 2 text tokens, the image, the row's instruction
        start = length - (2 + counts + t)
        valid[r, start:] = True
        media[r, start + 2 : start + 2 + counts] = True
    plan = split.plan(media, valid)
    assert plan.images == counts and len(plan.kept) == len(budgets)
    left = counts
    for b, kept in zip(budgets, plan.kept):
        left = tokenreduce.resolve_budget(b, left) if left else 0
        assert kept == left and (kept <= counts)
    assert plan.text % TEXT_STEP == 0 and plan.text >= (max(text) if counts else 0)
    assert plan.removed(-1) == 0 and all(plan.removed(j) == counts - plan.kept[j] for j in range(len(budgets)))
    media[0, :] = False
    if counts and rows > 1:
        assert "different numbers of image tokens" in split.plan(media, valid)


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(["random", "divprune", "tome", "pool", "apet"]), seed=st.integers(0, 99), n=st.sampled_from([16, 36]))
def test_call_unchecked_returns_what_the_checked_call_returns(name, seed, n):
    """The split prefill calls reducers unchecked while its graph is captured (checked just before)."""
    reducer = create(name, budget=0.5, **params(name))
    tokens = torch.randn(2, n, 8, generator=torch.Generator().manual_seed(seed))
    context = tokenreduce.ReductionContext(stage=Stage.LLM_LAYER, grid=(4, n // 4))
    a, b = reducer(tokens, context=context), reducer.call_unchecked(tokens, context)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)


def test_graphs_kept_across_pipelines_do_not_keep_another_pipelines_steps(llava):
    from tokenreduce_plugins.adapters.fast_prefill import keep_graphs

    kw = llava_inputs()
    fastv = [Step("llm_layer", create("fastv", budget=0.5), layer=1)]
    identity = [Step("projector", create("pool", 1.0))]
    with keep_graphs(llava), torch.no_grad():
        with tokenreduce.apply(llava, Pipeline(fastv, fast=True)) as handle:
            llava.generate(**kw, max_new_tokens=2, do_sample=False)
            assert handle.adapter.fast.split is not None
        with tokenreduce.apply(llava, Pipeline(identity, fast=True)) as handle:
            fast = llava.generate(**kw, max_new_tokens=2, do_sample=False)
            assert handle.adapter.fast.split is None
    with torch.no_grad():
        assert torch.equal(fast, llava.generate(**kw, max_new_tokens=2, do_sample=False))
