"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL adapter on tiny seeded random-weight models (CPU).

Checked against the stock model: identity pipelines, hand-built inputs holding only the
kept features at their original 3-D M-RoPE ids, the position ids themselves, KV-cache
decoding against no-cache recomputation, batch rows against single rows, and removal.
"""

from __future__ import annotations

import pytest
import torch
from models import QWEN_IMAGE_TOKEN, qwen_vl_inputs, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl

from tokenreduce_plugins.adapters import compat
from transformers import Qwen2_5_VLForConditionalGeneration

import tokenreduce
from tokenreduce import Pipeline, ReductionContext, Stage, Step
from tokenreduce.errors import ConfigError, InvalidInputError, MissingContextError

BUILDERS = {"qwen2.5-vl": tiny_qwen2_5_vl, "qwen2-vl": tiny_qwen2_vl}  # Qwen3-VL: see its own tests
# Two rows, three images of three sizes (the first spans several attention windows), left padding.
IMAGES = [[(8, 12), (4, 4)], [(6, 6)]]


def pipe(*steps: Step, positions: str | None = None, video_budget: str = "per_frame") -> Pipeline:
    return Pipeline(list(steps), positions=positions, video_budget=video_budget)


def proj(name: str, budget, **params) -> Step:
    return Step("projector", tokenreduce.create(name, budget=budget, **params))


def enc(name: str, budget, **params) -> Step:
    return Step("vision_encoder", tokenreduce.create(name, budget=budget, **params))


def llm(name: str, budget, layer: int, **params) -> Step:
    return Step("llm_layer", tokenreduce.create(name, budget=budget, **params), layer=layer)


def lm_inputs(model) -> dict:
    """Captures the keyword arguments of every language-model call."""
    calls: list[dict] = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    return {"calls": calls, "handle": handle}


def extend(inp: dict, new: torch.Tensor) -> dict:
    """The prompt followed by ``new`` generated tokens (text), for a no-cache recompute."""
    out = dict(inp)
    out["input_ids"] = torch.cat([inp["input_ids"], new], dim=1)
    if inp.get("attention_mask") is not None:
        out["attention_mask"] = torch.cat([inp["attention_mask"], torch.ones_like(new)], dim=1)
    out["mm_token_type_ids"] = torch.cat([inp["mm_token_type_ids"], torch.zeros_like(new, dtype=torch.int)], dim=1)
    return out


def hand_built(model, inp: dict, reducer, stage: str = "projector"):
    """The stock model on a hand-built input: only the kept features, at the stock 3-D ids.

    Each image is reduced alone by calling ``reducer`` directly on the stock merged
    features; the shortened rows are left-padded. Returns (logits, mask, kept indices per image).
    """
    inner = model.model
    ids, mask = inp["input_ids"], inp["attention_mask"].bool()
    with torch.no_grad():
        feats = inner.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output
        pos3, _ = inner.get_rope_index(
            ids, inp["mm_token_type_ids"], image_grid_thw=inp["image_grid_thw"], attention_mask=inp["attention_mask"]
        )
        embeds = inner.get_input_embeddings()(ids).clone()
    places = (ids == QWEN_IMAGE_TOKEN).nonzero().tolist()  # (row, col) of each placeholder, feature order
    keep = mask.clone()
    kept, start = [], 0
    for f, (_, h, w) in zip(feats, inp["image_grid_thw"].tolist()):
        red = reducer(f[None], context=ReductionContext(stage=Stage(stage), grid=(h // 2, w // 2)))
        idx = red.indices[0, red.valid[0]]
        kept.append(idx)
        for j in range(len(f)):
            b, col = places[start + j]
            keep[b, col] = False
        for slot, j in enumerate(idx.tolist()):
            b, col = places[start + j]
            keep[b, col] = True
            embeds[b, col] = red.tokens[0, slot]
        start += len(f)
    length = int(keep.sum(1).max())
    bsz, dev = ids.shape[0], ids.device
    e = torch.zeros(bsz, length, embeds.shape[-1], dtype=embeds.dtype, device=dev)
    m = torch.zeros(bsz, length, dtype=torch.long, device=dev)
    p = torch.zeros(3, bsz, length, dtype=torch.long, device=dev)
    for b in range(bsz):
        cols = keep[b].nonzero()[:, 0]
        n = len(cols)
        e[b, length - n :], m[b, length - n :], p[:, b, length - n :] = embeds[b, cols], 1, pos3[:, b, cols]
    with torch.no_grad():
        logits = model(inputs_embeds=e, attention_mask=m, position_ids=p).logits
    return logits, m.bool(), kept, (keep, pos3)


def assert_cache_matches_recompute(model, inp: dict, steps: int = 4, **gen) -> torch.Tensor:
    """Greedy generate() with the KV cache == argmax of a full no-cache forward at every step."""
    out = model.generate(
        **inp, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True, **gen
    )
    new = out.sequences[:, inp["input_ids"].shape[1] :]
    for k in range(new.shape[1]):
        with torch.no_grad():
            full = model(**extend(inp, new[:, :k]), use_cache=False).logits[:, -1]
        assert torch.equal(full.argmax(-1), new[:, k]), f"step {k}"
        torch.testing.assert_close(full, out.logits[k], atol=1e-4, rtol=1e-4)
    return new


# -- identity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_identity_pipeline_equals_stock(arch, attn):
    model = BUILDERS[arch](attn_implementation=attn)
    inp = qwen_vl_inputs(IMAGES)
    with torch.no_grad():
        ref = model(**inp).logits
        with tokenreduce.apply(model, pipe(proj("random", 1.0))) as handle:
            out = model(**inp).logits
            rec = handle.records
        with tokenreduce.apply(model, pipe(enc("pool", 10_000), proj("apet-qwen", 1.0))):
            both = model(**inp).logits
    assert torch.equal(out, ref)
    assert [(r.stage, r.tokens_before, r.tokens_after) for r in rec] == [(Stage.PROJECTOR, [24, 4, 9], [24, 4, 9])]
    # The merger then runs on the groups in raster order instead of window order: equal up to rounding.
    torch.testing.assert_close(both, ref, atol=1e-5, rtol=1e-5)


def test_identity_generate_equals_stock():
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    ref = model.generate(**inp, max_new_tokens=4, do_sample=False)
    with tokenreduce.apply(model, pipe(proj("random", 10_000), llm("random", 10_000, layer=1))):
        out = model.generate(**inp, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)


# -- encoder-side reduction == stock model on hand-built inputs ------------------------------------------


@pytest.mark.parametrize(
    "name,budget,params",
    [("random", 5, {}), ("pool", 6, {}), ("apet-qwen", 7, {"basis_tokens": 2}), ("apet", 0.5, {"basis_tokens": 1})],
)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_projector_reduction_equals_hand_built_stock_input(arch, name, budget, params):
    model = BUILDERS[arch]()
    inp = qwen_vl_inputs(IMAGES)
    reducer = tokenreduce.create(name, budget=budget, stage="projector", **params)
    expected, valid, kept, _ = hand_built(model, inp, reducer)
    with torch.no_grad(), tokenreduce.apply(model, reducer) as handle:
        out = model(**inp).logits
    assert out.shape == expected.shape
    torch.testing.assert_close(out[valid], expected[valid], atol=1e-5, rtol=1e-5)
    (rec,) = handle.records
    assert rec.tokens_before == [24, 4, 9]
    assert rec.tokens_after == [len(k) for k in kept]
    for got, want in zip(rec.indices, kept):
        assert torch.equal(got, want)


def test_kept_tokens_keep_the_stock_position_ids():
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    reducer = tokenreduce.create("random", budget=5, stage="projector", seed=3)
    _, valid, _, (keep, pos3) = hand_built(model, inp, reducer)
    spy = lm_inputs(model)
    with torch.no_grad(), tokenreduce.apply(model, reducer):
        model(**inp)
    spy["handle"].remove()
    got = spy["calls"][0]["position_ids"]  # (3, B, L_red), left-padded like the input
    assert got.shape == (3, *valid.shape)
    for b in range(valid.shape[0]):
        assert torch.equal(got[:, b, valid[b]], pos3[:, b, keep[b]])
    # Image tokens really kept 2-D ids: within an image, height/width ids differ from the text axis.
    assert not torch.equal(got[1], got[2])


def test_decoding_positions_equal_stock_generate():
    """With ``original`` positions every decoding step gets the stock model's ids (rope_deltas included)."""
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    spy = lm_inputs(model)
    model.generate(**inp, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    stock = [c["position_ids"] for c in spy["calls"][1:]]
    spy["calls"].clear()
    with tokenreduce.apply(model, pipe(proj("random", 4))):
        model.generate(**inp, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    reduced = [c["position_ids"] for c in spy["calls"][1:]]
    spy["handle"].remove()
    assert len(stock) == len(reduced) == 2
    for s, r in zip(stock, reduced):
        # Row 0 is the 1-D sequence index (shorter after reduction); rows 1-3 are the rotary ids.
        assert torch.equal(s[1:], r[1:])
        assert bool((r[0] < s[0]).all())


def test_vision_encoder_selection_equals_projector_selection():
    """Selecting merge groups before the merger == selecting the merged tokens (window order undone)."""
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    with torch.no_grad():
        with tokenreduce.apply(model, pipe(enc("random", 5, seed=1))) as handle:
            before = model(**inp).logits
            rec_before = handle.records
        with tokenreduce.apply(model, pipe(proj("random", 5, seed=1))) as handle:
            after = model(**inp).logits
            rec_after = handle.records
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
    assert rec_before[0].stage is Stage.VISION_ENCODER
    for a, b in zip(rec_before[0].indices, rec_after[0].indices):
        assert torch.equal(a, b)


def test_encoder_then_projector_indices_compose():
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    with torch.no_grad(), tokenreduce.apply(model, pipe(enc("pool", 8), proj("random", 3))) as handle:
        model(**inp)
    first, second = handle.records
    assert (first.stage, second.stage) == (Stage.VISION_ENCODER, Stage.PROJECTOR)
    assert first.tokens_before == [24, 4, 9] and first.tokens_after == [8, 4, 8]
    assert second.tokens_before == [8, 4, 8] and second.tokens_after == [3, 3, 3]
    for a, b in zip(first.indices, second.indices):  # indices into each image's full grid
        assert set(b.tolist()) <= set(a.tolist())
    assert first.info[0]["modality"] == "image" and "cell" in first.info[0]


# -- decoding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps,positions",
    [
        ((proj("random", 5),), None),
        ((proj("pool", 4),), "compact"),
        ((enc("apet-qwen", 6, basis_tokens=2), proj("random", 4)), None),
        ((llm("random", 5, layer=1),), None),
        ((llm("random", 5, layer=1),), "compact"),
        ((proj("apet-qwen", 7, basis_tokens=2), llm("apet-qwen", 4, layer=2, basis_tokens=2)), None),
        ((proj("random", 6), llm("random", 3, layer=1)), "compact"),
    ],
    ids=["proj", "proj-compact", "enc+proj", "llm", "llm-compact", "apet-proj+llm", "proj+llm-compact"],
)
def test_generate_with_cache_equals_no_cache_recompute(steps, positions):
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    with tokenreduce.apply(model, pipe(*steps, positions=positions)):
        assert_cache_matches_recompute(model, inp)


def test_llm_layer_pool_gets_the_image_grid():
    """One same-sized image per row: the decoder-layer step sees the (h/2, w/2) grid, so pooling works."""
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs([[(8, 12)], [(8, 12)]])
    with tokenreduce.apply(model, pipe(llm("pool", 6, layer=1))) as handle:
        assert_cache_matches_recompute(model, inp, steps=3)
        with torch.no_grad():
            model(**inp)
    (rec,) = handle.records
    assert rec.tokens_before == [24, 24] and rec.tokens_after == [6, 6]
    assert rec.indices[0].tolist() == [0, 2, 4, 12, 14, 16]  # top-left cells of a 2 x 3 pooling of 4 x 6


def test_qwen2_vl_generate_with_cache_equals_no_cache_recompute():
    model = tiny_qwen2_vl()
    with tokenreduce.apply(model, pipe(enc("random", 6), llm("random", 3, layer=1))):
        assert_cache_matches_recompute(model, qwen_vl_inputs(IMAGES))


@pytest.mark.parametrize("with_mask", [False, True])
def test_manual_decoding_loop_matches_recompute(with_mask):
    """A hand-written loop passing ``cache=out.cache`` (with or without the full-length mask)."""
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs([[(8, 12)]])
    inp_nomask = {k: v for k, v in inp.items() if k != "attention_mask"}
    with torch.no_grad(), tokenreduce.apply(model, pipe(proj("random", 7))):
        out = model(**(inp if with_mask else inp_nomask), use_cache=True)
        new = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            mask = torch.ones(1, inp["input_ids"].shape[1] + new.shape[1], dtype=torch.long)
            extra = {"attention_mask": mask} if with_mask else {}
            cache = {compat.cache_name(model.forward): compat.output_cache(out)}  # this release's spelling
            out = model(input_ids=new[:, -1:], use_cache=True, **cache, **extra)
            full = model(**extend(inp, new), use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], full, atol=1e-4, rtol=1e-4)
            new = torch.cat([new, full.argmax(-1, keepdim=True)], dim=1)


