"""VScan: the official selection reproduced, conformance, scan/merge properties, errors, models."""

from __future__ import annotations

import math
from pathlib import Path

import adapter_checks as checks
import numpy as np
import pytest
import test_adapter_llava as llava_case
import test_adapter_llava_next as llava_next_case
import test_adapter_onevision as onevision_case
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from models import (  # noqa: F401
    IMAGE_TOKEN,
    one_thread,
    qwen_vl_inputs,
    tiny_llava,
    tiny_qwen2_5_vl,
    two_image_batch,
)
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

import tokenreduce as tr
from tokenreduce import ConfigError, MissingContextError, Pipeline, ReductionContext, Stage, Step, create
from tokenreduce.errors import InvalidInputError
from tokenreduce.testing import check_reducer
from tokenreduce_plugins.adapters.decoder import attention_rows
from tokenreduce_plugins.vscan import SHALLOW_KEY, VScan, rank_in_window, window_ids

FIXTURE = Path(__file__).parent / "fixtures" / "baselines" / "vscan.npz"
EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "reducers" / "vscan.yaml"


def scan(budget, tokens, cls_attention, shallow=None, grid=None, mask=None, stage="projector", **params):
    extra = {} if shallow is None else {SHALLOW_KEY: shallow}
    ctx = ReductionContext(cls_attention=cls_attention, grid=grid, extra=extra)
    return create("vscan", budget, stage=stage, **params)(tokens, mask=mask, context=ctx)


# -- the official code's output (fixtures/baselines/README.md) --------------------------------------


def _fixture():
    data = dict(np.load(FIXTURE))
    cases = sorted({int(k.split("_")[0][4:]) for k in data})
    return data, cases


def _get(data, k, key):
    return torch.from_numpy(np.asarray(data[f"case{k}_{key}"]))


ENCODER_CASES = [k for k in _fixture()[1] if str(_fixture()[0][f"case{k}_variant"]) in ("llava", "qwen")]
LLM_CASES = [k for k in _fixture()[1] if str(_fixture()[0][f"case{k}_variant"]) == "llm"]


