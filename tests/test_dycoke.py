"""DyCoke: TTM and the decode-time KV pruning reproduce the official code; conformance, properties,
errors; both halves in tiny LLaVA-OneVision and Qwen2.5-VL video models (generate() against a full
recomputation, batch against rows alone, restoration)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import adapter_checks as checks
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import (  # noqa: F401 - one_thread is a fixture
    VIDEO_TOKEN,
    media_prompt,
    one_thread,
    qwen_vl_inputs,
    seeded_pixels,
    tiny_onevision,
    tiny_qwen2_5_vl,
)
from test_adapter_onevision import video_features

import tokenreduce
from tokenreduce import ConfigError, MissingContextError, Pipeline, ReductionContext, Step
from tokenreduce.errors import InvalidInputError
from tokenreduce.testing import check_reducer
from tokenreduce_plugins.adapters import compat
from tokenreduce_plugins.dycoke import (
    PREVIOUS_ATTENTION,
    DyCoke,
    DyCokeKV,
    frame_references,
    official_budget,
    published_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "dycoke.npz"
DATA = dict(np.load(FIXTURE))
CASES = sorted({int(k.split("_")[0][4:]) for k in DATA})
TTM_CASES = [k for k in CASES if str(DATA[f"case{k}_variant"]) == "ttm"]
KV_CASES = [k for k in CASES if str(DATA[f"case{k}_variant"]) == "kv"]


def get(k: int, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(DATA[f"case{k}_{key}"]))


def video_context(frames: int, per_frame: int) -> ReductionContext:
    side = math.isqrt(per_frame)
    grid = (frames * side, side) if side * side == per_frame else (frames * per_frame, 1)
    return ReductionContext(frames=frames, grid=grid)


# -- the official code's output (fixtures/baselines/README.md) --------------------------------------------------


@pytest.mark.parametrize("k", TTM_CASES)
def test_ttm_keeps_the_official_tokens(k):
    t, p = int(DATA[f"case{k}_frames"]), int(DATA[f"case{k}_tokens_per_frame"])
    tokens, kept = get(k, "tokens"), get(k, "kept")
    budget = official_budget(t, p, float(DATA[f"case{k}_dycoke_k"]))
    assert budget == kept.shape[1] == int(DATA[f"case{k}_budget"])
    out = DyCoke(budget)(tokens, context=video_context(t, p))
    want = torch.sort(kept, dim=1).values
    assert out.indices.tolist() == want.tolist()
    # Pruning only: the kept features are the input tokens (the official output, in our order).
    assert torch.equal(out.tokens, torch.stack([tokens[b, want[b]] for b in range(len(want))]))


@pytest.mark.parametrize("k", KV_CASES)
def test_kv_pruning_decides_and_keeps_as_the_official_cache(k):
    # One reducer call per decode step, on the head-averaged row over the official image range.
    att, s0 = get(k, "attention"), int(DATA[f"case{k}_prompt_length"])
    start, length = int(DATA[f"case{k}_image_start"]), int(DATA[f"case{k}_image_length"])
    reducer = DyCokeKV(1 - float(DATA[f"case{k}_dycoke_p"]), stage="llm_layer")
    previous, refreshed = None, 0
    for s in range(att.shape[0]):
        row = att[s, :, : s0 + s + 1].mean(0)[start : start + length].view(1, 1, -1)
        out = reducer(torch.zeros(1, length, 4), context=ReductionContext(attention=row, extra={PREVIOUS_ATTENTION: previous}))
        previous = row[:, 0]
        torch.testing.assert_close(out.info["similarity"][0], get(k, "similarity")[s], atol=1e-5, rtol=0)
        assert bool(out.info["refresh"][0]) == bool(get(k, "refresh")[s]), f"step {s}"
        if bool(get(k, "refresh")[s]):
            refreshed += 1
            cache = get(k, "kv_cache")[s]
            image = cache[(cache >= start) & (cache < start + length)] - start
            assert out.indices[0].tolist() == sorted(image.tolist()), f"step {s}"
            # Everything outside the image range is kept by the official cache.
            assert int(((cache >= 0) & ((cache < start) | (cache >= start + length))).sum()) == s0 + s + 1 - length
    assert 0 < refreshed < att.shape[0]  # both branches were exercised


def test_official_budget_counts_the_official_frames():
    # 32 frames x 196 tokens, K = 0.7: anchors 0, 4, ..., 28 and 30 (the window range stops early).
    refs = frame_references(32)
    assert [f for f, r in enumerate(refs) if r < 0] == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    assert refs[1] == 0 and refs[2] == 0 and refs[3] == 2 and refs[26] == 24 and refs[31] == 30
    assert official_budget(32, 196, 0.7) == 9 * 196 + 23 * 58 == 3098


def test_published_pipeline_is_the_yaml_example():
    example = Path(__file__).parents[1] / "docs" / "examples" / "reducers" / "dycoke.yaml"
    text = example.read_text()
    assert "video_budget: per_video" in text and "budget: 3098" in text and "layer: 3, reducer: dycoke-kv" in text
    pipe = published_pipeline()
    (ttm, kv) = pipe.steps
    assert pipe.video_budget == "per_video" and ttm.reducer.budget == 3098 and kv.layer == 3
    assert kv.reducer.budget == 1 - 0.8 and kv.reducer.params.similarity_threshold == 0.9


# -- conformance kit ------------------------------------------------------------------------------------------


def frames_context(tokens, valid, stage):
    n = tokens.shape[1]
    t = max(d for d in range(1, 9) if n % d == 0)
    return ReductionContext(frames=t, grid=(n, 1))


def attention_context(tokens, valid, stage):
    att = torch.softmax(tokens.float().sum(-1) + tokens.float()[..., 0], dim=1)
    return ReductionContext(attention=att.unsqueeze(1))


@pytest.mark.parametrize("stage", ["projector", "vision_encoder"])
def test_ttm_conformance(stage):
    check_reducer(DyCoke, stage=stage, context_factory=frames_context, max_examples=12)


def test_kv_conformance():
    check_reducer(DyCokeKV, stage="llm_layer", context_factory=attention_context, max_examples=12)


GRAPH_SAFE_CHECK = """
import torch
from tokenreduce import ReductionContext
from tokenreduce.sync import no_host_sync
from tokenreduce_plugins.dycoke import PREVIOUS_ATTENTION, DyCoke, DyCokeKV

