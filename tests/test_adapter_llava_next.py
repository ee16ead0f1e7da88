"""LLaVA-NeXT adapter on a tiny random LlavaNextForConditionalGeneration (anyres CLIP crops)."""

from __future__ import annotations

import adapter_checks as checks
import pytest
import torch
from models import IMAGE_TOKEN, media_prompt, seeded_pixels, tiny_llava_next, one_thread  # noqa: F401 - fixture
from tokenreduce_plugins.adapters.anyres import split_budget
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import tokenreduce
from tokenreduce import Step, create

# (height, width) of each image per row: row 0 one image (2x2 crops), row 1 two images.
SIZES = [[(20, 30)], [(30, 20), (16, 16)]]
_LENGTHS: dict = {}

pytestmark = pytest.mark.usefixtures("one_thread")


def placeholder_count(size) -> int:
    """Stock number of placeholder tokens of an image of this size (base + crops + newlines)."""
    if size not in _LENGTHS:
        model = tiny_llava_next(0)
        n = image_size_to_num_patches(size, model.config.image_grid_pinpoints, 16)
        feats = model.model.get_image_features(pixel_values=torch.zeros(1, n, 3, 16, 16), image_sizes=torch.tensor([size]))
        _LENGTHS[size] = feats.pooler_output[0].shape[0]
    return _LENGTHS[size]


def inputs(rows: list[int]) -> dict:
    sizes = [s for r in rows for s in SIZES[r]]
    counts = [image_size_to_num_patches(s, [[16, 32], [32, 16], [32, 32]], 16) for s in sizes]
    pixels = torch.zeros(len(sizes), max(counts), 3, 16, 16)
    k = 0
    for r in rows:
        for i in range(len(SIZES[r])):
            pixels[k, : counts[k]] = seeded_pixels((counts[k], 3, 16, 16), r, i)
            k += 1
    ids, mask = media_prompt([[(IMAGE_TOKEN, placeholder_count(s)) for s in SIZES[r]] for r in rows], row_ids=rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": torch.tensor(sizes)}


def stock_features(model, kw):
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"])
    return {"image": list(out.pooler_output)}


CASE = checks.Case(build=tiny_llava_next, inputs=inputs, tokens={"image": IMAGE_TOKEN}, stock_features=stock_features)


def full_pipeline(positions=None):
    return checks.pipeline(
        Step("vision_encoder", create("pool", 0.5)),
        Step("projector", create("random", 12, seed=3)),
        Step("llm_layer", create("random", 0.5), layer=1),
        Step("llm_layer", create("random", 6, seed=4), layer=3),
        positions=positions,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_identity_pipeline_is_bit_identical(attn):
    checks.check_identity(CASE, attn)


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("stage", ["vision_encoder", "projector"])
def test_encoder_side_selection_equals_stock_on_kept_features(stage, positions):
    keep = checks.check_hand_built(CASE, checks.pipeline(Step(stage, create("random", 10, seed=5)), positions=positions))
    for k, size in zip(keep["image"], [s for row in SIZES for s in row]):
        assert k.numel() == placeholder_count(size)


def test_budget_split_and_newlines():
    model = tiny_llava_next(0)
    kw = inputs([0, 1])
    with tokenreduce.apply(model, Step("projector", create("random", 12, seed=1))) as handle:
        model(**kw)
        rec = handle.records[0]
        keep = handle.adapter.last_keep["image"]
    assert rec.tokens_before == [64, 64, 32] and rec.tokens_after == [12, 12, 12]
    assert set(rec.info[0]) == {"base", "crops"}
    # 16 base tokens of 64 -> 3 of 12 kept in the base, 9 in the crop grid.
    assert split_budget(12, 16, 48) == (3, 9)
    assert int((rec.indices[0] < 16).sum()) == 3
    stock = stock_features(model, kw)["image"]
    newline = model.model.image_newline
    for k, f, idx in zip(keep, stock, rec.indices):
        is_newline = (f == newline).all(dim=-1)
        content = (~is_newline).nonzero()[:, 0]
        kept_content = k & ~is_newline
        assert torch.equal(kept_content.nonzero()[:, 0], content[idx])
        # A newline survives iff the crop row before it keeps a token.
        lines = is_newline.nonzero()[:, 0].tolist()
        starts = [16] + [p + 1 for p in lines[:-1]]
        for a, b in zip(starts, lines):
            assert bool(k[b]) == bool(k[a:b].any())


def test_split_budget_rules():
    assert split_budget(10, 16, 0) == (10, 0)
    assert split_budget(2, 16, 48) == (1, 1)  # each part keeps at least one token
    assert split_budget(1, 16, 48) == (1, 0)
    assert split_budget(60, 16, 48) == (15, 45)
    assert split_budget(63, 16, 48) == (16, 47)
    for t in range(1, 64):
        b, c = split_budget(t, 16, 48)
        assert b + c == t and 0 < b <= 16 and 0 <= c <= 48


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_generate_with_cache_equals_recompute(positions):
    checks.check_generate_matches_recompute(CASE, full_pipeline(positions))


def test_batch_with_left_padding_equals_rows_alone():
    checks.check_batch_matches_rows(CASE, full_pipeline())


def test_remove_restores_the_model():
    checks.check_remove_restores(CASE, full_pipeline())
