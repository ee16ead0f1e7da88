"""Gemma 3 adapter on a tiny random Gemma3ForConditionalGeneration (SigLIP + pooling projector + Gemma 3 decoder).

Ground truth for every reduction: the stock model run on the shortened prompt (kept
placeholders only, ``token_type_ids`` marking them, the kept stock features spliced in).
A reduction at the input of decoder layer 0 is exactly that, so it pins down what the
decoder machinery rebuilds for every later layer: sliding-window and full masks, the
bidirectional runs of image tokens, and each layer type's own rotary tables.
"""

from __future__ import annotations

from typing import ClassVar

import adapter_checks as checks
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import one_thread  # noqa: F401 - fixture
from models_gemma3 import GEMMA_IMAGE, GEMMA_TOKENS, gemma3_inputs, tiny_gemma3

import tokenreduce
from tokenreduce import MissingContextError, ScoringReducer, Stage, Step, create
from tokenreduce.testing import check_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = [1, 2]  # images per row of the fixed batch (rows of different lengths, left-padded)
TOKENS = {"image": GEMMA_IMAGE}
MODEL = tiny_gemma3(0)  # read-only in the tests that share it (patches are removed)


def inputs(rows: list[int]) -> dict:
    return gemma3_inputs(IMAGES, rows)


def positioned() -> dict:
    """The batch with the position ids generate() would use (first real token at 0), so that a
    shortened, re-padded prompt numbers its tokens the same way."""
    kw = inputs([0, 1])
    kw["position_ids"] = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return kw


def stock_features(model, kw) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=kw["pixel_values"]).pooler_output)


def reference(model, kw: dict, keep: list[torch.Tensor], positions: str, *, bidirectional: bool = True) -> tuple:
    """Logits of the stock model on the prompt shortened to the kept placeholders, and its mask."""
    ids, mask = checks.hand_built_ids(kw["input_ids"], kw["attention_mask"], TOKENS, {"image": keep})
    if positions == "original":
        flat = checks.hand_keep_mask(kw["input_ids"], TOKENS, {"image": keep}) & kw["attention_mask"].bool()
        pos = torch.zeros_like(ids)
        for r in range(ids.shape[0]):
            kept = kw["position_ids"][r][flat[r]]
            pos[r, ids.shape[1] - len(kept) :] = kept
    else:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
    call = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    if bidirectional:
        call["token_type_ids"] = (ids == GEMMA_IMAGE).long()
    feats = torch.cat([f[k] for f, k in zip(stock_features(model, kw), keep)])[None]
    out = checks.with_features(model, call, {"image": feats}, {"pixel_values": kw["pixel_values"]})
    return out.logits, mask.bool()


def real_slots(handle, kw) -> torch.Tensor:
    """``(B, L')`` the slots of a decoder-reduced forward's output that hold real tokens (the
    decoder drops image tokens only: the prompt's own padding stays, in slots of its own)."""
    kept = handle.adapter.decoder.last_kept
    return (kept >= 0) & torch.gather(kw["attention_mask"], 1, kept.clamp(min=0)).bool()


def per_image(records) -> list[torch.Tensor]:
    """An llm_layer record's kept indices (per row, over its image tokens) as keep masks per image."""
    (rec,) = records
    keep = []
    for r, idx in enumerate(rec.indices):
        row = torch.zeros(rec.tokens_before[r], dtype=torch.bool)
        row[idx] = True
        keep += list(row.view(-1, GEMMA_TOKENS))
    assert len(keep) == sum(IMAGES)
    return keep


# -- the conformance kit -------------------------------------------------------------------------------

PARAMS = {
    **{name: {"basis_tokens": 1} for name in ("apet", "apet-llava", "apet-qwen")},
    "dart@projector": {"pivot_by": "token_norm", "pivot_text_tokens": 0},
}
CLS_METHODS = {"cls_attn", "holov", "visionzip", "vispruner"}


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_the_adapter_conforms(positions):
    report = check_adapter(
        lambda: tiny_gemma3(0), inputs, [GEMMA_IMAGE], positions=positions, reducer_params=PARAMS,
        input_errors={"pool": ["llm_layer"]},  # row 1 holds two images: no single grid in the decoder
    )
    assert report.adapter == "gemma3"
    assert report.checks == ["identity", "restore", "counts", "cache", "batch", "reducers"]
    ran, refused = set(report.ran), {(n, s) for n, s, _ in report.refused}
    for name, entry in tokenreduce.get_registry().reducers.items():  # each step: exactly one outcome
        for stage in entry.cls.stages:
            key = (name, stage.value)
            assert [key in ran, key in refused, key in {(n, s) for n, s, _ in report.declined}].count(True) == 1, key
    encoder_refused = {n for n, s in refused if s != "llm_layer"}
    assert CLS_METHODS <= encoder_refused and not CLS_METHODS & {n for n, _ in ran}  # SigLIP has no [CLS]
    assert all("needs context" in message for _, _, message in report.refused)


