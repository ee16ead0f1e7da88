"""InternVL adapter on a tiny random InternVLForConditionalGeneration (InternViT tiles, pixel shuffle, Qwen2)."""

from __future__ import annotations

import functools
from typing import ClassVar

import adapter_checks as checks
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import one_thread  # noqa: F401 - fixture
from models_internvl import IVL_IMAGE_TOKEN, IVL_TOKENS_PER_TILE, internvl_inputs, tiny_internvl
from tokenreduce_plugins.adapters.internvl import InternVLAdapter

import tokenreduce
from tokenreduce import ConfigError, InvalidInputError, Pipeline, ScoringReducer, Stage, Step, create
from tokenreduce.budget import resolve_budget
from tokenreduce.testing import check_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiles per image of each row: a 2-tile image + thumbnail; a small image and a 4-tile one + thumbnail;
# a 3-frame video (each frame a one-tile image, as the processor lays videos out).
ROWS = [[3], [1, 5], [1, 1, 1]]
TILES = [k for row in ROWS for k in row]
PARAMS = {**{n: {"basis_tokens": 1} for n in ("apet", "apet-llava", "apet-qwen")},
          "dart@projector": {"pivot_by": "token_norm", "pivot_text_tokens": 0}}


def inputs(rows: list[int]) -> dict:
    return internvl_inputs([ROWS[r] for r in rows], rows)


def stock_features(m, kw) -> dict:
    """Per image (a run of placeholders), the stock model's projected features of its tiles, in order."""
    with torch.no_grad():
        flat = m.model.get_image_features(pixel_values=kw["pixel_values"]).pooler_output.flatten(0, 1)
    sizes = []
    for row in kw["input_ids"].tolist():
        for prev, token in zip([None, *row], row):
            if token == IVL_IMAGE_TOKEN:
                sizes += [0] if prev != IVL_IMAGE_TOKEN else []
                sizes[-1] += 1
    return {"image": list(flat.split(sizes))}


CASE = checks.Case(build=tiny_internvl, inputs=inputs, tokens={"image": IVL_IMAGE_TOKEN}, stock_features=stock_features,
                   rows=len(ROWS))


def full_pipeline(positions=None):
    return checks.pipeline(
        Step("vision_encoder", create("pool", 0.5)),
        Step("projector", create("random", 12, seed=3)),
        Step("llm_layer", create("random", 0.5), layer=1),
        Step("llm_layer", create("random", 6, seed=4), layer=3),
        positions=positions,
    )


@functools.cache
def model(use_qk_norm: bool = False, attn: str = "sdpa"):
    return tiny_internvl(0, attn, use_qk_norm=use_qk_norm)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_check_adapter_conforms(positions):
    report = check_adapter(lambda: tiny_internvl(0), inputs, [IVL_IMAGE_TOKEN], rows=len(ROWS), positions=positions,
                           reducer_params=PARAMS, input_errors={"pool": ["llm_layer"]})
    assert report.adapter == "internvl" and report.checks == ["identity", "restore", "counts", "cache", "batch", "reducers"]
    # InternViT has a [CLS]: the only refusals are for whole-video context (frames), which InternVL lacks.
    for name, stage, message in report.refused:
        assert "needs context frame" in message, (name, stage, message)
    for name in ("cls_attn", "holov", "visionzip", "vispruner", "vscan"):  # [CLS] methods run at both encoder stages
        assert {(name, "vision_encoder"), (name, "projector")} <= set(report.ran)
    assert {(n, s) for n, s, _ in report.declined} <= {("pool", "llm_layer")}  # rows hold several tiles/images


@pytest.mark.parametrize("use_qk_norm,attn", [(False, "eager"), (True, "sdpa")])
def test_identity_pipeline_is_bit_identical(use_qk_norm, attn):
    case = checks.Case(**{**vars(CASE), "build": lambda seed, a: tiny_internvl(seed, a, use_qk_norm=use_qk_norm)})
    checks.check_identity(case, attn)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_four_step_pipeline_generates_as_recomputed_and_batches_as_rows(positions):
    checks.check_generate_matches_recompute(CASE, full_pipeline(positions))
    checks.check_batch_matches_rows(CASE, full_pipeline(positions))


def hand_built(m, kw, keep, positions):
    """The stock model fed only the kept stock features, on prompts shortened token by token."""
    ids, mask = checks.hand_built_ids(kw["input_ids"], kw["attention_mask"], CASE.tokens, {"image": keep})
    call = {"input_ids": ids, "attention_mask": mask}
    if positions == "original":  # each kept token at its place in the full prompt
        full = torch.arange(kw["input_ids"].shape[1]).expand_as(kw["input_ids"])
        kept = checks.hand_keep_mask(kw["input_ids"], CASE.tokens, {"image": keep}) & kw["attention_mask"].bool()
        call["position_ids"] = torch.zeros_like(ids)
        for r in range(ids.shape[0]):
            call["position_ids"][r, ids.shape[1] - int(kept[r].sum()) :] = full[r][kept[r]]
    feats = torch.cat([f[k] for f, k in zip(stock_features(m, kw)["image"], keep)])[None]
    return checks.with_features(m, call, {"image": feats}, {"pixel_values": kw["pixel_values"]}), mask


