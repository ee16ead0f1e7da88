"""Every baseline through the Qwen2.5-VL adapter in ``generate()`` with the model on SDPA.

Qwen2.5-VL has no [CLS] token: the CLS-based methods are refused when the pipeline is
patched, with a clear error, instead of failing mid-forward.
"""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr
from tokenreduce import MissingContextError, Pipeline, Step, create

from models import qwen_vl_inputs, tiny_qwen2_5_vl

IMAGES = [[(8, 8)], [(8, 12)]]  # two rows, images of 16 and 24 merged tokens
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def qwen():
    model = tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa")
    return model, qwen_vl_inputs(IMAGES)


def generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


PIPELINES = {
    "fastv": ([Step("llm_layer", create("fastv", 0.5), layer=1)], None),
    "pdrop": ([Step("llm_layer", create("pdrop", 0.5), layer=k) for k in (1, 2)], None),
    "dart": ([Step("llm_layer", create("dart", 0.5), layer=1)], None),
    "tome": ([Step("projector", create("tome", 6))], [6, 6]),
    "divprune": ([Step("projector", create("divprune", 6))], [6, 6]),
    "apet-qwen": ([Step("projector", create("apet-qwen", 8, basis_tokens=2))], [8, 8]),
    "cdpruner": ([Step("projector", create("cdpruner", 6))], [6, 6]),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_baseline_runs_in_qwen_generate_under_sdpa(qwen, name):
    model, inputs = qwen
    assert model.config._attn_implementation == "sdpa"
    plain = generate(model, inputs)
    steps, expected_after = PIPELINES[name]
    with tr.apply(model, Pipeline(steps)) as handle:
        with torch.no_grad():
            model(**inputs)  # one prefill, to read its records
        records = list(handle.records)
        out = generate(model, inputs)
        again = generate(model, inputs)
    assert out.shape[0] == 2 and out.shape[1] >= NEW_TOKENS
    assert torch.equal(out, again), "generation with the reducer is not deterministic"
    assert records and all(r.reducer == name for r in records)
    assert all(sum(r.tokens_after) < sum(r.tokens_before) for r in records), "a step reduced nothing"
    if expected_after is not None:
        assert records[0].tokens_after == expected_after
    assert torch.equal(generate(model, inputs), plain), "the model is not restored after the pipeline"


@pytest.mark.parametrize("name", ["cls_attn", "visionzip"])
def test_cls_methods_are_refused_at_patch_time_on_qwen(qwen, name):
    model, _ = qwen
    with pytest.raises(MissingContextError, match="cls"):
        tr.patch(model, Pipeline([Step("projector", create(name, 8))]))