# -- identity and the stock model on the shortened prompt ----------------------------------------------

CASE = checks.Case(
    build=tiny_gemma3, inputs=inputs, tokens=TOKENS, stock_features=lambda m, kw: {"image": stock_features(m, kw)}
)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_identity_pipeline_is_bit_identical(attn):
    checks.check_identity(CASE, attn)


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("stage", ["vision_encoder", "projector"])
def test_encoder_side_selection_equals_stock_on_the_shortened_prompt(stage, positions):
    kw = positioned()
    with tokenreduce.apply(MODEL, checks.pipeline(Step(stage, create("random", 6, seed=5)), positions=positions)) as h:
        got = checks.logits(MODEL, kw)
        keep = h.adapter.last_keep["image"]
    assert [int(k.sum()) for k in keep] == [6, 6, 6] and h.records[0].tokens_before == [GEMMA_TOKENS] * 3
    want, mask = reference(MODEL, kw, keep, positions)
    torch.testing.assert_close(got[mask], want[mask], atol=2e-5, rtol=1e-4)
    # The kept image tokens still attend to each other both ways: without the runs the model differs.
    causal, _ = reference(MODEL, kw, keep, positions, bidirectional=False)
    assert (causal[mask] - got[mask]).abs().max() > 1e-2


@pytest.mark.parametrize("budget", [0.4, 0.9])  # 0.9: row 0 keeps a run of 14 image tokens, longer than the window
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_llm_layer_0_equals_stock_on_the_shortened_prompt(positions, attn, budget):
    """Every layer after the step: its type's mask (sliding window 12 < a run of 16) with the kept
    runs bidirectional, and its type's rotary tables (bases 100 and 1000), as the stock model builds them."""
    model = MODEL if attn == "sdpa" else tiny_gemma3(0, attn)
    kw = positioned()
    pipe = checks.pipeline(Step("llm_layer", create("random", budget), layer=0), positions=positions)
    with tokenreduce.apply(model, pipe) as h:
        got = checks.logits(model, kw)[real_slots(h, kw)]
        keep = per_image(h.records)
    want, mask = reference(model, kw, keep, positions)
    torch.testing.assert_close(got, want[mask], atol=2e-5, rtol=1e-4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stage=st.sampled_from(["vision_encoder", "projector", "llm_layer"]),
    budget=st.integers(1, GEMMA_TOKENS),
    seed=st.integers(0, 2**16),
    positions=st.sampled_from(["compact", "original"]),
)
def test_any_selection_equals_stock_on_the_shortened_prompt(stage, budget, seed, positions):
    kw = positioned()
    step = Step(stage, create("random", budget, seed=seed), layer=0 if stage == "llm_layer" else None)
    with tokenreduce.apply(MODEL, checks.pipeline(step, positions=positions)) as h:
        got = checks.logits(MODEL, kw)
        if stage == "llm_layer":  # one budget per row
            got, keep = got[real_slots(h, kw)], per_image(h.records)
            assert h.records[0].tokens_after == [min(budget, GEMMA_TOKENS * n) for n in IMAGES]
        else:  # one budget per image
            keep = h.adapter.last_keep["image"]
            assert [int(k.sum()) for k in keep] == [budget] * 3
    want, mask = reference(MODEL, kw, keep, positions)
    got = got if stage == "llm_layer" else got[mask]
    torch.testing.assert_close(got, want[mask], atol=2e-5, rtol=1e-4)


def test_vision_encoder_and_projector_count_the_same_cells():
    """A selection by position keeps the same cells at both stages; the projector maps each cell alone."""
    kw = inputs([0, 1])
    got = {}
    for stage in ("vision_encoder", "projector"):
        with tokenreduce.apply(MODEL, Step(stage, create("random", 5, seed=9))) as h:
            got[stage] = (checks.logits(MODEL, kw), h.adapter.last_keep["image"], h.records[0].indices)
    (lv, kv, iv), (lp, kp, ip) = got["vision_encoder"], got["projector"]
    assert all(torch.equal(a, b) for a, b in zip(kv, kp)) and all(torch.equal(a, b) for a, b in zip(iv, ip))
    torch.testing.assert_close(lv, lp, atol=2e-5, rtol=1e-4)


# -- context --------------------------------------------------------------------------------------------