@pytest.mark.parametrize("k", ENCODER_CASES)
def test_encoder_scans_and_merging_match_the_official_code(k):
    # LLaVA cases: encode_images (global + local scans, then token_merging after the
    # projector); Qwen cases: window_selection + global top-k + token_merging, including
    # local counts that the windows do not divide (38 over 12 windows, 60 over 25, 50 over 16).
    data, _ = _fixture()
    g = lambda key: _get(data, k, key)  # noqa: E731
    out = scan(
        int(data[f"case{k}_budget"]),
        g("tokens"),
        g("cls_attention"),
        shallow=g("shallow_cls_attention"),
        grid=tuple(g("grid").tolist()),
        window_size=int(data[f"case{k}_window_size"]),
    )
    assert out.indices.tolist() == g("kept").tolist()
    local = [out.info["local"][b].nonzero()[:, 0].tolist() for b in range(out.indices.shape[0])]
    assert local == g("local").tolist()
    assert out.info["local_signal"] == SHALLOW_KEY
    torch.testing.assert_close(out.tokens, g("features"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", LLM_CASES)
def test_llm_stage_matches_official_layer_prune_through_the_adapter_attention_rows(k):
    # The official layer_prune ranks image tokens by the last prompt token's attention at
    # layer 16 (that layer's own q/k, RoPE, head mean). The same row, recomputed by the
    # decoder adapter's attention_rows on a transformers LlamaDecoderLayer with the
    # fixture's weights, gives VScan's llm_layer step the same kept tokens.
    data, _ = _fixture()
    g = lambda key: _get(data, k, key)  # noqa: E731
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                      num_hidden_layers=17, rope_theta=10000.0)
    layer = LlamaDecoderLayer(cfg, 16).eval()
    with torch.no_grad():
        layer.input_layernorm.weight.copy_(g("input_layernorm_weight"))
        layer.self_attn.q_proj.weight.copy_(g("q_proj_weight"))
        layer.self_attn.k_proj.weight.copy_(g("k_proj_weight"))
        hidden = g("hidden")
        b, length, _ = hidden.shape
        cos_sin = LlamaRotaryEmbedding(cfg)(hidden, torch.arange(length).expand(b, length))
        last, keys_ok = torch.full((b, 1), length - 1), torch.ones(b, length, dtype=torch.bool)
        probs = attention_rows(layer, hidden, cos_sin, last, keys_ok)
    s, n = int(data[f"case{k}_image_start"]), int(data[f"case{k}_n_image"])
    reducer = create("vscan", int(data[f"case{k}_budget"]), stage="llm_layer")
    out = reducer(hidden[:, s : s + n], context=ReductionContext(attention=probs[:, :, s : s + n]))
    assert out.indices.tolist() == torch.sort(g("kept"), dim=1).values.tolist()
    torch.testing.assert_close(out.tokens, torch.stack([hidden[i, s + out.indices[i]] for i in range(b)]))


def test_without_the_shallow_signal_both_scans_read_cls_attention():
    data, _ = _fixture()
    k = ENCODER_CASES[0]
    tokens, deep = _get(data, k, "tokens"), _get(data, k, "cls_attention")
    out = scan(96, tokens, deep, grid=(24, 24))
    same = scan(96, tokens, deep, shallow=deep, grid=(24, 24))
    assert out.info["local_signal"] == "cls_attention"
    assert torch.equal(out.indices, same.indices) and torch.equal(out.tokens, same.tokens)


# -- conformance kit -------------------------------------------------------------------------------


def _score(tokens):
    # Deterministic in the tokens, ties where the kit duplicates tokens.
    return torch.softmax(tokens.float().sum(dim=-1) + tokens.float()[..., 0] * 0.5, dim=1)


def encoder_context(tokens, valid, stage):
    return ReductionContext(cls_attention=_score(tokens))


def llm_context(tokens, valid, stage):
    return ReductionContext(attention=_score(tokens).unsqueeze(1))


@pytest.mark.parametrize(
    ("stage", "params", "factory"),
    [
        ("projector", {}, encoder_context),
        ("vision_encoder", {"window_size": 2, "local_ratio": 0.7}, encoder_context),
        ("projector", {"merge": False, "window_size": 1}, encoder_context),
        ("llm_layer", {}, llm_context),
    ],
)
def test_conformance(stage, params, factory):
    check_reducer(VScan, stage=stage, params=params, context_factory=factory, max_examples=12)


def test_conformance_on_square_grids():
    def grid_context(tokens, valid, stage):
        side = math.isqrt(tokens.shape[1])
        return ReductionContext(cls_attention=_score(tokens), grid=(side, side))

    check_reducer(VScan, stage="projector", params={"window_size": 2}, context_factory=grid_context,
                  max_examples=10, square_grid=True)


# -- properties ------------------------------------------------------------------------------------


def official_qwen_local(scores: torch.Tensor, n_keep: int, h: int, w: int, ws: int) -> list[int]:
    """The official window_selection loop restated (one row, no padding), for comparison."""
    nh, nw = max(1, h // ws), max(1, w // ws)
    limit = math.ceil(n_keep / (nh * nw))
    counter, keep = {}, []
    for index in torch.sort(scores, descending=True, stable=True).indices.tolist():
        if len(keep) >= n_keep:
            break
        cell = (min(index // w // ws, nh - 1), min(index % w // ws, nw - 1))
        if counter.get(cell, 0) < limit:
            counter[cell] = counter.get(cell, 0) + 1
            keep.append(index)
    return sorted(keep)


grids = st.tuples(st.integers(1, 14), st.integers(1, 14))


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(grid=grids, ws=st.integers(1, 7), frac=st.floats(0.05, 1.0), ratio=st.floats(0.0, 1.0), seed=st.integers(0, 999))
def test_local_scan_is_the_official_greedy_window_rule_and_global_scan_the_rest(grid, ws, frac, ratio, seed):
    h, w = grid
    n = h * w
    assume(n > 1)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, n, 5, generator=gen)
    deep, shallow = torch.rand(1, n, generator=gen), torch.rand(1, n, generator=gen)
    t = max(1, min(n - 1, int(frac * n)))
    out = scan(t, tokens, deep, shallow=shallow, grid=(h, w), window_size=ws, local_ratio=ratio)
    local, glob = out.info["local"][0], out.info["global"][0]
    official = official_qwen_local(shallow[0], int(t * ratio), h, w, ws)
    assert local.nonzero()[:, 0].tolist() == official
    # Where the windows cannot hold L (the official code asserts), the global scan takes the rest.
    n_local = len(official)
    assert not bool((local & glob).any()) and int((local | glob).sum()) == t == out.indices.shape[1]
    # Global: the deep scores' top t - L among the tokens not taken locally.
    rest = deep[0].masked_fill(local, -1.0)
    assert set(glob.nonzero()[:, 0].tolist()) == set(torch.topk(rest, t - n_local).indices.tolist())


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(per_window=st.integers(1, 9), seed=st.integers(0, 999))
def test_llava_rule_each_of_the_16_windows_gives_its_top_tokens(per_window, seed):
    # The official LLaVA window_cls_selection: top-(L // 16) in each 6x6 window of 24x24.
    gen = torch.Generator().manual_seed(seed)
    shallow, deep = torch.rand(1, 576, generator=gen), torch.rand(1, 576, generator=gen)
    t = 2 * 16 * per_window
    out = scan(t, torch.randn(1, 576, 4, generator=gen), deep, shallow=shallow, grid=(24, 24), merge=False)
    local = out.info["local"][0].view(24, 24)
    grid_scores = shallow[0].view(24, 24)
    for i in range(4):
        for j in range(4):
            win = grid_scores[6 * i : 6 * i + 6, 6 * j : 6 * j + 6].reshape(-1)
            picked = local[6 * i : 6 * i + 6, 6 * j : 6 * j + 6].reshape(-1)
            assert set(picked.nonzero()[:, 0].tolist()) == set(torch.topk(win, per_window).indices.tolist())


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 60), b=st.integers(1, 3), ws=st.integers(1, 5), seed=st.integers(0, 999))
def test_window_rank_counts_each_window_in_descending_score_order(n, b, ws, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, n, generator=gen)
    valid = torch.rand(b, n, generator=gen) < 0.8
    window, n_windows = window_ids(n, None, ws, torch.device("cpu"))
    assert int(window.max()) < n_windows
    rank = rank_in_window(scores, window, valid, n_windows)
    for r in range(b):
        for wid in range(n_windows):
            members = ((window == wid) & valid[r]).nonzero()[:, 0]
            order = members[torch.sort(scores[r, members], descending=True, stable=True).indices]
            assert rank[r, order].tolist() == list(range(len(order)))
    assert bool((rank[~valid] == n).all())


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(n=st.integers(2, 50), t=st.integers(1, 49), seed=st.integers(0, 999),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_merging_averages_each_kept_token_with_the_tokens_merged_into_it(n, t, seed, dtype):
    t = min(t, n - 1)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, n, 6, generator=gen).to(getattr(torch, dtype))
    valid = torch.rand(2, n, generator=gen) < 0.9
    valid[:, : t + 1] = True
    out = scan(t, tokens, torch.rand(2, n, generator=gen), mask=valid, window_size=2)
    assign = out.info["assignment"]
    x = tokens.float()
    for r in range(2):
        k = int(out.counts[r])
        assert float(out.sizes[r].sum()) == float(valid[r].sum())
        for slot in range(k):
            group = (assign[r] == slot) & valid[r]
            assert int(out.indices[r, slot]) in group.nonzero()[:, 0].tolist()
            assert float(out.sizes[r, slot]) == float(group.sum())
            expect = x[r][group].mean(dim=0)
            expect = expect.to(tokens.dtype).float()
            torch.testing.assert_close(out.tokens[r, slot].float(), expect, rtol=2e-2, atol=2e-2)
        # Each dropped token went to its most cosine-similar kept token.
        kept = x[r, out.indices[r, :k]]
        sim = torch.nn.functional.normalize(x[r], dim=-1) @ torch.nn.functional.normalize(kept, dim=-1).T
        dropped = valid[r] & ~out.keep_mask[r]
        assert torch.equal(assign[r][dropped], sim[dropped].argmax(dim=1))


def test_merge_false_keeps_features_and_extreme_ratios_are_pure_scans():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 64, 8, generator=gen)
    deep, shallow = torch.rand(2, 64, generator=gen), torch.rand(2, 64, generator=gen)
    dropped = scan(10, tokens, deep, shallow=shallow, merge=False)
    assert torch.equal(dropped.tokens, torch.stack([tokens[r, dropped.indices[r]] for r in range(2)]))
    only_global = scan(10, tokens, deep, shallow=shallow, local_ratio=0.0)
    assert only_global.indices.tolist() == torch.sort(torch.topk(deep, 10).indices, dim=1).values.tolist()
    only_local = scan(16, tokens, deep, shallow=shallow, local_ratio=1.0, window_size=4)  # 2x2 windows, 4 each
    assert not bool(only_local.info["global"].any())
    assert (only_local.info["local"].view(2, 2, 4, 2, 4).sum(dim=(2, 4)) == 4).all()


