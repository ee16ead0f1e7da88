"""The fast path on a CUDA device: captured graphs, and the same kept indices and greedy tokens as eager.

Every registered reducer at its first encoder-side stage (or at decoder layer 1), through tiny
LLaVA-1.5 and Qwen2.5-VL models in float32 (so that a greedy near-tie cannot flip between two
kernels). Run: ``pytest -q -m gpu tests/test_gpu_fast_path.py``.
"""

from __future__ import annotations

import warnings

import pytest
import test_adapter_llava as llava
import torch
from models import qwen_vl_inputs, tiny_llava, tiny_qwen2_5_vl
from test_adapter_kit import PARAMS

import tokenreduce
from tokenreduce import MissingContextError, Pipeline, Stage, Step, create

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ORDER = (Stage.PROJECTOR, Stage.VISION_ENCODER, Stage.LLM_LAYER)


def step_for(name: str) -> Step:
    cls = tokenreduce.get_registry().reducers[name].cls
    stage = next(s for s in ORDER if s in cls.stages)
    params = {**PARAMS.get(name, {}), **PARAMS.get(f"{name}@{stage.value}", {})}
    return Step(stage, create(name, budget=0.5, stage=stage, **params), layer=1 if stage is Stage.LLM_LAYER else None)


def both_paths(model, kw, step, new=4):
    out = {}
    for fast in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # llm_layer steps run eagerly under fast, with a warning
            with torch.no_grad(), tokenreduce.apply(model, Pipeline([step], fast=fast)) as handle:
                tokens = model.generate(**kw, max_new_tokens=new, do_sample=False)
                tokens = model.generate(**kw, max_new_tokens=new, do_sample=False)  # the replay
                out[fast] = (tokens, [i for r in handle.records for i in r.indices], handle.adapter)
    return out


def assert_fast_equals_eager(model, kw, name: str, lacks: str) -> None:
    """Reducer ``name`` at its first stage: the same greedy tokens and kept indices on both paths."""
    try:
        runs = both_paths(model, on_cuda(kw), step_for(name))
    except MissingContextError:
        pytest.skip(f"{name} needs context {lacks}")
    assert torch.equal(runs[False][0], runs[True][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1]))


def on_cuda(kw):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@pytest.fixture(scope="module")
def llava_model():
    return tiny_llava(0).cuda()


@pytest.mark.parametrize("name", sorted(tokenreduce.get_registry().reducers))
def test_llava_fast_equals_eager_for_every_reducer(llava_model, name):
    assert_fast_equals_eager(llava_model, llava.inputs([0, 1]), name, "LLaVA-1.5 images lack (video frames)")


def test_llava_fast_path_captures_replays_and_releases(llava_model):
    kw = on_cuda(llava.inputs([0, 1]))
    pipe = Pipeline([Step("projector", create("random", budget=0.5))], fast=True)
    with torch.no_grad(), tokenreduce.apply(llava_model, pipe) as handle:
        adapter = handle.adapter
        for _ in range(3):
            llava_model.generate(**kw, max_new_tokens=3, do_sample=False)
        (entry,) = adapter.fast.entries.values()  # one shape: captured once, replayed after
        assert entry.graph is not None and not adapter.fast.failed
        assert entry.step is not None and entry.step.graph is not None  # the decoding step too
        assert adapter._graphed_tower.graphs and not adapter._graphed_tower.failed
        assert adapter.graph_bytes() > 0
    assert adapter.fast is None and "forward" not in llava_model.model.vision_tower.__dict__


def test_llava_captured_decoding_equals_stock_decoding_over_many_steps(llava_model):
    """32 new tokens: every captured step (one slot more each) as the stock loop decodes them."""
    kw = on_cuda(llava.inputs([0, 1]))
    runs = both_paths(llava_model, kw, Step("projector", create("random", budget=0.5)), new=32)
    assert torch.equal(runs[False][0], runs[True][0])


@pytest.fixture(scope="module")
def qwen_model():
    return tiny_qwen2_5_vl(0).cuda()


@pytest.mark.parametrize("name", sorted(tokenreduce.get_registry().reducers))
def test_qwen_fast_equals_eager_for_every_reducer(qwen_model, name):
    kw = qwen_vl_inputs([[(8, 12)], [(8, 8)]])
    assert_fast_equals_eager(qwen_model, kw, name, "Qwen's tower lacks ([CLS] attention, or video frames)")


def test_qwen_fast_path_captures_the_prefill_and_the_decoding_steps(qwen_model):
    kw = on_cuda(qwen_vl_inputs([[(8, 12)], [(8, 8)]]))
    pipe = Pipeline([Step("projector", create("random", budget=0.5))], fast=True)
    with torch.no_grad(), tokenreduce.apply(qwen_model, pipe) as handle:
        for _ in range(3):
            qwen_model.generate(**kw, max_new_tokens=4, do_sample=False)
        (entry,) = handle.adapter.fast.entries.values()
        assert entry.graph is not None and entry.step is not None and entry.step.graph is not None
        assert not handle.adapter.fast.failed and handle.adapter.graph_bytes() > 0
    assert handle.adapter.fast is None


@pytest.mark.parametrize("name", ["random", "apet-llava", "cls_attn", "visionzip"])
def test_internvl_fast_equals_eager(name):
    """InternVL's fast prefill; reducers reading [CLS] rows run its tower (their hooks must fire), others replay it."""
    import test_adapter_internvl as internvl

    model = internvl.model().cuda()
    assert_fast_equals_eager(model, internvl.inputs([0, 1]), name, "InternVL lacks")


# -- llm_layer steps: the decoder split at the step's layer, captured with the prefill ----------------

import test_fast_layers as layers  # noqa: E402


def split_runs(model, kw, step, new=6):
    """Both paths on rows with equal image counts; the fast one must have captured the split prefill and steps."""
    out = {}
    for fast in (False, True):
        with torch.no_grad(), tokenreduce.apply(model, Pipeline([step], fast=fast)) as handle:
            for _ in range(2):  # capture, then replay
                tokens = model.generate(**kw, max_new_tokens=new, do_sample=False)
            out[fast] = (tokens, [i for r in handle.records for i in r.indices])
            if fast:
                (entry,) = handle.adapter.fast.entries.values()
                assert entry.plan is not None and entry.graph is not None and entry.step.graph is not None
                assert not handle.adapter.fast.failed
    return out


@pytest.mark.parametrize("name", layers.LLM_REDUCERS)
def test_llava_llm_layer_steps_captured_equal_eager(llava_model, name):
    step = Step("llm_layer", create(name, budget=0.5, **layers.params(name)), layer=1)
    runs = split_runs(llava_model, on_cuda(layers.llava_inputs()), step)
    assert torch.equal(runs[False][0], runs[True][0])
    assert len(runs[True][1]) == len(runs[False][1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1]))


@pytest.mark.parametrize("name", ["fastv", "dart", "sparsevlm", "pdrop", "random"])
def test_qwen_llm_layer_steps_captured_equal_eager(qwen_model, name):
    kw = on_cuda(qwen_vl_inputs([[(8, 8)], [(8, 8)]]))
    runs = split_runs(qwen_model, kw, Step("llm_layer", create(name, budget=0.5), layer=1))
    assert torch.equal(runs[False][0], runs[True][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1]))
