"""``tokenreduce show`` and :mod:`tokenreduce.visualize`: tokens from an image, tracing what a
pipeline did to every patch, the picture, and the real-checkpoint loading path (a tiny LLaVA
saved to disk, so it runs offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import tokenreduce as tr
from tokenreduce.cli import app
from tokenreduce.reducer import make_reduction
from tokenreduce.runner import pipeline_from_arg
from tokenreduce.visualize import (
    SIDE,
    figure,
    kept_picture,
    model_features,
    stand_in_features,
    token_to_slot,
    trace_pipeline,
)

ROOT = Path(__file__).resolve().parent.parent


def scene(size: int = 336) -> Image.Image:
    """A gradient background with a red disc (top right) and a blue square (bottom left)."""
    y, x = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = 40 + x * 100 // size
    img[..., 1] = 90
    img[..., 2] = 160 - y * 100 // size
    img[(y - size // 3) ** 2 + (x - 2 * size // 3) ** 2 < (size // 5) ** 2] = (220, 40, 30)
    img[size * 6 // 10 : size * 9 // 10, size // 8 : size * 4 // 10] = (30, 60, 230)
    return Image.fromarray(img)


@pytest.fixture(scope="module")
def features():
    return stand_in_features(scene())


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "scene.png"
    scene(300).save(path)
    return path


def one_step(name: str, budget: int = 64, stage: str | None = None) -> tr.Pipeline:
    return pipeline_from_arg(name, budget, stage, None)


def test_stand_in_tokens_are_seeded_and_follow_the_pixels(features):
    assert features.tokens.shape == (1, SIDE * SIDE, 256) and features.grid == (SIDE, SIDE)
    assert torch.equal(stand_in_features(scene()).tokens, features.tokens)
    assert not torch.equal(stand_in_features(scene(), seed=1).tokens, features.tokens)
    x = torch.nn.functional.normalize(features.tokens[0], dim=-1)
    inside_disc = (7 * SIDE + 16, 8 * SIDE + 16)  # two patches in the middle of the red disc
    red, blue = 8 * SIDE + 16, 17 * SIDE + 6
    assert float(x[inside_disc[0]] @ x[inside_disc[1]]) > 0.99  # alike patches, alike tokens
    assert float(x[red] @ x[blue]) < 0.5


def test_pruning_keeps_budget_patches_and_drops_the_rest(features):
    trace = trace_pipeline(features, one_step("random"))
    assert trace.kept.sum() == 64 and (trace.group >= 0).sum() == 64
    assert sorted(trace.group[trace.kept].tolist()) == list(range(64))
    assert not trace.merged
    assert trace.heat_label == "random@projector scores"


def test_merging_assigns_every_patch_to_one_of_the_kept_tokens(features):
    trace = trace_pipeline(features, one_step("tome"))
    assert trace.merged and (trace.group >= 0).all()
    assert len(set(trace.group.tolist())) == 64 and trace.kept.sum() == 64
    # Each group holds exactly one patch whose own token survived: its target.
    assert np.bincount(trace.group[trace.kept], minlength=64).tolist() == [1] * 64


def test_apet_heat_map_is_its_reconstruction_error(features):
    trace = trace_pipeline(features, one_step("apet"))
    assert trace.heat_label == "apet@projector errors"
    direct = tr.create("apet", 64, stage="projector")(features.tokens)
    assert np.allclose(trace.heat, direct.info["errors"][0].numpy())
    # ApET keeps the worst-reconstructed tokens.
    kept_err = trace.heat[trace.kept]
    assert kept_err.min() >= np.sort(trace.heat)[-64] - 1e-6


def test_a_pipeline_is_traced_through_all_its_stages(features):
    pipeline = tr.loads_config(
        "pipeline:\n"
        "  - {stage: vision_encoder, reducer: pool, budget: 144}\n"
        "  - {stage: projector, reducer: random, budget: 64}\n"
        "  - {stage: llm_layer, layer: 1, reducer: random, budget: 32}\n"
    )
    trace = trace_pipeline(features, pipeline, "demo")
    assert [r.split(" ")[1] for r in trace.records] == ["576->144", "144->64", "64->32"]
    assert len(set(trace.group[trace.group >= 0].tolist())) == 32
    assert trace.merged  # the pooling step merged 2 x 2 cells
    # Pooling grouped whole cells: every surviving group is a 2 x 2 block of patches.
    counts = np.bincount(trace.group[trace.group >= 0])
    assert set(counts[counts > 0].tolist()) == {4}
    assert trace.title.startswith("demo\n")


def test_token_to_slot_uses_merged_into_or_else_the_nearest_kept_token():
    tokens = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    indices = torch.tensor([[0, 2]])
    slots = torch.ones(1, 2, dtype=torch.bool)
    sizes = torch.tensor([[2.0, 2.0]])
    # No bookkeeping, but sizes say tokens were merged: nearest kept token by cosine.
    out = make_reduction(tokens, indices, slots, sizes=sizes)
    slot, merged = token_to_slot(out, tokens)
    assert slot.tolist() == [0, 0, 1, 1] and merged
    # A reducer's own record wins (here deliberately not the nearest).
    out.info["merged_into"] = torch.tensor([[-1, 2, -1, 0]])
    slot, _ = token_to_slot(out, tokens)
    assert slot.tolist() == [0, 1, 1, 0]
    # Plain pruning: dropped tokens belong to nothing.
    slot, merged = token_to_slot(make_reduction(tokens, indices, slots, sizes=slots.float()), tokens)
    assert slot.tolist() == [0, -1, 1, -1] and not merged


def test_picture_darkens_dropped_patches_and_outlines_kept_ones(features):
    trace = trace_pipeline(features, one_step("random"))
    pic = kept_picture(features.image, features.grid, trace)
    img = features.image.astype(np.float32) / 255
    cell = lambda p: (slice(14 * (p // SIDE), 14 * (p // SIDE) + 14), slice(14 * (p % SIDE), 14 * (p % SIDE) + 14))  # noqa: E731
    dropped = int(np.flatnonzero(trace.group < 0)[0])
    kept = int(np.flatnonzero(trace.kept)[0])
    assert pic[cell(dropped)].mean() < 0.3 * img[cell(dropped)].mean() + 1e-6
    rows, cols = cell(kept)
    assert np.allclose(pic[rows.start, cols], 1.0)  # white outline
    assert np.allclose(
        pic[rows.start + 1 : rows.stop - 1, cols.start + 1 : cols.stop - 1],
        img[rows.start + 1 : rows.stop - 1, cols.start + 1 : cols.stop - 1],
    )


def test_cli_show_writes_a_grid_png(image_file, tmp_path):
    out = tmp_path / "grid.png"
    args = [
        "show",
        str(image_file),
        "--reducers",
        "apet,tome",
        "-p",
        str(ROOT / "examples" / "pipeline.yaml"),
        "-o",
        str(out),
    ]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "3 column(s)" in res.output
    with Image.open(out) as img:
        # Three columns of 300 px (apet, tome, the pipeline); each picture above its heat map.
        assert img.size[0] == 900 and 600 <= img.size[1] <= 760
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert pixels.std() > 20


def test_stand_in_source_names_the_patch_geometry(features):
    assert features.source == "stand-in tokens (14-pixel patches on a 24×24 grid)"


def _boxes(fig):
    """Window extents of the main title and of every non-empty axes title, after layout."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    titles = [ax.title for ax in fig.axes if ax.get_title()]
    return fig._suptitle.get_window_extent(renderer), [t.get_window_extent(renderer) for t in titles]