def test_llm_stage_keeps_the_top_attention_tokens_and_ratio_budgets_floor():
    gen = torch.Generator().manual_seed(1)
    att = torch.rand(2, 1, 577, generator=gen)
    tokens = torch.randn(2, 577, 4, generator=gen)
    out = create("vscan", 0.5, stage="llm_layer")(tokens, context=ReductionContext(attention=att))
    assert out.indices.shape[1] == 288  # official int(0.5 * 577), not 289
    assert out.indices.tolist() == torch.sort(torch.topk(att[:, 0], 288).indices, dim=1).values.tolist()
    assert torch.equal(out.tokens, torch.stack([tokens[r, out.indices[r]] for r in range(2)]))
    enc = scan(0.167, torch.randn(1, 888, 4, generator=gen), torch.rand(1, 888, generator=gen))
    assert enc.indices.shape[1] == int(0.167 * 888)


def test_required_context_follows_the_stage():
    assert VScan.required_context == {"cls_attention", "attention"}
    assert create("vscan", 8, stage="projector").required_context == {"cls_attention"}
    assert create("vscan", 8, stage="vision_encoder").required_context == {"cls_attention"}
    assert create("vscan", 8, stage="llm_layer").required_context == {"attention"}
    step = Step("llm_layer", create("vscan", 8), layer=3)  # the step sets the stage
    assert step.reducer.required_context == {"attention"}
    assert VScan.attention_query == "last" and VScan.attention_layer == "current"


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [({"local_ratio": 1.5}, "local_ratio"), ({"local_ratio": -0.1}, "local_ratio"), ({"window_size": 0}, "window_size"),
     ({"window_size": True}, "window_size"), ({"windowsize": 4}, "windowsize")],
)
def test_bad_parameters_name_the_parameter(params, field):
    with pytest.raises(ConfigError, match=field):
        create("vscan", 8, **params)