x = torch.randn(2, 32, 6, generator=torch.Generator().manual_seed(0))
valid = torch.ones(2, 32, dtype=torch.bool)
att = torch.softmax(torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
ttm = ReductionContext(stage="projector", frames=8, grid=(16, 2), uniform_count=17)
kv = ReductionContext(stage="llm_layer", attention=att, extra={PREVIOUS_ATTENTION: att[:, 0].flip(-1)}, uniform_count=8)

def run():
    return (DyCoke(17).reduce(x, torch.full((2,), 17), valid, ttm), DyCokeKV(8).reduce(x, torch.full((2,), 8), valid, kv))

want = run()
with no_host_sync():
    got = run()
assert DyCoke.graph_safe and DyCokeKV.graph_safe
assert all(torch.equal(w.indices, g.indices) for w, g in zip(want, got))
assert torch.equal(want[1].info["refresh"], got[1].info["refresh"])
print("ok")
"""


def test_both_halves_read_no_device_value_given_a_uniform_count():
    # graph_safe: reduce() with context.uniform_count runs under no_host_sync (CUDA-graph capturable).
    # In a child process: no_host_sync patches torch process-wide, and leaves torch.tensor() of a list
    # of 0-d tensors broken after it (seen with the tokenreduce.sync of this tree).
    done = subprocess.run([sys.executable, "-c", GRAPH_SAFE_CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# -- properties ---------------------------------------------------------------------------------------------


def similarity_to_reference(tokens: torch.Tensor, t: int, p: int) -> tuple[torch.Tensor, list[int]]:
    """(T, P) cosine similarity of each token with the same place in its frame's reference."""
    refs = frame_references(t)
    x = torch.nn.functional.normalize(tokens[0].view(t, p, -1).double(), dim=-1)
    ref = [r if r >= 0 else (f - 1 if f else min(1, t - 1)) for f, r in enumerate(refs)]
    return (x * x[ref]).sum(-1), refs


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(t=st.integers(1, 12), p=st.integers(1, 9), frac=st.floats(0.0, 1.0), seed=st.integers(0, 999))
def test_ttm_budget_split_and_least_similar_tokens(t, p, frac, seed):
    tokens = torch.randn(1, t * p, 6, generator=torch.Generator().manual_seed(seed))
    n = t * p
    budget = max(1, round(frac * n))
    out = DyCoke(budget)(tokens, context=ReductionContext(frames=t, grid=(n, 1)))
    keep = out.keep_mask[0].view(t, p)
    per_frame = keep.sum(1).tolist()
    sim, refs = similarity_to_reference(tokens, t, p)
    anchors = [f for f in range(t) if refs[f] < 0]
    compared = [f for f in range(t) if refs[f] >= 0]
    # The anchors first, whole; the rest shared equally, the earlier frames taking the remainder.
    level, others = (compared, anchors) if budget >= len(anchors) * p else (anchors, compared)
    left = budget - (len(anchors) * p if level is compared else 0)
    base, extra = divmod(left, len(level)) if level else (0, 0)
    assert [per_frame[f] for f in level] == [base + (i < extra) for i in range(len(level))]
    assert all(per_frame[f] == (p if level is compared else 0) for f in others)
    # In every frame the kept tokens are the least similar to its reference.
    for f in range(t):
        if 0 < per_frame[f] < p:
            assert sim[f][keep[f]].max() <= sim[f][~keep[f]].min() + 1e-9


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(t=st.integers(1, 10), p=st.integers(1, 6), seed=st.integers(0, 999))
def test_ttm_larger_budgets_keep_supersets(t, p, seed):
    tokens = torch.randn(2, t * p, 5, generator=torch.Generator().manual_seed(seed))
    ctx = ReductionContext(frames=t, grid=(t * p, 1))
    kept = [DyCoke(b)(tokens, context=ctx).keep_mask for b in range(1, t * p + 1)]
    for small, big in zip(kept, kept[1:]):
        assert bool((big | ~small).all())


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(n=st.integers(2, 40), ratio=st.floats(0.05, 0.95), thr=st.floats(-1.0, 1.0), seed=st.integers(0, 999),
       first=st.booleans())
def test_kv_refreshes_when_the_attention_changed_and_keeps_its_top(n, ratio, thr, seed, first):
    gen = torch.Generator().manual_seed(seed)
    att = torch.softmax(3 * torch.randn(2, n, generator=gen), dim=1)
    prev = None if first else torch.softmax(3 * torch.randn(2, n, generator=gen), dim=1)
    out = DyCokeKV(ratio, similarity_threshold=thr)(
        torch.randn(2, n, 3, generator=gen), context=ReductionContext(attention=att[:, None], extra={PREVIOUS_ATTENTION: prev})
    )
    k = max(1, math.floor(ratio * n))
    if k == n:
        return  # the identity: every token is attended anyway
    sim = torch.zeros(2) if prev is None else torch.nn.functional.cosine_similarity(att, prev, dim=1)
    assert out.info["refresh"].tolist() == (sim < thr).tolist()
    for b in range(2):
        assert set(out.indices[b].tolist()) == set(torch.topk(att[b], k).indices.tolist())


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_parameters_and_inputs_are_refused_clearly():
    with pytest.raises(ConfigError, match="similarity_threshold"):
        DyCokeKV(0.2, similarity_threshold=1.5)
    with pytest.raises(ConfigError, match="window"):
        DyCoke(10, window=4)
    tokens = torch.randn(1, 12, 4)
    with pytest.raises(MissingContextError, match="frames"):
        DyCoke(6)(tokens, context=ReductionContext(grid=(12, 1)))
    with pytest.raises(InvalidInputError, match="frames=5"):
        DyCoke(6)(tokens, context=ReductionContext(frames=5, grid=(12, 1)))
    with pytest.raises(InvalidInputError, match="frames must be an int >= 1"):
        DyCoke(6)(tokens, context=ReductionContext(frames=0, grid=(12, 1)))
    with pytest.raises(InvalidInputError, match="grid"):  # an earlier step removed tokens: no whole frames
        DyCoke(6)(tokens, context=ReductionContext(frames=3, grid=(4, 4)))
    with pytest.raises(InvalidInputError, match="previous_attention"):
        DyCokeKV(0.5)(tokens, context=ReductionContext(attention=torch.rand(1, 1, 12), extra={PREVIOUS_ATTENTION: torch.rand(1, 7)}))


def test_decode_step_configurations_that_cannot_run_are_refused():
    model = tiny_onevision(0)
    kv = Step("llm_layer", DyCokeKV(0.2), layer=2)
    with pytest.raises(ConfigError, match="prefill llm_layer steps"):
        tokenreduce.patch(model, Pipeline([Step("llm_layer", tokenreduce.create("fastv", 0.5), layer=1), kv]))
    with pytest.raises(ConfigError, match="out of range"):
        tokenreduce.patch(model, Pipeline([Step("llm_layer", DyCokeKV(0.2), layer=9)]))
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="sdpa"):
        tokenreduce.patch(model, Pipeline([kv]))
    # A refused patch leaves nothing behind.
    assert not checks.our_hooks(model)


