"""The adapter conformance kit (``tokenreduce.testing.check_adapter``) on every built-in adapter,
and on deliberately broken adapters, which it must catch."""

from __future__ import annotations

import adapter_checks as checks
import pytest
import test_adapter_llava as llava
import test_adapter_llava_next as llava_next
import test_adapter_internvl as internvl
import test_adapter_onevision as onevision
import torch
from models_gemma3 import GEMMA_IMAGE, gemma3_inputs, tiny_gemma3
from models_internvl import IVL_IMAGE_TOKEN, tiny_internvl
from models import (
    IMAGE_TOKEN,
    QWEN_IMAGE_TOKEN,
    QWEN_VIDEO_TOKEN,
    VIDEO_TOKEN,
    one_thread,  # noqa: F401 - fixture
    qwen_vl_inputs,
    tiny_llava,
    tiny_llava_next,
    tiny_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)
from tokenreduce_plugins.adapters.llava import LlavaAdapter
from transformers.models.llama import modeling_llama

import tokenreduce
from tokenreduce import ConfigError, MissingContextError, Stage, Step
from tokenreduce.testing import AdapterReport, check_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny units (Qwen: 4 merged tokens; budget 0.5 keeps 2) need ApET's basis below the budget.
SMALL_BASIS = {name: {"basis_tokens": 1} for name in ("apet", "apet-llava", "apet-qwen")}
# DART's projector pivots default to the instruction's keys, which exist only in the decoder.
PARAMS = {**SMALL_BASIS, "dart@projector": {"pivot_by": "token_norm", "pivot_text_tokens": 0}}
# Grid pooling in the decoder needs one plain grid per row; these batches hold several images,
# anyres crops or videos per row, for which pool raises InvalidInputError (outside its domain).
NO_GRID = {"pool": ["llm_layer"]}


def qwen_rows(images: list, videos: list | None = None, *, frame_runs: bool = False):
    """``make_inputs`` for the tiny Qwen models: each row built alone (its own seed), then left-padded."""
    videos = videos or [[] for _ in images]

    def make(rows: list[int]) -> dict:
        parts = [
            qwen_vl_inputs([images[r]], [videos[r]], seed=r, text=3 + r, frame_runs=frame_runs) for r in rows
        ]
        length = max(p["input_ids"].shape[1] for p in parts)
        out: dict = {}
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            out[key] = torch.cat(
                [torch.nn.functional.pad(p[key], (length - p[key].shape[1], 0), value=0) for p in parts]
            )
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            got = [p[key] for p in parts if key in p]
            if got:
                out[key] = torch.cat(got)
        return out

    return make


QWEN_IMAGES = [[(8, 12), (4, 4)], [(6, 6)]]
QWEN_VIDEOS = [[], [(2, 4, 4)]]

# name -> (build, make_inputs, placeholder tokens, rows)
FAMILIES = {
    "llava-1.5": (lambda: tiny_llava(0), llava.inputs, [IMAGE_TOKEN], 2),
    "llava-next": (lambda: tiny_llava_next(0), llava_next.inputs, [IMAGE_TOKEN], 2),
    # Row 0: an anyres image; row 1: a 3-frame video; row 2: two single-view images.
    "llava-onevision": (lambda: tiny_onevision(0), onevision.CASE.inputs, [IMAGE_TOKEN, VIDEO_TOKEN], 3),
    # Row 0: a 2-tile image + thumbnail; row 1: a one-tile and a 4-tile + thumbnail image; row 2: a 3-frame video.
    "internvl": (lambda: tiny_internvl(0), internvl.inputs, [IVL_IMAGE_TOKEN], 3),
    # Row 0: one image; row 1: two images (bidirectional runs, sliding-window layers).
    "gemma3": (lambda: tiny_gemma3(0), lambda rows: gemma3_inputs([1, 2], rows), [GEMMA_IMAGE], 2),
    "qwen2-vl": (lambda: tiny_qwen2_vl(0), qwen_rows(QWEN_IMAGES, QWEN_VIDEOS), [QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN], 2),
    "qwen2.5-vl": (lambda: tiny_qwen2_5_vl(0), qwen_rows(QWEN_IMAGES, QWEN_VIDEOS), [QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN], 2),
    # Qwen3-VL: DeepStack features are added after decoder layer 0, so llm_layer steps start at 1.
    "qwen3-vl": (
        lambda: tiny_qwen3_vl(0),
        qwen_rows(QWEN_IMAGES, QWEN_VIDEOS, frame_runs=True),
        [QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN],
        2,
    ),
}
CLS_METHODS = {"cls_attn", "holov", "visionzip", "vispruner"}  # need the vision tower's [CLS]


