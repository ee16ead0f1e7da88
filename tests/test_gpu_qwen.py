"""The Qwen-VL adapter on CUDA: bf16, the SDPA flash backend forced, and flash_attention_2 if installed.

Skipped without a CUDA device (see ``conftest.py``). Run on an H100 with::

    pytest -q tests/test_gpu_qwen.py -rs

The forced flash backend errors instead of falling back, so those tests use batches
that need no attention mask (one row, or rows that shrink alike).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from models import qwen_vl_inputs, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl
from test_adapter_qwen import IMAGES, enc, extend, hand_built, llm, pipe, proj

import tokenreduce

pytestmark = pytest.mark.gpu
DEV = "cuda"


def on_gpu(inp: dict) -> dict:
    return {k: v.to(DEV) for k, v in inp.items()}


def build(builder=tiny_qwen2_5_vl, dtype=torch.bfloat16, attn: str = "sdpa"):
    return builder(attn_implementation=attn).to(DEV, dtype)


def greedy_matches_recompute(model, inp: dict, steps: int, atol: float) -> None:
    """Cached greedy decoding == no-cache recompute, up to near-ties of low-precision logits."""
    out = model.generate(**inp, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, inp["input_ids"].shape[1] :]
    for k in range(new.shape[1]):
        with torch.no_grad():
            full = model(**extend(inp, new[:, :k]), use_cache=False).logits[:, -1].float()
        cached = out.logits[k].float()
        torch.testing.assert_close(cached, full, atol=atol, rtol=0)
        top2 = full.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * atol  # rows without a near-tie
        assert torch.equal(full.argmax(-1)[clear], new[clear, k]), f"step {k}"


@pytest.mark.parametrize("builder", [tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl])
def test_cuda_bf16_identity_close_to_stock(builder):
    model = build(builder)
    frame_runs = builder is tiny_qwen3_vl
    inp = on_gpu(qwen_vl_inputs(IMAGES, [[(2, 4, 4)], []], frame_runs=frame_runs))
    with torch.no_grad():
        ref = model(**inp).logits
        with tokenreduce.apply(model, pipe(proj("random", 1.0))):
            out = model(**inp).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_cuda_projector_reduction_equals_hand_built(dtype, atol):
    model = build(dtype=dtype)
    inp = on_gpu(qwen_vl_inputs(IMAGES))
    inp["pixel_values"] = inp["pixel_values"].to(dtype)
    reducer = tokenreduce.create("apet-qwen", budget=7, stage="projector", basis_tokens=2)
    expected, valid, _, _ = hand_built(model, inp, reducer)
    with torch.no_grad(), tokenreduce.apply(model, reducer):
        out = model(**inp).logits
    torch.testing.assert_close(out[valid].float(), expected[valid].float(), atol=atol, rtol=0)


@pytest.mark.parametrize(
    "steps,positions",
    [
        ((proj("random", 5),), None),
        ((enc("pool", 6), proj("apet-qwen", 4, basis_tokens=2)), None),
        ((proj("random", 6), llm("random", 3, layer=1)), None),
        ((llm("apet-qwen", 5, layer=1, basis_tokens=2),), "compact"),
    ],
    ids=["proj", "enc+proj", "proj+llm", "llm-compact"],
)
def test_cuda_bf16_generate_with_cache_equals_recompute(steps, positions):
    model = build()
    inp = on_gpu(qwen_vl_inputs(IMAGES))
    with tokenreduce.apply(model, pipe(*steps, positions=positions)):
        greedy_matches_recompute(model, inp, steps=4, atol=0.1)


@pytest.mark.parametrize(
    "steps", [(proj("random", 5),), (enc("pool", 6), proj("random", 4)), (proj("random", 6), llm("random", 3, layer=1))]
)
def test_cuda_fp32_generate_exact(steps):
    model = build(dtype=torch.float32)
    inp = on_gpu(qwen_vl_inputs(IMAGES))
    with tokenreduce.apply(model, pipe(*steps)):
        greedy_matches_recompute(model, inp, steps=4, atol=1e-4)


@pytest.mark.parametrize(
    "steps",
    [(proj("random", 5),), (enc("apet-qwen", 6, basis_tokens=2),), (proj("random", 6), llm("random", 3, layer=1))],
)
def test_sdpa_flash_backend_forced(steps):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build()
    inp = on_gpu(qwen_vl_inputs([[(8, 12), (4, 4)]]))  # one row: no attention mask needed anywhere
    inp.pop("attention_mask")
    with tokenreduce.apply(model, pipe(*steps)) as handle, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        greedy_matches_recompute(model, inp, steps=4, atol=0.1)
    assert handle.records


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("steps", [(proj("random", 5),), (proj("random", 6), llm("random", 3, layer=1))])
def test_flash_attention_2(steps):
    model = build(attn="flash_attention_2")
    inp = on_gpu(qwen_vl_inputs(IMAGES))
    with tokenreduce.apply(model, pipe(*steps)):
        greedy_matches_recompute(model, inp, steps=4, atol=0.1)