class Probe(ScoringReducer):
    """Scores by key norm and remembers its context."""

    name = "probe"
    stages = frozenset(Stage)
    required_context = frozenset({"keys", "grid"})
    seen: ClassVar[list] = []

    def score(self, tokens, valid, context):
        type(self).seen.append(context)
        return context.keys.float().norm(dim=-1)


def test_keys_are_the_last_siglip_layer_pooled_over_each_cell():
    kw = inputs([0, 1])
    probe = type("P", (Probe,), {"seen": []})
    with tokenreduce.apply(MODEL, Step("vision_encoder", probe(4))):
        MODEL(**kw)
    ctx = probe.seen[0]
    tower = MODEL.model.vision_tower
    with torch.no_grad():
        out = tower(pixel_values=kw["pixel_values"], output_hidden_states=True)
        last = getattr(tower, "vision_model", tower).encoder.layers[-1]  # nested in older layouts
        keys = last.self_attn.k_proj(last.layer_norm1(out.hidden_states[-2]))  # the last block's input
        keys = keys.view(3, 8, 8, 4, 8).mean(3).permute(0, 3, 1, 2)  # heads averaged, (n, d, 8, 8)
        want = torch.nn.functional.avg_pool2d(keys, 2).flatten(2).transpose(1, 2)  # 2x2 cells -> (n, 16, d)
    torch.testing.assert_close(ctx.keys, want, atol=1e-6, rtol=1e-5)
    assert ctx.grid == (4, 4) and ctx.cls_attention is None


def test_cls_context_is_refused_at_patch_time():
    with pytest.raises(MissingContextError, match="cls_attention"):
        tokenreduce.patch(tiny_gemma3(0), Step("projector", create("cls_attn", 4)))


class AttentionProbe(ScoringReducer):
    """Scores by the last token's attention (of the previous layer) and remembers its context."""

    name = "attention-probe"
    stages = frozenset({Stage.LLM_LAYER})
    required_context = frozenset({"attention"})
    attention_query = "last"
    attention_layer = "previous"
    seen: ClassVar[list] = []

    def score(self, tokens, valid, context):
        type(self).seen.append(context)
        return context.attention[:, 0].float()


@pytest.mark.parametrize("layer", [1, 2])  # reads layer 0 (sliding window) or layer 1 (full)
def test_attention_rows_equal_the_eager_attention_of_the_previous_layer(layer):
    model = tiny_gemma3(0, "eager")
    kw = inputs([0, 1])
    probe = type("P", (AttentionProbe,), {"seen": []})
    with tokenreduce.apply(model, Step("llm_layer", probe(4), layer=layer)), torch.no_grad():
        model(**kw)
    (ctx,) = probe.seen
    with torch.no_grad():
        weights = model(**kw, output_attentions=True).attentions[layer - 1]  # (B, H, L, L)
    for r in range(2):
        img = (kw["input_ids"][r] == GEMMA_IMAGE).nonzero()[:, 0]
        want = weights[r, :, -1, img].mean(0)
        torch.testing.assert_close(ctx.attention[r, 0, : len(img)], want, atol=1e-6, rtol=1e-5)
    if layer == 1:  # the window (12) hides the first image from the last token
        assert float(ctx.attention[1, 0, :GEMMA_TOKENS].abs().max()) == 0.0


def recompute(model, kw: dict, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by a full forward of the growing sequence (no cache), token types padded along."""
    seq, am, types = kw["input_ids"], kw["attention_mask"], kw["token_type_ids"]
    out = []
    for _ in range(new):
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            last = model(
                input_ids=seq, attention_mask=am, position_ids=pos, token_type_ids=types,
                pixel_values=kw["pixel_values"], use_cache=False,
            ).logits[:, -1]
        out.append(last)
        nxt = last.argmax(-1, keepdim=True)
        seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
        types = torch.cat([types, torch.zeros_like(nxt)], 1)
    return seq[:, kw["input_ids"].shape[1] :], torch.stack(out, 1)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_generate_with_cache_equals_recompute_through_all_stages(positions):
    pipe = checks.pipeline(
        Step("vision_encoder", create("pool", 9)),
        Step("projector", create("random", 6, seed=3)),
        # Selections by position only: a full forward of the grown sequence picks the same tokens.
        Step("llm_layer", create("random", 0.5, seed=2), layer=1),
        Step("llm_layer", create("random", 3, seed=4), layer=3),
        positions=positions,
    )
    kw = inputs([0, 1])
    with tokenreduce.apply(MODEL, pipe):
        toks, lg = checks.greedy_generate(MODEL, kw)
        ref_toks, ref_lg = recompute(MODEL, kw, checks.NEW_TOKENS)
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(lg, ref_lg, atol=5e-5, rtol=1e-4)