# -- in models ----------------------------------------------------------------------------------------------

FRAMES, NEW, KV_LAYER = 8, 5, 2


def onevision_inputs(rows: list[int], frames: int = FRAMES) -> dict:
    """One ``frames``-frame video per row (2x2 pooled tokens per frame + newline), left-padded."""
    ids, mask = media_prompt([[(VIDEO_TOKEN, frames * 4 + 1)] for _ in rows], row_ids=rows)
    pixels = torch.stack([seeded_pixels((frames, 3, 16, 16), r, 0) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixels}


def qwen_inputs(rows: list[int]) -> dict:
    """One 8-temporal-patch video of 2x2 merged tokens per row (row r: its own text and pixels)."""
    parts = [qwen_vl_inputs([[]], [[(FRAMES, 4, 4)]], seed=r, text=3 + r) for r in rows]
    length = max(p["input_ids"].shape[1] for p in parts)

    def pad(x):
        return torch.nn.functional.pad(x, (length - x.shape[1], 0))

    return {
        "input_ids": torch.cat([pad(p["input_ids"]) for p in parts]),
        "attention_mask": torch.cat([pad(p["attention_mask"]) for p in parts]),
        "mm_token_type_ids": torch.cat([pad(p["mm_token_type_ids"]) for p in parts]),
        "pixel_values_videos": torch.cat([p["pixel_values_videos"] for p in parts]),
        "video_grid_thw": torch.cat([p["video_grid_thw"] for p in parts]),
    }


def dycoke_pipeline(kv_budget=0.25, threshold=0.9, ttm=True, layer=KV_LAYER) -> Pipeline:
    steps = [Step("projector", DyCoke(official_budget(FRAMES, 4, 0.7)))] if ttm else []
    steps.append(Step("llm_layer", DyCokeKV(kv_budget, similarity_threshold=threshold), layer=layer))
    return Pipeline(steps, video_budget="per_video")


def generate(model, kw: dict, new: int = NEW):
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, kw["input_ids"].shape[1] :], torch.stack(out.logits, 1)