def test_bad_context_gives_clear_errors():
    tokens = torch.randn(1, 16, 4)
    with pytest.raises(MissingContextError, match="cls_attention"):
        create("vscan", 4, stage="projector")(tokens)
    with pytest.raises(MissingContextError, match="attention"):
        create("vscan", 4, stage="llm_layer")(tokens)
    with pytest.raises(InvalidInputError, match="cls_attention"):
        scan(4, tokens, torch.rand(1, 15))
    with pytest.raises(InvalidInputError, match="grid"):
        scan(4, tokens, torch.rand(1, 16), grid=(3, 5))
    with pytest.raises(InvalidInputError, match=SHALLOW_KEY):
        scan(4, tokens, torch.rand(1, 16), shallow=torch.rand(1, 9))
    with pytest.raises(InvalidInputError, match="attention"):
        create("vscan", 4, stage="llm_layer")(tokens, context=ReductionContext(attention=torch.rand(1, 16)))


# -- YAML and models -------------------------------------------------------------------------------


def test_yaml_example_is_the_published_two_stage_setting():
    pipe = tr.load_config(EXAMPLE)
    assert [(s.stage, s.reducer.name, s.reducer.budget, s.layer) for s in pipe] == [
        (Stage.PROJECTOR, "vscan", 96, None),
        (Stage.LLM_LAYER, "vscan", 32, 16),
    ]
    assert pipe.steps[0].reducer.params.window_size == 6 and pipe.steps[0].reducer.params.local_ratio == 0.5


@pytest.mark.usefixtures("one_thread")
def test_two_stage_pipeline_runs_in_llava_generate_under_sdpa_and_matches_eager_signals():
    model = tiny_llava(seed=0, attn_implementation="sdpa")
    twin = tiny_llava(seed=0, attn_implementation="eager")
    kw = two_image_batch()
    plain = model.generate(**kw, max_new_tokens=3, do_sample=False)
    pipe = Pipeline(
        [Step("projector", create("vscan", 8, window_size=3)), Step("llm_layer", create("vscan", 4), layer=2)]
    )
    with tr.apply(model, pipe) as handle:
        out = model.generate(**kw, max_new_tokens=3, do_sample=False)
        records = list(handle.records)
        again = model.generate(**kw, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, again) and out.shape[1] == kw["input_ids"].shape[1] + 3
    assert [(r.stage.value, r.tokens_before, r.tokens_after) for r in records] == [
        ("projector", [36, 36], [8, 8]),
        ("llm_layer", [8, 8], [4, 4]),
    ]
    # Encoder side: the same picks as VScan on the eager [CLS] attention of layer -2 and
    # the projected features, on the 6x6 grid (2x2 windows of 3x3).
    with torch.no_grad():
        vis = twin.model.vision_tower(kw["pixel_values"], output_attentions=True, output_hidden_states=True)
        att = vis.attentions[-2][:, :, 0, 1:].mean(dim=1)
        feats = twin.model.multi_modal_projector(vis.hidden_states[-2][:, 1:])
    ref = scan(8, feats, att, grid=(6, 6), window_size=3)
    assert [i.tolist() for i in records[0].indices] == ref.indices.tolist()
    assert torch.equal(model.generate(**kw, max_new_tokens=3, do_sample=False), plain)  # restored