def test_unpadded_batch_that_shrinks_unevenly_generates_like_recompute():
    """Rows of equal length (generate() drops the all-ones mask) that lose different numbers of tokens."""
    model = tiny_qwen2_5_vl()
    a, b = qwen_vl_inputs([[(4, 8)]], text=3, seed=1), qwen_vl_inputs([[(4, 4)]], text=5, seed=2)
    assert a["input_ids"].shape == b["input_ids"].shape
    inp = {k: torch.cat([a[k], b[k]]) for k in a}
    with tokenreduce.apply(model, pipe(proj("random", 2))) as handle:
        assert_cache_matches_recompute(model, inp)
    assert handle.records[0].tokens_before == [8, 4]


def test_beam_search_with_cache_equals_without():
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    with tokenreduce.apply(model, pipe(proj("random", 5))):
        cached = model.generate(**inp, max_new_tokens=3, num_beams=2, do_sample=False)
        plain = model.generate(**inp, max_new_tokens=3, num_beams=2, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


# -- batching ----------------------------------------------------------------------------------------------


def row_inputs(inp: dict, b: int) -> dict:
    """Row ``b`` of a batch, unpadded, with its own pixel values and grids."""
    grids = inp["image_grid_thw"]
    per_image_rows = [b_ for b_, row in enumerate(images_of_rows(inp)) for _ in row]
    patches = grids.prod(-1).tolist()
    starts = [sum(patches[:i]) for i in range(len(patches))]
    mine = [i for i, r in enumerate(per_image_rows) if r == b]
    real = inp["attention_mask"][b].bool()
    ids = inp["input_ids"][b, real][None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": inp["mm_token_type_ids"][b, real][None],
        "pixel_values": torch.cat([inp["pixel_values"][starts[i] : starts[i] + patches[i]] for i in mine]),
        "image_grid_thw": grids[mine],
    }


def images_of_rows(inp: dict) -> list[list[int]]:
    """Which images each row holds (from the placeholder runs)."""
    out = []
    grids = inp["image_grid_thw"].tolist()
    counts = [t * h * w // 4 for t, h, w in grids]
    per_row = (inp["input_ids"] == QWEN_IMAGE_TOKEN).sum(1).tolist()
    i = 0
    for n in per_row:
        row = []
        while n > 0:
            row.append(i)
            n -= counts[i]
            i += 1
        out.append(row)
    return out


@pytest.mark.parametrize(
    "steps", [(proj("random", 5),), (enc("pool", 5), proj("apet", 3, basis_tokens=1)), (llm("random", 4, layer=1),)]
)
def test_batch_rows_equal_rows_alone(steps):
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs([[(8, 12), (4, 4)], [(6, 6)], [(4, 8)]])
    with torch.no_grad(), tokenreduce.apply(model, pipe(*steps)) as handle:
        batch = model(**inp).logits
        assert handle.records
        for b in range(3):
            alone = model(**row_inputs(inp, b)).logits[0]
            n = alone.shape[0]
            assert n < inp["attention_mask"][b].sum()  # the row was reduced
            torch.testing.assert_close(batch[b, -n:], alone, atol=1e-5, rtol=1e-5)


def test_batch_generate_equals_rows_alone():
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs([[(8, 12), (4, 4)], [(6, 6)]])
    with tokenreduce.apply(model, pipe(proj("random", 5), llm("random", 3, layer=1))):
        batch = model.generate(**inp, max_new_tokens=3, do_sample=False)[:, inp["input_ids"].shape[1] :]
        for b in range(2):
            one = row_inputs(inp, b)
            alone = model.generate(**one, max_new_tokens=3, do_sample=False)[:, one["input_ids"].shape[1] :]
            assert torch.equal(batch[b], alone[0])


# -- videos, labels, precomputed features ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "video_budget,before,after", [("per_frame", [4, 4, 6, 6], [2, 2, 2, 2]), ("per_video", [8, 12], [2, 2])]
)
def test_videos_per_frame_or_per_video(video_budget, before, after):
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs([[(4, 4)], [(4, 6)]], videos=[[(2, 4, 4)], [(2, 4, 6)]])
    with tokenreduce.apply(model, pipe(proj("random", 2), video_budget=video_budget)) as handle:
        assert_cache_matches_recompute(model, inp, steps=2)
        with torch.no_grad():
            model(**inp)
    image, video = handle.records
    assert image.tokens_before == [4, 6] and image.tokens_after == [2, 2]
    assert (video.tokens_before, video.tokens_after) == (before, after)
    assert video.info[0]["modality"] == "video"


def image_labels(inp: dict) -> torch.Tensor:
    labels = inp["input_ids"].masked_fill(inp["input_ids"] == QWEN_IMAGE_TOKEN, -100)
    return labels.masked_fill(inp["attention_mask"] == 0, -100)


def test_labels_follow_the_kept_tokens_projector():
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    labels = image_labels(inp)
    reducer = tokenreduce.create("random", budget=5, stage="projector")
    _, valid, _, (keep, _) = hand_built(model, inp, reducer)
    short = torch.full(valid.shape, -100)
    for b in range(labels.shape[0]):
        short[b, valid[b]] = labels[b, keep[b]]
    with torch.no_grad(), tokenreduce.apply(model, reducer):
        out = model(**inp, labels=labels)
    want = model.loss_function(logits=out.logits, labels=short, vocab_size=model.config.text_config.vocab_size)
    torch.testing.assert_close(out.loss, want)
    assert out.logits.shape[1] == valid.shape[1] < labels.shape[1]


def test_labels_follow_the_kept_tokens_llm_layer():
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    labels = image_labels(inp)
    with torch.no_grad(), tokenreduce.apply(model, pipe(llm("random", 3, layer=1))) as handle:
        out = model(**inp, labels=labels)
    (rec,) = handle.records
    # Rebuild the shortened label rows from the kept image tokens, left-padded.
    rows = []
    for b in range(labels.shape[0]):
        real = inp["attention_mask"][b].bool()
        lab, ids = labels[b, real], inp["input_ids"][b, real]
        img = (ids == QWEN_IMAGE_TOKEN).nonzero()[:, 0]
        drop = torch.ones(len(ids), dtype=torch.bool)
        drop[img] = False
        drop[img[rec.indices[b]]] = True
        rows.append(lab[drop])
    length = out.logits.shape[1]
    short = torch.full((labels.shape[0], length), -100)
    for b, row in enumerate(rows):
        short[b, length - len(row) :] = row
    want = model.loss_function(logits=out.logits, labels=short, vocab_size=model.config.text_config.vocab_size)
    torch.testing.assert_close(out.loss, want)
    assert rec.tokens_after == [3, 3]


#: Releases whose forward takes pre-encoded features (``mm_encoder_outputs``); older ones have no such input.
TAKES_FEATURES = compat.takes_encoder_outputs(Qwen2_5_VLForConditionalGeneration.forward)


@pytest.mark.skipif(not TAKES_FEATURES, reason="this transformers release has no mm_encoder_outputs input")
def test_precomputed_features_reduce_like_pixels():
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    with torch.no_grad():
        feats = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    pre = {k: v for k, v in inp.items() if k != "pixel_values"}
    with torch.no_grad(), tokenreduce.apply(model, proj("pool", 4)):
        from_pixels = model(**inp).logits
        from_features = model(**pre, mm_encoder_outputs={"image": feats}).logits
    assert torch.equal(from_pixels, from_features)
    assert len(feats.pooler_output[0]) == 24  # the caller's object is not modified


# -- errors and removal ----------------------------------------------------------------------------------------


def test_cls_reducers_are_refused_at_patch_time():
    model = tiny_qwen2_5_vl()
    with pytest.raises(MissingContextError, match=r"cls_attention.*no \[CLS\] token"):
        tokenreduce.patch(model, tokenreduce.create("cls_attn", budget=4, stage="projector"))
    assert "forward" not in model.__dict__


def test_bad_configurations_are_refused():
    model = tiny_qwen2_5_vl()
    with pytest.raises(ConfigError, match="positions='diagonal'"):
        tokenreduce.patch(model, pipe(proj("random", 4), positions="diagonal"))
    with pytest.raises(ConfigError, match="layer=7 is out of range"):
        tokenreduce.patch(model, pipe(llm("random", 4, layer=7)))
    inp = qwen_vl_inputs(IMAGES)
    with torch.no_grad():
        feats = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    pre = {k: v for k, v in inp.items() if k != "pixel_values"}
    with tokenreduce.apply(model, pipe(enc("random", 4))):
        if TAKES_FEATURES:
            with pytest.raises(ConfigError, match="vision_encoder stage needs the merger's input"):
                model(**pre, mm_encoder_outputs={"image": feats})
        bad = dict(inp, input_ids=inp["input_ids"][:, 1:], attention_mask=inp["attention_mask"][:, 1:])
        bad["mm_token_type_ids"] = inp["mm_token_type_ids"][:, 1:]
        bad["input_ids"] = bad["input_ids"].masked_fill(bad["input_ids"] == QWEN_IMAGE_TOKEN, 5)
        with pytest.raises(InvalidInputError, match="placeholder tokens and features do not match"):
            model(**bad)


def test_patch_then_remove_restores_the_model():
    model = tiny_qwen2_5_vl()
    twin = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    handle = tokenreduce.patch(model, pipe(enc("pool", 5), proj("random", 3), llm("random", 2, layer=1)))
    with torch.no_grad():
        model(**inp)
    model.generate(**inp, max_new_tokens=2, do_sample=False)
    handle.remove()
    handle.remove()  # idempotent
    for module in (model, model.model, model.model.visual.merger):
        assert not {"forward", "get_image_features", "get_video_features"} & set(module.__dict__)
    hooks = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooks == []
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, twin(**inp).logits)
    assert torch.equal(
        model.generate(**inp, max_new_tokens=3, do_sample=False),
        twin.generate(**inp, max_new_tokens=3, do_sample=False),
    )
    # Also on errors inside ``apply``.
    with pytest.raises(RuntimeError):
        with tokenreduce.apply(model, proj("random", 3)):
            raise RuntimeError("boom")
    assert "forward" not in model.__dict__