def llava_full(model, kw: dict, new: torch.Tensor):
    am = torch.cat([kw["attention_mask"], torch.ones_like(new)], 1)
    rest = {k: v for k, v in kw.items() if k not in ("input_ids", "attention_mask")}
    ids = torch.cat([kw["input_ids"], new], 1)
    return model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0), use_cache=False, **rest)


def qwen_full(model, kw: dict, new: torch.Tensor):
    out = dict(kw)
    out["input_ids"] = torch.cat([kw["input_ids"], new], 1)
    out["attention_mask"] = torch.cat([kw["attention_mask"], torch.ones_like(new)], 1)
    out["mm_token_type_ids"] = torch.cat([kw["mm_token_type_ids"], torch.zeros_like(new, dtype=torch.int)], 1)
    return model(**out, use_cache=False)


def recompute_with_pruned_rows(model, handle, full_forward, kw: dict, toks: torch.Tensor, attn: str, layer: int):
    """The documented semantics: one no-cache forward over prompt + generated tokens (through the
    patch, so the prompt is reduced as in generate()), where at layers >= K the row of the token of
    decode step s excludes the visual cache entries that step pruned (from its record)."""
    decode = [r for r in handle.records if r.reducer == "dycoke-kv"]
    assert len(decode) == toks.shape[1] - 1
    decoder = model.model.language_model
    seen = {}
    hooks = [decoder.register_forward_pre_hook(lambda m, a, k: seen.update(am=k.get("attention_mask")), with_kwargs=True)]

    def masked(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        b, n = hidden.shape[:2]
        am = seen["am"].bool() if isinstance(seen["am"], torch.Tensor) else torch.ones(b, n, dtype=torch.bool)
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) & am[:, None, :]
        for s, rec in enumerate(decode):
            for r in range(b):
                allowed[r, n - len(decode) + s, rec.info[r]["pruned_positions"]] = False
        allowed = (allowed | torch.eye(n, dtype=torch.bool))[:, None]
        mask = allowed if attn == "sdpa" else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return args, {**kwargs, "attention_mask": mask}

    hooks += [decoder.layers[i].register_forward_pre_hook(masked, with_kwargs=True) for i in range(layer, len(decoder.layers))]
    try:
        with torch.no_grad():
            logits = full_forward(model, kw, toks[:, :-1]).logits
    finally:
        for h in hooks:
            h.remove()
    return logits[:, -toks.shape[1] :]