@settings(max_examples=10, deadline=None, database=None)
@given(
    rows=st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=2), min_size=1, max_size=3),
    budget=st.one_of(st.integers(1, 70), st.sampled_from([0.25, 0.5, 0.9])),
    stage=st.sampled_from(["vision_encoder", "projector"]),
    positions=st.sampled_from(["compact", "original"]),
    seed=st.integers(0, 9),
)
def test_per_image_budget_and_selection_equal_the_stock_model_fed_the_kept_features(rows, budget, stage, positions, seed):
    """Per image, across its tiles: min(budget, tokens) kept (any tiles), spliced as the stock model would."""
    m, kw = model(), internvl_inputs(rows)
    reducer = create("random", budget, seed=seed)
    with tokenreduce.apply(m, Pipeline([Step(stage, reducer)], positions=positions)) as handle:
        got = checks.logits(m, kw)
        (rec,), keep = handle.records, handle.adapter.last_keep["image"]
    sizes = [k * IVL_TOKENS_PER_TILE for row in rows for k in row]
    want = [min(resolve_budget(budget, n, rounding=reducer.ratio_rounding), n) for n in sizes]
    assert rec.tokens_before == sizes and rec.tokens_after == want
    assert [int(k.sum()) for k in keep] == want and [k.numel() for k in keep] == sizes
    for idx, k in zip(rec.indices, keep):  # indices into the image's run, ascending, matching the keep mask
        assert bool((idx.diff() > 0).all()) and torch.equal(k.nonzero()[:, 0], idx)
    ref, mask = hand_built(m, kw, keep, positions)
    row_of = torch.tensor([r for r, row in enumerate(rows) for _ in row])
    removed = torch.zeros(len(rows), dtype=torch.long).index_add_(0, row_of, torch.tensor(sizes) - torch.tensor(want))
    assert torch.equal(mask.sum(1), kw["attention_mask"].sum(1) - removed) and got.shape == ref.logits.shape
    torch.testing.assert_close(got[mask.bool()], ref.logits[mask.bool()], atol=1e-5, rtol=1e-4)


class Probe(ScoringReducer):
    """Scores by [CLS] attention and remembers its context."""

    name = "probe"
    stages = frozenset(Stage)
    required_context = frozenset({"cls_attention", "cls_token", "keys"})
    seen: ClassVar[list] = []

    def score(self, tokens, valid, context):
        type(self).seen.append((tokens.shape, context))
        return context.cls_attention.float()


@pytest.mark.parametrize("use_qk_norm", [False, True])
def test_cls_context_equals_the_towers_eager_attention_pixel_shuffled(use_qk_norm):
    m, kw = model(use_qk_norm), inputs([0, 1, 2])
    probe = type("P", (Probe,), {"seen": [], "shallow_cls_layer": 1})  # VScan-style: a shallower layer's row too
    with tokenreduce.apply(m, Step("vision_encoder", probe(0.5))):
        checks.logits(m, kw)
    with torch.no_grad():
        out = model(use_qk_norm, "eager").model.vision_tower(kw["pixel_values"], output_attentions=True)

    def per_token(att):  # [CLS] over the 8x8 patches of each tile, head-averaged; a token = a 2x2 patch block
        return att.mean(1)[:, 0, 1:].view(-1, 4, 2, 4, 2).sum((2, 4)).flatten(1)

    first = [sum(TILES[:i]) for i in range(len(TILES))]
    groups = sorted({*TILES})  # the adapter reduces images of equal tile count together, one call per count
    assert len(probe.seen) == len(groups)
    for k, (shape, ctx) in zip(groups, sorted(probe.seen, key=lambda seen: seen[1].grid)):
        images = [i for i, t in enumerate(TILES) if t == k]
        assert shape == (len(images), 16 * k, 4 * 32) and ctx.grid == (4 * k, 4)  # tiles stacked vertically
        for got, att in ((ctx.cls_attention, out.attentions[-1]), (ctx.extra["shallow_cls_attention"], out.attentions[1])):
            expect = torch.stack([per_token(att)[first[i] : first[i] + k].flatten() for i in images])
            torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
        assert ctx.keys.shape == (len(images), 16 * k, 4 * 8)  # four patches' head-averaged keys side by side
        last = torch.tensor([first[i] + k - 1 for i in images])
        torch.testing.assert_close(ctx.cls_token, out.last_hidden_state[last, 0])  # the thumbnail's [CLS]


def test_records_and_llm_layer_on_the_text_decoder():
    m = model()
    pipe = [Step("vision_encoder", create("pool", 0.5)), Step("projector", create("visionzip", 6)),
            Step("llm_layer", create("fastv", 0.5), layer=1)]
    with tokenreduce.apply(m, pipe) as handle:
        m(**inputs([0, 1, 2]))
        recs = [(r.stage, r.tokens_before, r.tokens_after) for r in handle.records]
    assert recs == [
        (Stage.VISION_ENCODER, [48, 16, 80, 16, 16, 16], [24, 8, 40, 8, 8, 8]),
        (Stage.PROJECTOR, [24, 8, 40, 8, 8, 8], [6] * 6),
        (Stage.LLM_LAYER, [6, 12, 18], [3, 6, 9]),  # per row: 1, 2 and 3 images of 6 tokens
    ]


def test_errors():
    m = model()
    assert tokenreduce.get_registry().adapter_for(m) is InternVLAdapter
    with pytest.raises(ConfigError, match="per_video"):
        tokenreduce.patch(m, Pipeline([Step("projector", create("random", 4))], video_budget="per_video"))
    kw = inputs([0])  # one placeholder too few: the run is no whole number of tiles
    ids = kw["input_ids"]
    cut = int((ids[0] == IVL_IMAGE_TOKEN).nonzero()[0])
    kw["input_ids"], kw["attention_mask"] = torch.cat([ids[:, :cut], ids[:, cut + 1 :]], 1), kw["attention_mask"][:, 1:]
    with tokenreduce.apply(m, Step("projector", create("random", 4))), pytest.raises(InvalidInputError, match="16 per tile"):
        m(**kw)
    assert "forward" not in m.__dict__
