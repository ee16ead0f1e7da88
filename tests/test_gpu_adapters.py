"""The LLaVA-family adapter suite on a CUDA device, in bfloat16.

Modes:
* ``bf16``: default SDPA backend selection (padded batches, masks allowed).
* ``bf16-flash``: ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` forced, which raises instead
  of falling back. Flash takes no attention mask, so this mode runs single unpadded rows
  (the model then never needs a mask: plain causal prefill, mask-free decoding).
* ``flash_attention_2``: the models built with ``attn_implementation="flash_attention_2"``
  (only if the ``flash-attn`` package is installed), padded batches included.

In bf16 a greedy near-tie can flip between two kernels, so generation is compared
teacher-forced (logits along the same tokens, bf16 tolerances); identity and restore
checks stay bit-exact. Run: ``pytest -q -m gpu tests/test_gpu_adapters.py``.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import adapter_checks as checks
import pytest
import test_adapter_llava as llava
import test_adapter_llava_next as llava_next
import test_adapter_internvl as internvl
import test_adapter_onevision as onevision
import torch
from models import tiny_llama
from test_decoder_stage import AttentionProbe, batch, prompts
from tokenreduce_plugins.adapters.decoder import DecoderReduction

from tokenreduce import Step, create

pytestmark = pytest.mark.gpu

CASES = {
    "llava": llava.CASE,
    "llava_next": llava_next.CASE,
    "llava_onevision": onevision.CASE,
    "internvl": checks.Case(**{**vars(internvl.CASE), "flat_features": True}),
}
PIPELINES = {
    "llava": llava.full_pipeline,
    "llava_next": llava_next.full_pipeline,
    "llava_onevision": onevision.full_pipeline,
    "internvl": internvl.full_pipeline,
}
MODES = ["bf16", "bf16-flash"]
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def env() -> checks.Env:
    return checks.Env(device="cuda", dtype=torch.bfloat16, atol=0.15, rtol=5e-2, exact_tokens=False)


@contextmanager
def backend(mode: str):
    if mode == "bf16-flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            yield
    else:
        yield


def rows(mode: str):
    return [0] if mode == "bf16-flash" else None  # row 0 alone is unpadded


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(CASES))
def test_identity_is_bit_identical(family, mode):
    with backend(mode):
        checks.check_identity(CASES[family], "sdpa", env(), rows(mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(CASES))
def test_generate_matches_recompute(family, mode):
    with backend(mode):
        checks.check_generate_matches_recompute(CASES[family], PIPELINES[family](), "sdpa", env(), rows(mode))


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("family", sorted(CASES))
def test_batch_matches_rows(family, positions):
    checks.check_batch_matches_rows(CASES[family], PIPELINES[family](positions), env())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(CASES))
def test_remove_restores(family, mode):
    with backend(mode):
        checks.check_remove_restores(CASES[family], PIPELINES[family](), env(), rows(mode))


@pytest.mark.parametrize("stage", ["vision_encoder", "projector"])
@pytest.mark.parametrize("family", sorted(CASES))
def test_encoder_selection_equals_stock_on_kept_features(family, stage):
    checks.check_hand_built(CASES[family], checks.pipeline(Step(stage, create("random", 10, seed=5))), env=env())


@pytest.mark.parametrize("query", ["last", "text"])
@pytest.mark.parametrize("layer_mode", ["previous", "current"])
def test_recomputed_attention_rows_match_eager(query, layer_mode):
    probe = type("Probe", (AttentionProbe,), {"attention_query": query, "attention_layer": layer_mode, "seen": []})
    fast = tiny_llama(0, "sdpa").to("cuda", torch.bfloat16)
    eager = tiny_llama(0, "eager").to("cuda", torch.bfloat16)
    row_list, spans = prompts()
    ids, mask, img = (t.cuda() for t in batch(row_list, spans))
    with torch.no_grad():
        weights = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    red = DecoderReduction(fast.model, [Step("llm_layer", probe(0.5), layer=2)])
    red.attach()
    red.set_image_mask(img)
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask)
    red.detach()
    ctx = probe.seen[0]
    ref = weights[1 if layer_mode == "previous" else 2].float().mean(dim=1)
    for b in range(2):
        cols = img[b].nonzero()[:, 0]
        q_rows = torch.tensor([ids.shape[1] - 1]) if query == "last" else torch.arange(int(cols.max()) + 1, ids.shape[1])
        got = ctx.attention[b, : len(q_rows), : len(cols)].float()
        torch.testing.assert_close(got, ref[b][q_rows.cuda()][:, cols], atol=2e-2, rtol=5e-2)


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash-attn is not installed")
@pytest.mark.parametrize("family", sorted(CASES))
def test_flash_attention_2(family):
    case = CASES[family]
    fa2 = checks.Case(
        build=lambda seed, attn: case.build(seed, "flash_attention_2"),
        inputs=case.inputs, tokens=case.tokens, stock_features=case.stock_features, rows=case.rows,
    )
    checks.check_identity(fa2, "flash_attention_2", env())
    checks.check_generate_matches_recompute(fa2, PIPELINES[family](), "flash_attention_2", env())
    checks.check_batch_matches_rows(fa2, PIPELINES[family](), env())