def test_titles_clear_the_main_title_and_each_other(features):
    import matplotlib.pyplot as plt

    pipeline = tr.Pipeline.coerce(ROOT / "examples" / "pipeline.yaml")
    traces = [trace_pipeline(features, pipeline, "examples/pipeline.yaml")]
    traces += [trace_pipeline(features, one_step(n)) for n in ("apet", "tome", "cls_attn")]
    fig = figure(features, traces)
    try:
        main, titles = _boxes(fig)
        assert len(titles) == 4 + 3  # four pictures, three heat maps (tome reports none)
        for i, box in enumerate(titles):
            assert not box.overlaps(main), f"axes title {i} overlaps the main title"
            for other in titles[i + 1 :]:
                assert not box.overlaps(other)
        # Every title lies inside the figure (none is cut off at an edge).
        width, height = fig.canvas.get_width_height()
        for box in (main, *titles):
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height
    finally:
        plt.close(fig)


@pytest.mark.parametrize(("columns", "expected"), [(1, (1, 1)), (4, (1, 4)), (5, (2, 3)), (6, (2, 3)), (9, (3, 3))])
def test_many_columns_wrap_into_balanced_bands(features, columns, expected):
    import matplotlib.pyplot as plt

    trace = trace_pipeline(features, one_step("random"))  # every column with a heat map
    fig = figure(features, [trace] * columns)
    try:
        bands, cols = expected
        grid = fig.axes[0].get_subplotspec().get_gridspec()
        assert (grid.nrows, grid.ncols) == (2 * bands, cols)  # a picture row and a heat row per band
        width, height = fig.get_size_inches() * 100
        assert width == 300 * cols and height < 700 * bands + 60  # 3300 px wide no more
        main, titles = _boxes(fig)
        assert all(not t.overlaps(main) for t in titles)
    finally:
        plt.close(fig)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.png", "--reducers", "tome"], "no such file"),
        (["{image}"], "nothing to show"),
        (["{image}", "--reducers", "tomee"], "Did you mean 'tome'"),
        (["{image}", "--reducers", "fastv", "--stage", "projector"], "does not support stage 'projector'"),
    ],
)
def test_cli_show_reports_bad_input(image_file, tmp_path, args, message):
    args = [a.replace("{image}", str(image_file)) for a in args]
    res = CliRunner().invoke(app, ["show", *args, "-o", str(tmp_path / "x.png")], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and message in res.output, res.output
    assert not (tmp_path / "x.png").exists()


def test_model_features_load_a_real_checkpoint_from_disk(tmp_path):
    """The ``--model`` path end to end on a tiny random LLaVA saved as a checkpoint."""
    from models import tiny_llava  # tests/models.py: tiny configs of real model classes
    from transformers import CLIPImageProcessor

    model = tiny_llava(seed=0)
    model.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(tmp_path)
    feats = model_features(scene(), str(tmp_path), device="cpu")
    n = 36  # 24 px, patch 4
    hidden = model.config.vision_config.hidden_size
    assert feats.grid == (6, 6) and feats.tokens.shape == (1, n, hidden)
    with torch.no_grad():
        pixel_values = CLIPImageProcessor.from_pretrained(tmp_path)(images=scene(), return_tensors="pt")["pixel_values"]
        want = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[
            model.config.vision_feature_layer
        ]
    assert torch.allclose(feats.tokens, want[:, 1:], atol=1e-5)  # the model's own selected layer, CLS dropped
    assert feats.cls_attention.shape == (1, n) and 0 < float(feats.cls_attention.sum()) <= 1 + 1e-5
    assert feats.keys.shape[:2] == (1, n)
    assert feats.project(feats.tokens).shape == (1, n, model.config.text_config.hidden_size)
    # Context-hungry reducers run on the model's real [CLS] attention and keys.
    trace = trace_pipeline(
        feats, tr.loads_config("pipeline:\n  - {stage: vision_encoder, reducer: visionzip, budget: 9}\n")
    )
    assert (trace.group >= 0).sum() >= 9 and len(set(trace.group[trace.group >= 0].tolist())) == 9
