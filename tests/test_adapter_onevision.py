"""LLaVA-OneVision adapter on a tiny random LlavaOnevisionForConditionalGeneration (images and video)."""

from __future__ import annotations

import adapter_checks as checks
import pytest
import torch
from models import IMAGE_TOKEN, VIDEO_TOKEN, media_prompt, seeded_pixels, tiny_onevision, one_thread  # noqa: F401 - fixture
from transformers.models.llava_onevision.modeling_llava_onevision import (
    image_size_to_num_patches,
)

import tokenreduce
from tokenreduce import MissingContextError, Step, create
from tokenreduce_plugins.adapters import compat

# Row 0: one anyres image; row 1: a 3-frame video; row 2: two single-view images (multi-image prompt).
ROWS = [["image"], ["video"], ["image", "image"]]
SIZE = (20, 30)
FRAMES = 3
PINPOINTS = [[16, 32], [32, 16], [32, 32]]

pytestmark = pytest.mark.usefixtures("one_thread")


def lengths(aspect_ratio: str = "anyres_max_9") -> dict:
    """Stock placeholder counts: anyres image, single-view image, video."""
    model = tiny_onevision(0, aspect_ratio=aspect_ratio)
    n = image_size_to_num_patches(SIZE, PINPOINTS, 16)
    anyres = model.model.get_image_features(pixel_values=torch.zeros(1, n, 3, 16, 16), image_sizes=torch.tensor([SIZE]))
    video = video_features(model, torch.zeros(1, FRAMES, 3, 16, 16))
    return {"anyres": anyres.pooler_output[0].shape[0], "single": 17, "video": video.shape[1]}


def video_features(model, pixels):
    """``(V, L, D)``: each video's features as the LLM sequence gets them, newline included."""
    feats = compat.video_features(model.model, pixels).pooler_output
    if compat.forward_adds_video_newline(model.model):  # older releases append it in forward
        newline = model.model.image_newline[None, None].expand(feats.shape[0], 1, -1).to(feats.dtype)
        feats = torch.cat([feats, newline], dim=1)
    return feats


def make_inputs(aspect_ratio: str = "anyres_max_9"):
    counts = lengths(aspect_ratio)

    def inputs(rows: list[int]) -> dict:
        n_crops = image_size_to_num_patches(SIZE, PINPOINTS, 16)
        images, per_row, prompt, videos = [], [], [], []
        for r in rows:
            items = []
            n_img = ROWS[r].count("image")
            for i, kind in enumerate(ROWS[r]):
                if kind == "video":
                    videos.append(seeded_pixels((FRAMES, 3, 16, 16), r, i))
                    items.append((VIDEO_TOKEN, counts["video"]))
                else:
                    single = n_img > 1
                    pix = torch.zeros(n_crops, 3, 16, 16)
                    pix[: 1 if single else n_crops] = seeded_pixels((1 if single else n_crops, 3, 16, 16), r, i)
                    images.append(pix)
                    items.append((IMAGE_TOKEN, counts["single" if single else "anyres"]))
            if n_img:
                per_row.append(n_img)
            prompt.append(items)
        ids, mask = media_prompt(prompt, row_ids=rows)
        kw = {"input_ids": ids, "attention_mask": mask}
        if images:
            kw.update(
                pixel_values=torch.stack(images),
                image_sizes=torch.tensor([SIZE] * len(images)),
                batch_num_images=torch.tensor(per_row),
            )
        if videos:
            kw["pixel_values_videos"] = torch.stack(videos)
        return kw

    return inputs


def stock_features(model, kw):
    out = {}
    with torch.no_grad():
        if kw.get("pixel_values") is not None:
            img = model.model.get_image_features(
                pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"], batch_num_images=kw["batch_num_images"]
            )
            out["image"] = list(img.pooler_output)
        if kw.get("pixel_values_videos") is not None:
            out["video"] = list(video_features(model, kw["pixel_values_videos"]))
    return out


TOKENS = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}
CASE = checks.Case(build=tiny_onevision, inputs=make_inputs(), tokens=TOKENS, stock_features=stock_features, rows=3)


def full_pipeline(positions=None, video_budget="per_frame"):
    return checks.pipeline(
        Step("vision_encoder", create("pool", 0.75)),
        Step("projector", create("random", 0.5, seed=3)),
        Step("llm_layer", create("random", 0.5), layer=1),
        Step("llm_layer", create("random", 5, seed=4), layer=3),
        positions=positions,
        video_budget=video_budget,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_identity_pipeline_is_bit_identical(attn):
    checks.check_identity(CASE, attn)


def test_identity_with_downscaled_crop_grids():
    case = checks.Case(
        build=lambda seed, attn: tiny_onevision(seed, attn, aspect_ratio="anyres_max_1"),
        inputs=make_inputs("anyres_max_1"), tokens=TOKENS, stock_features=stock_features, rows=3,
    )
    checks.check_identity(case, "sdpa")


@pytest.mark.parametrize("video_budget", ["per_frame", "per_video"])
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_projector_selection_equals_stock_on_kept_features(positions, video_budget):
    pipe = checks.pipeline(Step("projector", create("random", 0.5, seed=5)), positions=positions, video_budget=video_budget)
    keep = checks.check_hand_built(CASE, pipe)
    video = keep["video"][0]
    assert video.numel() == 3 * 4 + 1 and bool(video[-1])  # 3 frames x 2x2 pooled + the newline, kept
    frames = video[:-1].view(3, 4).sum(1)
    if video_budget == "per_frame":
        assert frames.tolist() == [2, 2, 2]
    else:
        assert int(frames.sum()) == 6


def test_vision_encoder_selection_on_images_equals_stock():
    checks.check_hand_built(CASE, checks.pipeline(Step("vision_encoder", create("random", 7, seed=2))), atol=1e-5)


def test_video_records_per_frame_and_per_video():
    model = tiny_onevision(0)
    kw = CASE.inputs([1])
    for mode, before, after in (("per_frame", [4, 4, 4], [2, 2, 2]), ("per_video", [12], [6])):
        with tokenreduce.apply(model, checks.pipeline(Step("projector", create("pool", 0.5)), video_budget=mode)) as handle:
            model(**kw)
            (rec,) = handle.records
        assert (rec.tokens_before, rec.tokens_after) == (before, after)


@pytest.mark.parametrize("video_budget", ["per_frame", "per_video"])
def test_generate_with_cache_equals_recompute(video_budget):
    checks.check_generate_matches_recompute(CASE, full_pipeline(video_budget=video_budget))


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_batch_with_left_padding_equals_rows_alone(positions):
    checks.check_batch_matches_rows(CASE, full_pipeline(positions))


def test_remove_restores_the_model():
    checks.check_remove_restores(CASE, full_pipeline())


def test_cls_context_is_refused_at_patch_time():
    with pytest.raises(MissingContextError, match="cls_attention"):
        tokenreduce.patch(tiny_onevision(0), Step("projector", create("cls_attn", 4)))