@pytest.mark.parametrize("positions", ["compact", "original"])  # one is each adapter's default
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_built_in_adapter_conforms(family, positions, capsys):
    build, make_inputs, tokens, rows = FAMILIES[family]
    report = check_adapter(
        build, make_inputs, tokens, rows=rows, positions=positions, reducer_params=PARAMS, input_errors=NO_GRID
    )
    assert report.checks == ["identity", "restore", "counts", "cache", "batch", "reducers"]
    assert "passed identity, restore, counts, cache, batch, reducers" in capsys.readouterr().out
    registered = tokenreduce.get_registry().reducers
    ran = {name for name, _ in report.ran}
    refused = {(name, stage) for name, stage, _ in report.refused}
    declined = {(name, stage) for name, stage, _ in report.declined}
    has_cls = family in ("llava-1.5", "llava-next", "internvl")
    # Every registered reducer ran through the adapter at some stage, but those that need the
    # vision tower's [CLS] token on towers without one (SigLIP, Qwen's ViT), and video methods,
    # which need whole videos (video_budget: per_video, checked below): refused everywhere.
    video = {name for name, entry in registered.items() if "frames" in entry.cls.required_context}
    # Decode-time steps (DyCoke's KV pruning) read whole caches: refused where layers keep sliding windows.
    decode = {name for name, entry in registered.items() if entry.cls.acts_at == "decode"}
    sliding = decode if family == "gemma3" else set()
    assert ran == set(registered) - (set() if has_cls else CLS_METHODS) - video - sliding
    for name, entry in registered.items():  # ... and at each of its stages exactly one outcome
        for stage in entry.cls.stages:
            key = (name, stage.value)
            assert [key in set(report.ran), key in refused, key in declined].count(True) == 1, key
    assert {n for n, _ in declined} <= {"pool"}
    cls_refused = {n for n, s in refused if n in CLS_METHODS and s != "llm_layer"}
    assert cls_refused == (set() if has_cls else CLS_METHODS)
    for _, _, message in report.refused:
        assert "needs context" in message


def test_report_records_refusals_with_the_adapters_reason():
    build, make_inputs, tokens, rows = FAMILIES["qwen2.5-vl"]
    report = check_adapter(
        build, make_inputs, tokens, rows=rows, stages=["projector"], reducers=["cls_attn", "random"]
    )
    assert isinstance(report, AdapterReport) and report.adapter == "qwen-vl"
    assert report.ran == [("random", "projector")]
    ((name, stage, message),) = report.refused
    assert (name, stage) == ("cls_attn", "projector") and "no [CLS] token" in message


# -- broken adapters: the kit must catch each -------------------------------------------------------------


@pytest.fixture
def use_adapter(monkeypatch):
    """Make ``cls`` the adapter ``patch()`` picks for its models (first in the registry) for one test."""

    def install(cls):
        reg = tokenreduce.get_registry()
        others = dict(reg.adapters)
        monkeypatch.setattr(reg, "adapters", {})
        reg.register_adapter(cls)
        reg.adapters.update(others)

    return install


class LeavesAHook(LlavaAdapter):
    """detach() forgets a forward hook attach() put on the language model."""

    name = "broken-leaves-a-hook"

    def attach(self):
        super().attach()
        self.model.model.language_model.register_forward_hook(lambda mod, args, out: None)


class KeepsOneMore(LlavaAdapter):
    """The projector step keeps one token more than its budget (and records what it kept)."""

    name = "broken-keeps-one-more"

    def run_step(self, step, tokens, valid, ctx, budget=None):
        if step.stage is Stage.PROJECTOR and budget is None:
            budget = step.reducer.budget + 1
        return super().run_step(step, tokens, valid, ctx, budget)


class NudgesFeatures(LlavaAdapter):
    """Identity pipelines are not the stock model: spliced features are nudged."""

    name = "broken-nudges-features"

    def run_step(self, step, tokens, valid, ctx, budget=None):
        red, seconds = super().run_step(step, tokens, valid, ctx, budget)
        red.tokens = red.tokens + 1e-3
        red.info.pop("identity", None)
        return red, seconds


