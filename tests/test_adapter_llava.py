"""LLaVA-1.5 adapter on a tiny random LlavaForConditionalGeneration (CLIP + Llama)."""

from __future__ import annotations

from typing import ClassVar

import adapter_checks as checks
import pytest
import torch
from models import IMAGE_TOKEN, llava_prompt, seeded_pixels, tiny_llava, one_thread  # noqa: F401 - fixture

import tokenreduce
from tokenreduce import (
    ConfigError,
    MissingContextError,
    ScoringReducer,
    Stage,
    StageError,
    Step,
    create,
)

IMAGES = [1, 2]  # images per row of the fixed batch

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(rows: list[int]) -> dict:
    ids, mask = llava_prompt([IMAGES[r] for r in rows], row_ids=rows)
    pixels = [seeded_pixels((3, 24, 24), r, i) for r in rows for i in range(IMAGES[r])]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(pixels)}


def stock_features(model, kw):
    with torch.no_grad():
        return {"image": list(model.model.get_image_features(pixel_values=kw["pixel_values"]).pooler_output)}


CASE = checks.Case(build=tiny_llava, inputs=inputs, tokens={"image": IMAGE_TOKEN}, stock_features=stock_features)


def full_pipeline(positions=None, llm="random"):
    return checks.pipeline(
        Step("vision_encoder", create("pool", 16)),
        Step("projector", create("random", 9, seed=3)),
        Step("llm_layer", create(llm, 0.5), layer=1),
        Step("llm_layer", create("random", 3, seed=4), layer=3),
        positions=positions,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_identity_pipeline_is_bit_identical(attn):
    checks.check_identity(CASE, attn)


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("stage", ["vision_encoder", "projector"])
def test_encoder_side_selection_equals_stock_on_kept_features(stage, positions):
    keep = checks.check_hand_built(CASE, checks.pipeline(Step(stage, create("random", 10, seed=5)), positions=positions))
    assert [int(k.sum()) for k in keep["image"]] == [10, 10, 10]


def test_merging_reducer_features_are_spliced_in():
    # pool at the projector: the LLM sees exactly the pooled projector features.
    model = tiny_llava(0)
    kw = inputs([0, 1])
    with tokenreduce.apply(model, Step("projector", create("pool", 4))) as handle:
        got = checks.logits(model, kw)
        rec = handle.records[0]
    feats = stock_features(model, kw)["image"]
    pooled = create("pool", 4)(torch.stack(feats)).tokens
    first = [int(k.nonzero()[0]) for k in handle.adapter.last_keep["image"]]
    assert first == [0, 0, 0] and rec.tokens_after == [4, 4, 4]

    ids, mask = checks.hand_built_ids(kw["input_ids"], kw["attention_mask"], CASE.tokens, handle.adapter.last_keep)
    expect = checks.with_features(model, {"input_ids": ids, "attention_mask": mask}, {"image": list(pooled)}, checks.media_inputs(kw)).logits
    torch.testing.assert_close(got[mask.bool()], expect[mask.bool()], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_generate_with_cache_equals_recompute(positions):
    checks.check_generate_matches_recompute(CASE, full_pipeline(positions))


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_batch_with_left_padding_equals_rows_alone(positions):
    checks.check_batch_matches_rows(CASE, full_pipeline(positions))


def test_remove_restores_the_model():
    checks.check_remove_restores(CASE, full_pipeline())


def test_records_per_image_and_per_sequence():
    model = tiny_llava(0)
    with tokenreduce.apply(model, full_pipeline()) as handle:
        model(**inputs([0, 1]))
        recs = handle.records
    assert [(r.stage, r.layer) for r in recs] == [
        (Stage.VISION_ENCODER, None), (Stage.PROJECTOR, None), (Stage.LLM_LAYER, 1), (Stage.LLM_LAYER, 3)
    ]
    assert recs[0].tokens_before == [36] * 3 and recs[0].tokens_after == [16] * 3
    assert recs[1].tokens_after == [9] * 3
    assert recs[2].tokens_before == [9, 18] and recs[2].tokens_after == [5, 9]  # per row: 1 and 2 images
    assert recs[3].tokens_after == [3, 3]
    for idx in recs[1].indices:  # kept indices into the image's 36 patches, ascending
        assert bool((idx.diff() > 0).all()) and int(idx.max()) < 36
    assert all(r.seconds >= 0 for r in recs)


def test_labels_shrink_with_the_inputs():
    model = tiny_llava(0)
    kw = inputs([0, 1])
    labels = kw["input_ids"].masked_fill(kw["input_ids"] == IMAGE_TOKEN, -100).masked_fill(kw["attention_mask"] == 0, -100)
    with tokenreduce.apply(model, Step("projector", create("random", 9))) as handle:
        out = model(**kw, labels=labels)
        keep = handle.adapter.last_keep
    ids, mask = checks.hand_built_ids(kw["input_ids"], kw["attention_mask"], CASE.tokens, keep)
    feats = [f[k] for f, k in zip(stock_features(model, kw)["image"], keep["image"])]

    hand_labels = ids.masked_fill(ids == IMAGE_TOKEN, -100).masked_fill(mask == 0, -100)
    ref = checks.with_features(
        model, {"input_ids": ids, "attention_mask": mask, "labels": hand_labels}, {"image": feats}, checks.media_inputs(kw)
    )
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    # With an llm_layer step the loss is taken over the kept positions.
    with tokenreduce.apply(model, Step("llm_layer", create("random", 4), layer=2)) as handle:
        out = model(**kw, labels=labels)
        kept = handle.adapter.decoder.last_kept
    lab = torch.gather(labels, 1, kept.clamp(min=0)).masked_fill(kept < 0, -100)
    expect = model.loss_function(logits=out.logits, labels=lab, vocab_size=model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss) and torch.equal(out.loss, expect)


class Probe(ScoringReducer):
    """Scores by CLS attention and remembers its context."""

    name = "probe"
    stages = frozenset(Stage)
    required_context = frozenset({"cls_attention", "cls_token", "keys"})
    seen: ClassVar[list] = []

    def score(self, tokens, valid, context):
        type(self).seen.append(context)
        return context.cls_attention.float()


def test_cls_context_equals_eager_attention_of_the_selected_layer():
    model = tiny_llava(0)
    kw = inputs([0, 1])
    probe = type("P", (Probe,), {"seen": []})
    with tokenreduce.apply(model, Step("vision_encoder", probe(12))):
        model(**kw)
    ctx = probe.seen[0]
    eager = tiny_llava(0, "eager").model.vision_tower
    out = eager(kw["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = model.config.vision_feature_layer % (len(out.attentions) + 1) - 1  # -2 -> block 1 of 3
    ref = out.attentions[layer].mean(dim=1)[:, 0, 1:]  # CLS row over the patches, head-averaged
    torch.testing.assert_close(ctx.cls_attention, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ctx.cls_token, out.hidden_states[model.config.vision_feature_layer][:, 0])
    assert ctx.keys.shape == (3, 36, 8) and ctx.grid == (6, 6)


def test_errors_at_patch_time():
    model = tiny_llava(0)
    with pytest.raises(StageError, match="does not support stage"):
        Step("llm_layer", type("V", (Probe,), {"stages": frozenset({Stage.PROJECTOR})})(4), layer=1)
    with pytest.raises(ConfigError, match="out of range"):
        tokenreduce.patch(model, Step("llm_layer", create("random", 4), layer=7))
    with pytest.raises(MissingContextError, match="cls_attention"):
        tokenreduce.patch(model, Step("llm_layer", Probe(4), layer=1))
    assert "forward" not in model.__dict__  # nothing left behind by a failed patch


def test_registry_finds_the_adapter():
    from tokenreduce_plugins.adapters.llava import LlavaAdapter

    assert tokenreduce.get_registry().adapter_for(tiny_llava(0)) is LlavaAdapter


def test_embedded_default_model_runs_a_three_stage_yaml_pipeline():
    from tokenreduce_plugins.adapters.tiny import build_tiny_llava

    model, kw = build_tiny_llava(seed=0)
    assert kw["input_ids"].shape == (1, 5 + 576 + 12) and kw["pixel_values"].shape == (1, 3, 336, 336)
    pipe = tokenreduce.loads_config(
        "pipeline:\n"
        "  - {stage: vision_encoder, reducer: pool, budget: 144}\n"
        "  - {stage: projector, reducer: apet, budget: 64}\n"
        "  - {stage: llm_layer, layer: 2, reducer: fastv, budget: 16}\n"
    )
    with tokenreduce.apply(model, pipe) as handle:
        out = model.generate(**kw, max_new_tokens=3, do_sample=False)
        table = [(r.stage.value, r.tokens_before, r.tokens_after) for r in handle.records]
    assert table == [("vision_encoder", [576], [144]), ("projector", [144], [64]), ("llm_layer", [64], [16])]
    assert out.shape == (1, kw["input_ids"].shape[1] + 3)
    again, _ = build_tiny_llava(seed=0)
    assert torch.equal(checks.logits(again, kw), checks.logits(model, kw))  # seeded


def test_llm_layer_with_inputs_embeds_finds_the_image_tokens():
    model = tiny_llava(0)
    kw = inputs([0, 1])
    embeds = model.get_input_embeddings()(kw["input_ids"])
    step = Step("llm_layer", create("random", 4), layer=2)
    with tokenreduce.apply(model, step) as handle:
        by_ids = checks.logits(model, kw)
        by_embeds = checks.logits(model, {"inputs_embeds": embeds, "attention_mask": kw["attention_mask"], "pixel_values": kw["pixel_values"]})
        assert handle.records[-1].tokens_after == [4, 4]
    torch.testing.assert_close(by_embeds, by_ids)
