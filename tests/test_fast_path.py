"""The fast execution path (``Pipeline(fast=True)`` / YAML ``fast: true``): the parts that run on CPU.

Qwen-VL towers: each layer's windows (or images) in one packed attention call instead of one
call per window, with the same kept indices and greedy tokens as the default path, and the
tower's attention setting restored on removal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import one_thread, qwen_vl_inputs, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl  # noqa: F401 - fixture
from transformers import AttentionInterface

import tokenreduce
from tokenreduce import ConfigError, Pipeline, Step, create
from tokenreduce.pipeline import loads_config as load_config_text
from tokenreduce_plugins.adapters import varlen_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def per_sequence(q, k, v, cu):
    """The stock non-flash tower: one SDPA call per packed sequence."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ks, vs = k[:, :, a:b], v[:, :, a:b]
        if ks.shape[1] != q.shape[1]:
            ks = ks.repeat_interleave(q.shape[1] // ks.shape[1], 1)
            vs = vs.repeat_interleave(q.shape[1] // vs.shape[1], 1)
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b], ks, vs).transpose(1, 2))
    return torch.cat(outs, dim=1)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_packed_call_equals_one_call_per_sequence(lengths, heads, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    total, (hq, hkv) = sum(lengths), heads
    q = torch.randn(1, hq, total, 8, generator=gen).to(dtype)
    k = torch.randn(1, hkv, total, 8, generator=gen).to(dtype)
    v = torch.randn(1, hkv, total, 8, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out, _ = varlen_attention.packed_sdpa(None, q, k, v, cu_seq_lens_q=cu, max_length_q=max(lengths))
    ref = per_sequence(q, k, v, cu)
    assert out.shape == (1, total, hq, 8) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


MODELS = {"qwen2-vl": tiny_qwen2_vl, "qwen2.5-vl": tiny_qwen2_5_vl, "qwen3-vl": tiny_qwen3_vl}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_qwen_fast_tower_keeps_indices_and_greedy_tokens(family, monkeypatch):
    model = MODELS[family](0)
    frame_runs = family == "qwen3-vl"
    kw = qwen_vl_inputs([[(16, 16), (8, 12)], [(12, 8)]], [[], [(2, 8, 8)]], frame_runs=frame_runs)
    calls = []
    original = varlen_attention.packed_sdpa

    def counted(*args, **kwargs):
        calls.append(kwargs.get("cu_seq_lens_q") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(varlen_attention, "packed_sdpa", counted)
    runs = {}
    for fast in (False, True):
        pipe = Pipeline([Step("projector", create("apet-qwen", budget=0.5, basis_tokens=2))], fast=fast)
        with torch.no_grad(), tokenreduce.apply(model, pipe) as handle:
            implementation = model.model.visual.config._attn_implementation
            logits = model(**kw).logits
            indices = [i for r in handle.records for i in r.indices]
            tokens = model.generate(**kw, max_new_tokens=3, do_sample=False)
        runs[fast] = (implementation, logits, indices, tokens)
    assert runs[False][0] == "sdpa" and runs[True][0] == varlen_attention.NAME
    assert calls and all(calls)  # the tower's attention went through the packed call
    assert all(torch.equal(a, b) for a, b in zip(runs[False][2], runs[True][2]))
    assert torch.equal(runs[False][3], runs[True][3])
    torch.testing.assert_close(runs[False][1], runs[True][1], atol=1e-4, rtol=1e-4)
    assert model.model.visual.config._attn_implementation == "sdpa"  # restored


QWEN_CASES = {
    "apet-qwen": Step("projector", create("apet-qwen", budget=0.5, basis_tokens=2)),
    "random@vision_encoder": Step("vision_encoder", create("random", budget=0.4, seed=3)),
    "pool": Step("projector", create("pool", budget=0.5)),
    "identity": None,
}


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("case", sorted(QWEN_CASES))
def test_qwen_fast_prefill_and_decoding_keep_indices_and_greedy_tokens(case, positions):
    """Qwen2.5-VL's decoder on the fast path: the reduced prompt's M-RoPE ids in the replayed
    prefill, each decoding step's ids after it, as the default path numbers them."""
    model = tiny_qwen2_5_vl(0)
    kw = qwen_vl_inputs([[(16, 16), (8, 12)], [(12, 8)]], [[], [(2, 8, 8)]])  # rows of different lengths
    steps = [] if QWEN_CASES[case] is None else [QWEN_CASES[case]]
    runs = {}
    for fast in (False, True):
        with torch.no_grad(), tokenreduce.apply(model, Pipeline(steps, positions=positions, fast=fast)) as handle:
            tokens = model.generate(**kw, max_new_tokens=6, do_sample=False)
            runs[fast] = (tokens, [i for r in handle.records for i in r.indices])
            if fast:
                (entry,) = handle.adapter.fast.entries.values()  # the fast prefill ran (eagerly, on CPU)
                assert entry.step is not None  # and so did the decoding steps
    assert torch.equal(runs[False][0], runs[True][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1]))


def test_qwen_fast_path_refusals_run_eagerly_with_a_warning():
    model = tiny_qwen2_5_vl(0)
    kw = qwen_vl_inputs([[(8, 8)]])
    with torch.no_grad(), tokenreduce.apply(model, Pipeline([Step("projector", create("random", budget=0.5))], fast=True)):
        with pytest.warns(UserWarning, match="stopping_criteria"):
            model.generate(**kw, max_new_tokens=2, do_sample=False, stopping_criteria=[])
    with pytest.warns(UserWarning, match="dycoke-kv prunes the cache while decoding"):
        with tokenreduce.apply(model, Pipeline([Step("llm_layer", create("dycoke-kv", budget=0.5), layer=1)], fast=True)):
            pass


def test_a_flash_tower_is_left_as_it_is():
    model = tiny_qwen2_5_vl(0)
    config = model.model.visual.config
    config._attn_implementation_internal = "flash_attention_2"  # as loaded with flash-attn (not run here)
    pipe = Pipeline([Step("projector", create("random", budget=0.5))], fast=True)
    with tokenreduce.apply(model, pipe):
        assert config._attn_implementation == "flash_attention_2"
    assert config._attn_implementation == "flash_attention_2"


def test_registration_is_idempotent():
    assert varlen_attention.register() == varlen_attention.register() == varlen_attention.NAME
    assert varlen_attention.NAME in AttentionInterface._global_mapping


def test_yaml_switch_is_strict():
    text = "pipeline:\n  - {stage: projector, reducer: random, budget: 8}\nfast: true\n"
    assert load_config_text(text).fast is True
    assert load_config_text(text.replace("fast: true", "")).fast is False
    with pytest.raises(ConfigError, match="fast"):
        load_config_text(text.replace("fast: true", 'fast: "yes"'))


# -- LLaVA family: the graph-replayed prefill (its CPU part: static cache, mask, bucket, handover) --------

import test_adapter_internvl as internvl  # noqa: E402
import test_adapter_llava as llava  # noqa: E402
import test_adapter_llava_next as llava_next  # noqa: E402
import test_adapter_onevision as onevision  # noqa: E402
from models import tiny_llava, tiny_llava_next, tiny_onevision  # noqa: E402

from tokenreduce_plugins.adapters import fast_prefill  # noqa: E402

LLAVA_FAMILY = {
    "internvl": (lambda: internvl.model(), internvl.inputs),
    "llava-1.5": (lambda: tiny_llava(0), llava.inputs),
    "llava-next": (lambda: tiny_llava_next(0), llava_next.inputs),
    "llava-onevision": (lambda: tiny_onevision(0), onevision.CASE.inputs),
}


def generate_both(model, kw, steps, new=6, **options):
    """``(tokens, kept indices)`` of the default path and of the fast one."""
    out = {}
    for fast in (False, True):
        with torch.no_grad(), tokenreduce.apply(model, Pipeline(steps, fast=fast)) as handle:
            tokens = model.generate(**kw, max_new_tokens=new, do_sample=False, **options)
            out[fast] = (tokens, [i for r in handle.records for i in r.indices])
    return out


@pytest.mark.parametrize("family", sorted(LLAVA_FAMILY))
@pytest.mark.parametrize("reducer", ["random", "apet-llava", "divprune"])
def test_llava_fast_prefill_keeps_indices_and_greedy_tokens(family, reducer):
    build, inputs = LLAVA_FAMILY[family]
    model = build()
    kw = inputs([0, 1])  # rows of different lengths: left padding, bucket padding on top
    params = {"basis_tokens": 1} if reducer.startswith("apet") else {}
    runs = generate_both(model, kw, [Step("projector", create(reducer, budget=0.5, **params))])
    assert torch.equal(runs[False][0], runs[True][0])
    assert len(runs[True][1]) == len(runs[False][1])
    assert all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1]))


