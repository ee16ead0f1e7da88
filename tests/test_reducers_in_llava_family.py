"""Every built-in reducer, at each stage it supports, through the LLaVA-1.5, LLaVA-NeXT and
LLaVA-OneVision adapters: forward + generate under SDPA, exact per-unit budgets, restore."""

from __future__ import annotations

import adapter_checks as checks
from models import one_thread  # noqa: F401 - fixture
import pytest
import test_adapter_llava as llava
import test_adapter_llava_next as llava_next
import test_adapter_onevision as onevision
import torch

import tokenreduce
from tokenreduce import MissingContextError, Step, create
from tokenreduce.budget import resolve_budget

CASES = {"llava": llava.CASE, "llava_next": llava_next.CASE, "llava_onevision": onevision.CASE}

# (reducer, stage, budget, params, layer): budgets small enough to reduce every unit.
STEPS = [
    ("random", "vision_encoder", 0.5, {}, None),
    ("pool", "projector", 6, {}, None),
    ("apet", "vision_encoder", 8, {"basis_tokens": 1}, None),  # NeXT: 2 of the 8 go to the base
    ("apet", "projector", 0.5, {"basis_tokens": 1}, None),
    ("apet", "llm_layer", 12, {}, 2),
    ("apet-llava", "projector", 12, {"basis_tokens": 2}, None),
    ("apet-qwen", "llm_layer", 0.5, {"basis_tokens": 2}, 1),
    ("tome", "projector", 0.5, {}, None),
    ("tome", "llm_layer", 7, {}, 2),
    ("divprune", "vision_encoder", 5, {}, None),
    ("cls_attn", "vision_encoder", 6, {}, None),
    ("visionzip", "projector", 8, {}, None),
    ("fastv", "llm_layer", 0.5, {}, 2),
    ("pdrop", "llm_layer", 0.5, {}, 1),
    ("dart", "llm_layer", 8, {}, 2),
    ("dart", "projector", 8, {"pivot_by": "token_norm", "pivot_text_tokens": 0}, None),
    ("cdpruner", "projector", 8, {}, None),
    ("cdpruner", "projector", 0.5, {"theta": 0.5}, None),
]
NEEDS_CLS = {"cls_attn", "visionzip"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request):
    case = CASES[request.param]
    model = case.build(0, "sdpa")
    kw = case.inputs(case.all_rows())
    return request.param, case, model, kw


@pytest.mark.parametrize(("name", "stage", "budget", "params", "layer"), STEPS, ids=[f"{s[0]}@{s[1]}" for s in STEPS])
def test_reducer_runs_with_exact_budgets(family, name, stage, budget, params, layer):
    fam, _case, model, kw = family
    stock = checks.logits(model, kw)
    step = Step(stage, create(name, budget, **params), layer=layer)
    if fam == "llava_onevision" and name in NEEDS_CLS:  # SigLIP has no [CLS]
        with pytest.raises(MissingContextError, match="cls_attention"):
            tokenreduce.patch(model, step)
        return
    with tokenreduce.apply(model, step) as handle:
        out = model(**kw).logits
        records = list(handle.records)
        gen = model.generate(**kw, max_new_tokens=2, do_sample=False)
    assert records and all(r.reducer == name and r.stage.value == stage for r in records)
    for rec in records:
        rounding = step.reducer.ratio_rounding  # each method rounds ratios as its official code does
        assert rec.tokens_after == [resolve_budget(budget, n, rounding=rounding) for n in rec.tokens_before]
        assert len(rec.indices) == len(rec.tokens_before) == len(rec.info)
    assert torch.isfinite(out).all() and out.shape[1] < stock.shape[1]
    assert gen.shape == (kw["input_ids"].shape[0], kw["input_ids"].shape[1] + 2)
    assert torch.equal(checks.logits(model, kw), stock)  # restored