@pytest.mark.parametrize(("attn", "threshold"), [("sdpa", 0.9), ("eager", 1.0)])
def test_onevision_generate_equals_the_documented_recomputation(attn, threshold):
    model = tiny_onevision(0, attn)
    kw = onevision_inputs([0, 1])
    with tokenreduce.apply(model, dycoke_pipeline(threshold=threshold)) as handle:
        toks, lg = generate(model, kw)
        ttm = [r for r in handle.records if r.reducer == "dycoke"]
        assert ttm[0].tokens_before == [32, 32] and ttm[0].tokens_after == [17, 17]
        decode = [r for r in handle.records if r.reducer == "dycoke-kv"]
        # The first decode step always re-selects; threshold 1.0 re-selects at every step.
        assert all(r.info[0]["refresh"] for r in decode[: len(decode) if threshold == 1.0 else 1])
        assert all(r.tokens_before == [18, 18] for r in decode)  # 17 kept video tokens + the newline
        ref = recompute_with_pruned_rows(model, handle, llava_full, kw, toks, attn, KV_LAYER)
    torch.testing.assert_close(lg, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(ref.argmax(-1), toks)


def test_onevision_batch_equals_rows_alone_and_prefill_is_stock():
    model = tiny_onevision(0)
    kw = onevision_inputs([0, 1])
    kv_only = dycoke_pipeline(ttm=False, threshold=1.0)
    with torch.no_grad():
        stock = model(**kw).logits
    with tokenreduce.apply(model, kv_only) as handle:
        with torch.no_grad():
            assert torch.equal(model(**kw).logits, stock)  # the decode-time step leaves the prompt alone
        toks, lg = generate(model, kw)
        for rec in handle.records:  # each step attends to floor(0.25 * 33) of each row's 33 video entries
            assert rec.tokens_before == [33, 33] and rec.tokens_after == [8, 8]
            for r in (0, 1):
                pruned = rec.info[r]["pruned_positions"]
                assert len(pruned) == 25 and bool((kw["input_ids"][r, pruned] == VIDEO_TOKEN).all())
    with tokenreduce.apply(model, kv_only):
        for r in (0, 1):
            t1, l1 = generate(model, onevision_inputs([r]))
            assert torch.equal(t1[0], toks[r])
            torch.testing.assert_close(l1[0], lg[r], atol=1e-4, rtol=1e-4)
    stock_toks, stock_lg = generate(model, kw)
    assert not torch.allclose(stock_lg[:, 1:], lg[:, 1:], atol=1e-3)  # decoding did change


def test_onevision_decode_pruning_only_for_prompts_prefilled_under_the_patch():
    model = tiny_onevision(0)
    kw = onevision_inputs([0])
    with torch.no_grad():
        name = compat.cache_name(type(model).forward)  # the cache keyword of this transformers release
        pre = model(**kw, use_cache=True)
        nxt = pre.logits[:, -1:].argmax(-1)
        step = {"input_ids": nxt, "attention_mask": torch.ones(1, kw["input_ids"].shape[1] + 1, dtype=torch.long)}
        cache2 = copy.deepcopy(compat.output_cache(pre))
        stock = model(**step, **{name: compat.output_cache(pre)}).logits
        with tokenreduce.apply(model, dycoke_pipeline(ttm=False)) as handle:
            same = model(**step, **{name: cache2}).logits  # the prompt was prefilled unpatched
            assert torch.equal(same, stock) and not handle.records
            # Prefilled under the patch: the decode step is pruned.
            pre2 = model(**kw, use_cache=True)
            pruned = model(**step, **{name: compat.output_cache(pre2)}).logits
            assert [r.reducer for r in handle.records] == ["dycoke-kv"]
    assert not torch.allclose(pruned, stock, atol=1e-4)
    # A prompt without visual tokens decodes as stock.
    text = {"input_ids": kw["input_ids"][:, :3], "attention_mask": kw["attention_mask"][:, :3]}  # bos + text
    with tokenreduce.apply(model, dycoke_pipeline(ttm=False)) as handle:
        patched = generate(model, text)
        assert not handle.records
    stock_text = generate(model, text)
    assert torch.equal(patched[0], stock_text[0]) and torch.equal(patched[1], stock_text[1])


def test_onevision_patch_then_remove_restores_exactly():
    model = tiny_onevision(0)
    kw = onevision_inputs([0, 1])
    with torch.no_grad():
        before = model(**kw).logits
    gen_before = generate(model, kw)
    handle = tokenreduce.patch(model, dycoke_pipeline())
    assert generate(model, kw)[0].shape == gen_before[0].shape
    handle.remove()
    handle.remove()
    assert not checks.our_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, before)
    after = generate(model, kw)
    assert torch.equal(after[0], gen_before[0]) and torch.equal(after[1], gen_before[1])