class WrongRefusal(LlavaAdapter):
    """Refuses a step it cannot serve with ConfigError instead of MissingContextError."""

    name = "broken-wrong-refusal"

    def validate(self):
        try:
            super().validate()
        except MissingContextError as err:
            raise ConfigError(str(err)) from None

    def encoder_context_fields(self):
        return super().encoder_context_fields() - {"cls_attention"}


class LeavesItsForward(LlavaAdapter):
    """detach() forgets the instance ``forward`` attach() set."""

    name = "broken-leaves-its-forward"

    def detach(self):
        forward = self.model.__dict__.get("forward")
        super().detach()
        self.model.forward = forward


class LeavesAFunction(LlavaAdapter):
    """attach() swaps a function of the modeling module; detach() forgets to put it back."""

    name = "broken-leaves-a-function"

    def attach(self):
        super().attach()
        original = modeling_llama.apply_rotary_pos_emb
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: original(*a, **k)


@pytest.mark.parametrize(
    "adapter,match",
    [
        (LeavesAHook, r"remove\(\) did not restore the model:\n.*language_model.__dict__: '_forward_hooks' added .*LeavesAHook"),
        (KeepsOneMore, r"stage projector, budget \d+: kept \[\d+, \d+, \d+\] of \[36, 36, 36\] tokens per unit"),
        (NudgesFeatures, r"identity pipeline .*: logits are not bit-identical"),
        (WrongRefusal, r"reducer 'cls_attn' at vision_encoder: patch\(\) raised ConfigError"),
        (LeavesItsForward, r"remove\(\) did not restore the model:\n  model.__dict__: 'forward' was added"),
        (LeavesAFunction, r"module transformers.models.llama.modeling_llama: 'apply_rotary_pos_emb' changed from"),
    ],
    ids=["leaves-a-hook", "keeps-one-more", "nudges-features", "wrong-refusal", "leaves-forward", "leaves-a-function"],
)
def test_the_kit_catches_a_broken_adapter(use_adapter, monkeypatch, adapter, match):
    # Put back what LeavesAFunction leaves behind, after the test.
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    use_adapter(adapter)
    model = tiny_llava(0)
    assert tokenreduce.get_registry().adapter_for(model) is adapter
    with pytest.raises(AssertionError, match=match):
        check_adapter(lambda: model, llava.inputs, [IMAGE_TOKEN], reducer_params=PARAMS, reducers=["cls_attn"])


def test_a_broken_adapter_still_works_where_it_is_not_broken(use_adapter):
    """The bug the kit catches is the only one: KeepsOneMore reduces, records and runs, one token off."""
    use_adapter(KeepsOneMore)
    model = tiny_llava(0)
    kw = llava.inputs([0, 1])
    with tokenreduce.apply(model, Step("projector", tokenreduce.create("random", 9))) as handle:
        assert torch.isfinite(checks.logits(model, kw)).all()
        assert handle.records[0].tokens_after == [10, 10, 10]


def _video_methods() -> list[str]:
    return sorted(n for n, e in tokenreduce.get_registry().reducers.items() if "frames" in e.cls.required_context)


@pytest.mark.parametrize("family", ["llava-onevision", "qwen2.5-vl"])
def test_video_methods_conform_through_whole_videos(family, capsys):
    """Under ``video_budget: per_video`` every video method runs through the adapter's video path."""
    if family == "llava-onevision":
        build, make, tokens, rows = (lambda: tiny_onevision(0)), (lambda rs: onevision.CASE.inputs([1 for _ in rs])), [VIDEO_TOKEN], 1
    else:
        build, make, tokens, rows = (lambda: tiny_qwen2_5_vl(0)), qwen_rows([[], []], [[(4, 4, 4)], [(3, 4, 4)]]), [QWEN_VIDEO_TOKEN], 2
    names = _video_methods()
    assert {"dycoke", "fastvid", "holitom", "prunevid"} <= set(names)
    report = check_adapter(
        build, make, tokens, rows=rows, stages=["vision_encoder", "projector"], video_budget="per_video",
        reducers=names, reducer_params=PARAMS,
    )
    assert {n for n, _ in report.ran} == set(names) and not report.refused