def test_llava_fast_prefill_one_token_and_the_vision_encoder_stage():
    model = tiny_llava(0)
    kw = llava.inputs([1])
    steps = [Step("vision_encoder", create("visionzip", budget=12, contextual=4))]
    for new in (1, 4):
        runs = generate_both(model, kw, steps, new=new)
        assert torch.equal(runs[False][0], runs[True][0])


def test_llava_fast_prefill_ends_rows_like_stock_generate():
    model = tiny_llava(0)
    kw = llava.inputs([0, 1])
    steps = [Step("projector", create("random", budget=0.5))]
    first = generate_both(model, kw, steps, new=2)[False][0][:, -2]
    # Row 0 ends at its first token, row 1 goes on: stock pads row 0 afterwards.
    model.generation_config.eos_token_id = int(first[0])
    model.generation_config.pad_token_id = 0
    runs = generate_both(model, kw, steps, new=5)
    assert torch.equal(runs[False][0], runs[True][0])


def test_what_the_fast_prefill_cannot_take_runs_eagerly_with_a_warning():
    model = tiny_llava(0)
    kw = llava.inputs([0, 1])
    with pytest.warns(UserWarning, match="dycoke-kv prunes the cache while decoding"):
        with tokenreduce.apply(model, Pipeline([Step("llm_layer", create("dycoke-kv", budget=0.5), layer=1)], fast=True)):
            pass
    with pytest.warns(UserWarning, match="positions='original'"):
        with tokenreduce.apply(model, Pipeline([Step("projector", create("random", budget=0.5))], positions="original", fast=True)):
            pass
    pipe = Pipeline([Step("projector", create("random", budget=0.5))], fast=True)
    with torch.no_grad(), tokenreduce.apply(model, pipe):
        with pytest.warns(UserWarning, match="greedily"):
            sampled = model.generate(**kw, max_new_tokens=3, do_sample=True, top_k=1)
    with torch.no_grad(), tokenreduce.apply(model, Pipeline(pipe.steps)):
        eager = model.generate(**kw, max_new_tokens=3, do_sample=False)
    assert torch.equal(sampled, eager)  # top_k=1 sampling is greedy: the eager path ran it


