"""Every baseline through the LLaVA adapter in ``generate()`` with the model on SDPA.

The attention-based methods never read an attention map from the model: their picks are
checked against the eager attention of an identically seeded twin.
"""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr
from tokenreduce import Pipeline, Step, create

from models import IMAGE_TOKEN, two_image_batch, tiny_llava

NEW_TOKENS = 4
PATCHES = 36  # tiny LLaVA: 6 x 6 patches per image


@pytest.fixture(scope="module")
def llava():
    model = tiny_llava(seed=0, attn_implementation="sdpa")
    return model, two_image_batch()


@pytest.fixture(scope="module")
def eager_twin():
    return tiny_llava(seed=0, attn_implementation="eager")


def generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


# The published settings, scaled to the tiny model (4 decoder layers, 36 patches per image).
PIPELINES = {
    "fastv": [Step("llm_layer", create("fastv", 0.5), layer=2)],
    "pdrop": [Step("llm_layer", create("pdrop", 0.5), layer=k) for k in (1, 2, 3)],
    "cls_attn": [Step("projector", create("cls_attn", 4))],
    "visionzip": [Step("vision_encoder", create("visionzip", 8))],
    "tome": [Step("projector", create("tome", 4))],
    "dart": [Step("llm_layer", create("dart", 8, pivot_by="token_norm"), layer=2)],
    "divprune": [Step("projector", create("divprune", 0.098))],
}
EXPECTED_COUNTS = {  # per step: tokens before -> after, both rows
    "fastv": [(36, 18)],
    "pdrop": [(36, 18), (18, 9), (9, 4)],  # floors as the official int(N * ratio): 4.5 -> 4
    "cls_attn": [(36, 4)],
    "visionzip": [(36, 8)],
    "tome": [(36, 4)],
    "dart": [(36, 8)],
    "divprune": [(36, 4)],
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_baseline_runs_in_generate_under_sdpa(llava, name):
    model, inputs = llava
    assert model.config._attn_implementation == "sdpa"
    plain = generate(model, inputs)
    with tr.apply(model, Pipeline(PIPELINES[name])) as handle:
        out = generate(model, inputs)
        records = list(handle.records)
        again = generate(model, inputs)
    assert out.shape == (2, inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert torch.equal(out, again), "generation with the reducer is not deterministic"
    assert [(r.reducer, r.tokens_before, r.tokens_after) for r in records] == [
        (name, [before] * 2, [after] * 2) for before, after in EXPECTED_COUNTS[name]
    ]
    for rec in records:
        for idx in rec.indices:
            assert bool((idx[1:] > idx[:-1]).all()) and int(idx.max()) < rec.tokens_before[0]
    assert torch.equal(generate(model, inputs), plain), "the model is not restored after the pipeline"


def _eager_decoder_attention(twin, inputs, layer: int) -> torch.Tensor:
    """Head-averaged attention of the last token to each image token in decoder ``layer`` (B, 36)."""
    with torch.no_grad():
        out = twin(**inputs, output_attentions=True)
    att = out.attentions[layer][:, :, -1, :].mean(dim=1)
    img = inputs["input_ids"] == IMAGE_TOKEN
    return att[img].view(img.shape[0], PATCHES)


@pytest.mark.parametrize(("name", "layer", "att_layer"), [("fastv", 2, 1), ("pdrop", 1, 1)])
def test_decoder_attention_methods_pick_the_eager_top_tokens(llava, eager_twin, name, layer, att_layer):
    # FastV at K=2 ranks by layer K-1's map; PyramidDrop at K=1 by layer K's own map.
    model, inputs = llava
    with tr.apply(model, Pipeline([Step("llm_layer", create(name, 0.5), layer=layer)])) as handle:
        generate(model, inputs)
        kept = [set(i.tolist()) for i in handle.records[0].indices]
    ref = _eager_decoder_attention(eager_twin, inputs, att_layer)
    for row in range(2):
        assert kept[row] == set(torch.topk(ref[row], 18).indices.tolist())


def _eager_cls_attention(twin, pixels) -> torch.Tensor:
    """Head-averaged [CLS] -> patch attention of the selected vision layer (-2)."""
    with torch.no_grad():
        out = twin.model.vision_tower(pixels, output_attentions=True)
    return out.attentions[-2][:, :, 0, 1:].mean(dim=1)


@pytest.mark.parametrize(("name", "budget", "dominant"), [("cls_attn", 6, 6), ("visionzip", 8, 7)])
def test_cls_methods_pick_the_eager_cls_attention_top_tokens(llava, eager_twin, name, budget, dominant):
    model, inputs = llava
    with tr.apply(model, Pipeline([Step("vision_encoder", create(name, budget))])) as handle:
        generate(model, inputs)
        rec = handle.records[0]
    ref = _eager_cls_attention(eager_twin, inputs["pixel_values"])
    for row in range(2):
        top = set(torch.topk(ref[row], dominant).indices.tolist())
        if name == "visionzip":
            picked = rec.info[row]["dominant"].nonzero()[:, 0].tolist()
        else:
            picked = rec.indices[row].tolist()
        assert set(picked) == top


def test_dart_published_key_norm_pivots_run_on_decoder_keys(llava):
    # The decoder supplies layer K-1's post-RoPE keys of the image and text tokens, so the
    # published default (pivots by key norm) runs inside generate() under SDPA.
    model, inputs = llava
    with tr.apply(model, Pipeline([Step("llm_layer", create("dart", 8), layer=2)])) as handle:
        out = generate(model, inputs)
        rec = handle.records[0]
    assert out.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    assert (rec.reducer, rec.tokens_before, rec.tokens_after) == ("dart", [36, 36], [8, 8])
    with tr.apply(model, Pipeline([Step("llm_layer", create("dart", 8, pivot_by="token_norm"), layer=2)])) as handle:
        generate(model, inputs)
        other = handle.records[0]
    # Different pivot rules see different signals: the kept sets are not forced equal, but
    # both keep exactly the budget of valid image positions.
    assert all(len(set(i.tolist())) == 8 for i in rec.indices + other.indices)
