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