@pytest.mark.usefixtures("one_thread")
def test_llm_step_picks_the_eager_top_tokens_of_its_own_layer():
    # attention_layer "current": the step at layer 2 ranks by layer 2's own attention map.
    model = tiny_llava(seed=0, attn_implementation="sdpa")
    twin = tiny_llava(seed=0, attn_implementation="eager")
    kw = two_image_batch()
    with tr.apply(model, Step("llm_layer", create("vscan", 18), layer=2)) as handle:
        model.generate(**kw, max_new_tokens=2, do_sample=False)
        kept = [set(i.tolist()) for i in handle.records[0].indices]
    with torch.no_grad():
        att = twin(**kw, output_attentions=True).attentions[2][:, :, -1, :].mean(dim=1)
    img = kw["input_ids"] == IMAGE_TOKEN
    ref = att[img].view(2, 36)
    for row in range(2):
        assert kept[row] == set(torch.topk(ref[row], 18).indices.tolist())


@pytest.mark.usefixtures("one_thread")
def test_llava_adapter_gives_the_local_scan_the_layer_5_cls_attention():
    # Official LLaVA code: local scan by attentions[5], global scan by attentions[-2], both
    # the head-averaged [CLS] row. The adapter recomputes layer 5's row under SDPA only
    # because VScan declares shallow_cls_layer = 5.
    assert VScan.shallow_cls_layer == 5
    # An 8-layer CLIP tower, so encoder layer 5 exists (selected layer -2 = layer 6).
    model, twin = (tiny_llava(0, attn, vision_layers=8) for attn in ("sdpa", "eager"))
    kw = two_image_batch()
    pipe = Pipeline([Step("projector", create("vscan", 12, window_size=3))])
    with tr.apply(model, pipe) as handle:
        model(**kw)
        rec = handle.records[0]
    with torch.no_grad():
        vis = twin.model.vision_tower(kw["pixel_values"], output_attentions=True, output_hidden_states=True)
        shallow = vis.attentions[5][:, :, 0, 1:].mean(dim=1)
        deep = vis.attentions[-2][:, :, 0, 1:].mean(dim=1)
        feats = twin.model.multi_modal_projector(vis.hidden_states[-2][:, 1:])
    ref = scan(12, feats, deep, shallow=shallow, grid=(6, 6), window_size=3)
    assert [i.tolist() for i in rec.indices] == ref.indices.tolist()
    assert [info["local_signal"] for info in rec.info] == [SHALLOW_KEY] * 2
    # The shallow signal decides: the deep layer alone picks other tokens here.
    assert scan(12, feats, deep, grid=(6, 6), window_size=3).indices.tolist() != ref.indices.tolist()


FAMILIES = {"llava": llava_case.CASE, "llava_next": llava_next_case.CASE}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("stage", ["projector", "vision_encoder"])
def test_encoder_step_runs_through_the_llava_adapters(family, stage):
    case = FAMILIES[family]
    model = case.build(0, "sdpa")
    kw = case.inputs(case.all_rows())
    stock = checks.logits(model, kw)
    with tr.apply(model, Step(stage, create("vscan", 6, window_size=2))) as handle:
        logits = model(**kw).logits
        records = list(handle.records)
    assert records and all(r.reducer == "vscan" and r.stage.value == stage for r in records)
    assert all(sum(r.tokens_after) < sum(r.tokens_before) for r in records)
    assert torch.isfinite(logits).all() and logits.shape[1] < stock.shape[1]
    assert torch.equal(checks.logits(model, kw), stock)  # restored


@pytest.mark.usefixtures("one_thread")
def test_qwen_refuses_the_encoder_step_and_runs_the_llm_step():
    qwen = tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa")
    with pytest.raises(MissingContextError, match="cls_attention"):
        tr.patch(qwen, Pipeline([Step("projector", create("vscan", 8))]))
    onevision = onevision_case.CASE.build(0, "sdpa")
    with pytest.raises(MissingContextError, match="cls_attention"):
        tr.patch(onevision, Step("projector", create("vscan", 8)))
    kw = qwen_vl_inputs([[(8, 8)], [(8, 12)]])
    with tr.apply(qwen, Step("llm_layer", create("vscan", 0.5), layer=1)) as handle:
        with torch.no_grad():
            qwen(**kw)
        rec = handle.records[0]
    assert rec.reducer == "vscan" and rec.tokens_after == [n // 2 for n in rec.tokens_before]