def test_fast_path_state_goes_with_the_pipeline():
    model = tiny_llava(0)
    tower = model.model.vision_tower
    pipe = Pipeline([Step("projector", create("random", budget=0.5))], fast=True)
    with torch.no_grad(), tokenreduce.apply(model, pipe) as handle:
        model.generate(**llava.inputs([0]), max_new_tokens=2, do_sample=False)
        adapter = handle.adapter
        assert adapter.fast.entries and "forward" in tower.__dict__
        assert adapter.graph_bytes() == 0  # CPU: nothing captured, nothing held
    assert adapter.fast is None and "forward" not in tower.__dict__


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), extra=st.integers(0, 5), additive=st.booleans())
def test_prefill_mask_is_causal_masks_padding_and_keeps_padding_rows_finite(lengths, extra, additive):
    longest = max(lengths)
    valid = torch.tensor([[False] * (longest - n) + [True] * n for n in lengths])
    mask = fast_prefill.prefill_mask(valid, longest + extra, torch.float32, additive)
    allowed = mask[:, 0] == 0 if additive else mask[:, 0]
    for b, n in enumerate(lengths):
        pad = longest - n
        for q in range(longest):
            row = allowed[b, q]
            if q < pad:  # a padding query sees itself only
                assert row.nonzero().flatten().tolist() == [q]
            else:  # a real query sees the real keys up to itself
                assert row.nonzero().flatten().tolist() == list(range(pad, q + 1))


def test_buckets():
    assert [fast_prefill.bucket(n) for n in (1, 32, 33, 119, 512, 513, 700)] == [32, 32, 64, 128, 512, 640, 768]


def test_keep_graphs_reuses_them_across_pipelines_and_releases_them_at_the_end():
    model = tiny_llava(0)
    kw = llava.inputs([0])
    first = None
    with fast_prefill.keep_graphs(model):
        for reducer in ("random", "apet-llava", "random"):
            params = {"basis_tokens": 1} if reducer.startswith("apet") else {}
            pipe = Pipeline([Step("projector", create(reducer, budget=0.5, **params))], fast=True)
            with torch.no_grad(), tokenreduce.apply(model, pipe) as handle:
                model.generate(**kw, max_new_tokens=2, do_sample=False)
                state = handle.adapter.fast
            first = first or state
            assert state is first and len(state.entries) == 1  # the same graphs, one shape
        assert first.entries  # kept after the last removal
    assert not first.entries  # released with the block
    pipe = Pipeline([Step("projector", create("random", budget=0.5))], fast=True)
    with torch.no_grad(), tokenreduce.apply(model, pipe) as handle:
        model.generate(**kw, max_new_tokens=2, do_sample=False)
        state = handle.adapter.fast
    assert state is not first and not state.entries  # no keep_graphs: released on removal


def test_min_new_tokens_and_first_token_rules():
    model = tiny_llava(0)
    kw = llava.inputs([0, 1])
    steps = [Step("projector", create("random", budget=0.5))]
    first = generate_both(model, kw, steps, new=2)[False][0][:, -2]
    model.generation_config.eos_token_id = int(first[0])  # row 0's first token ends it, unless min_new_tokens
    model.generation_config.pad_token_id = 0
    runs = generate_both(model, kw, steps, new=4, min_new_tokens=2)
    assert torch.equal(runs[False][0], runs[True][0])
    pipe = Pipeline(steps, fast=True)
    with torch.no_grad(), tokenreduce.apply(model, pipe), pytest.warns(UserWarning, match="repetition_penalty"):
        model.generate(**kw, max_new_tokens=2, do_sample=False, repetition_penalty=1.3)