@pytest.mark.parametrize("stage", ["projector", "vision_encoder"])
def test_onevision_ttm_keeps_what_the_reducer_keeps_on_the_stock_frames(stage):
    model = tiny_onevision(0)
    kw = onevision_inputs([1])
    budget = official_budget(FRAMES, 4, 0.7)
    with tokenreduce.apply(model, Pipeline([Step(stage, DyCoke(budget))], video_budget="per_video")) as handle:
        with torch.no_grad():
            model(**kw)
        (rec,) = handle.records
    if stage == "projector":
        with torch.no_grad():
            feats = video_features(model, kw["pixel_values_videos"])[:, :-1]  # the newline is not a frame token
        direct = DyCoke(budget)(feats, context=ReductionContext(frames=FRAMES, grid=(FRAMES * 2, 2)))
        assert rec.indices[0].tolist() == direct.indices[0].tolist()
    assert rec.tokens_after == [budget]


@pytest.mark.parametrize("build", [tiny_onevision, tiny_qwen2_5_vl])
def test_per_frame_budgets_refuse_ttm(build):
    with pytest.raises(MissingContextError, match="frames"):
        tokenreduce.patch(build(0), Pipeline([Step("projector", DyCoke(10))], video_budget="per_frame"))


def test_qwen_video_generate_equals_recomputation_and_rows_alone():
    model = tiny_qwen2_5_vl(0)
    kw = qwen_inputs([0, 1])
    pipe = dycoke_pipeline(threshold=1.0, layer=1)
    with tokenreduce.apply(model, pipe) as handle:
        toks, lg = generate(model, kw)
        assert [r.tokens_after for r in handle.records if r.reducer == "dycoke"] == [[17, 17]]
        ref = recompute_with_pruned_rows(model, handle, qwen_full, kw, toks, "sdpa", 1)
        torch.testing.assert_close(lg, ref, atol=1e-4, rtol=1e-4)
        for r in (0, 1):
            t1, l1 = generate(model, qwen_inputs([r]))
            assert torch.equal(t1[0], toks[r])
            torch.testing.assert_close(l1[0], lg[r], atol=1e-4, rtol=1e-4)


def test_qwen_ttm_runs_on_merge_groups_at_the_vision_encoder():
    model = tiny_qwen2_5_vl(0)
    kw = qwen_inputs([0, 1])
    budget = official_budget(FRAMES, 4, 0.7)
    with torch.no_grad():
        with tokenreduce.apply(model, Pipeline([Step("vision_encoder", DyCoke(budget))], video_budget="per_video")) as handle:
            enc = model(**kw).logits
            (rec,) = handle.records
        with tokenreduce.apply(model, Pipeline([Step("projector", DyCoke(budget))], video_budget="per_video")) as handle:
            proj = model(**kw).logits
            (rec_p,) = handle.records
    assert rec.tokens_before == [32, 32] and rec.tokens_after == [budget, budget]
    assert enc.shape == proj.shape  # the same number of tokens removed at either stage
    assert all(len(i) == budget for i in rec_p.indices)