def test_text_only_forward_is_untouched():
    model = tiny_qwen2_5_vl()
    ids = torch.randint(5, 100, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with tokenreduce.apply(model, pipe(proj("random", 3), llm("random", 2, layer=1))) as handle:
            out = model(input_ids=ids).logits
    assert torch.equal(out, ref)
    assert handle.records == []


# -- compact positions ----------------------------------------------------------------------------------------


def test_compact_positions_renumber_the_shortened_sequence():
    model = tiny_qwen2_5_vl()
    inp = qwen_vl_inputs(IMAGES)
    spy = lm_inputs(model)
    with tokenreduce.apply(model, pipe(proj("random", 5), positions="compact")) as handle:
        model.generate(**inp, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    spy["handle"].remove()
    prefill, *steps = [c["position_ids"] for c in spy["calls"]]
    mask = spy["calls"][0]["attention_mask"].bool()
    seq = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
    for axis in range(1, 4):  # generate() passes (4, B, L): the 1-D row, then t/h/w
        assert torch.equal(prefill[axis], seq)
    for k, ids in enumerate(steps):
        assert torch.equal(ids[1:, :, 0], (mask.sum(1) + k).expand(3, -1))
    assert handle.records and handle.records[0].tokens_after == [5, 4, 5]  # still the prompt's, after generate()


# -- Qwen3-VL (DeepStack) ------------------------------------------------------------------------------------------


def test_qwen3_vl_identity_and_reduction():
    model = tiny_qwen3_vl()
    inp = qwen_vl_inputs(IMAGES, [[(2, 4, 4)], []], frame_runs=True)
    with torch.no_grad():
        ref = model(**inp).logits
        with tokenreduce.apply(model, pipe(proj("random", 1.0))):
            same = model(**inp).logits
        with tokenreduce.apply(model, pipe(enc("random", 3, seed=2))):
            before = model(**inp).logits
        with tokenreduce.apply(model, pipe(proj("random", 3, seed=2))) as handle:
            after = model(**inp).logits
    assert torch.equal(same, ref)
    # DeepStack features follow the kept tokens at either stage.
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
    image, video = handle.records
    assert image.tokens_after == [3, 3, 3] and video.tokens_before == [4, 4]


def test_qwen3_vl_generate_with_cache_equals_no_cache_recompute():
    model = tiny_qwen3_vl()
    inp = qwen_vl_inputs(IMAGES, [[(2, 4, 4)], []], frame_runs=True)
    with tokenreduce.apply(model, pipe(proj("apet-qwen", 5, basis_tokens=2), llm("random", 4, layer=1))):
        assert_cache_matches_recompute(model, inp, steps=3)
    with pytest.raises(ConfigError, match="DeepStack"):
        tokenreduce.patch(model, pipe(llm("random", 4, layer=0)))
