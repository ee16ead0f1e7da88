"""``tokenreduce fidelity`` on the embedded tiny LLaVA model (no lmms-eval, no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenreduce_plugins.eval_tiny import (
    tiny_image,
    tiny_model,
    tiny_processor,
    tiny_samples,
)
from typer.testing import CliRunner

from tokenreduce import InvalidInputError, Pipeline, Step, create
from tokenreduce.reducer import observe
from tokenreduce.cli import app
from tokenreduce.evaluation.fidelity import measure_fidelity, recording_errors
from tokenreduce.evaluation.inputs import load_folder
from tokenreduce.evaluation.vlm import VLM


@pytest.fixture(scope="module")
def vlm() -> VLM:
    torch.manual_seed(0)
    return VLM(tiny_model(seed=0), tiny_processor(), device="cpu")


def _projector(name: str, budget, **params) -> Pipeline:
    return Pipeline([Step("projector", create(name, budget, stage="projector", **params))])


def test_identity_is_exact_and_a_harsh_budget_is_measurably_worse(vlm):
    samples = tiny_samples(3, seed=1)
    identity = _projector("random", 1.0, seed=0)  # a ratio of 1: every token kept
    harsh = _projector("random", 2, seed=0)
    with pytest.warns(UserWarning, match=r"pipeline 'identity': step random@projector with budget 1.0 kept every token"):
        ident, empty, bad = measure_fidelity(
            vlm, samples, [("identity", identity), ("empty", Pipeline([])), ("harsh", harsh)], max_new_tokens=5, batch_size=3
        )
    assert len(ident.warnings) == 1 and not empty.warnings and not bad.warnings
    for r in (ident, empty):
        assert r.kl < 1e-6 and r.kl_first < 1e-6
        assert r.top1 == 1.0 and r.exact == 1.0
    assert ident.answer_tokens == bad.answer_tokens > 0
    step = ident.steps[0]
    assert (step.tokens_before, step.tokens_after) == (576, 576) and step.reconstruction_error < 1e-5
    assert bad.kl > 0.05 and bad.top1 < 1.0
    assert bad.steps[0].tokens_after == 2 and bad.steps[0].reconstruction_error > 0.1


def test_recording_changes_nothing_but_records(vlm):
    pipe = _projector("pool", 9)
    record, sinks = recording_errors(pipe)
    x = torch.randn(2, 36, 64, generator=torch.Generator().manual_seed(0))
    a = pipe.steps[0].reducer(x)
    with observe(record):
        b = pipe.steps[0].reducer(x)
        create("pool", 9)(x)  # an equal reducer outside the pipeline is not recorded
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.indices, b.indices)
    assert len(sinks[0]) == 1 and sinks[0][0].shape == (2,) and bool((sinks[0][0] > 0).all())
    pipe.steps[0].reducer(x)  # outside the context: nothing more recorded
    assert len(sinks[0]) == 1


def test_batched_generation_and_loss_match_one_by_one(vlm):
    samples = tiny_samples(3, seed=2)
    texts, ids, count, _ = vlm.generate(samples, max_new_tokens=5)
    assert count.visual_in == 3 * 576 and count.llm_input == 3 * 576
    losses, _, _ = vlm.continuation_loss(samples, [" red", " green blue", " yes"])
    for i, s in enumerate(samples):
        t1, ids1, _, _ = vlm.generate([s], max_new_tokens=5)
        assert t1 == [texts[i]] and ids1 == [ids[i]]
        ((l1, g1),) = vlm.continuation_loss([s], [[" red", " green blue", " yes"][i]])[0]
        assert l1 == pytest.approx(losses[i][0], rel=1e-4, abs=1e-5) and g1 == losses[i][1]


def test_continuation_loss_is_the_mean_token_nll(vlm):
    (sample,) = tiny_samples(1, seed=3)
    ((loss, greedy),) = vlm.continuation_loss([sample], [" red green"])[0]
    prompt = vlm.prompt(sample)
    inputs = vlm.encode([prompt + " red green"], [sample])
    with torch.no_grad():
        logp = vlm.model(**inputs).logits[0, -3:-1].float().log_softmax(-1)
    target = inputs["input_ids"][0, -2:]
    expected = -logp.gather(-1, target.unsqueeze(-1)).mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert greedy == bool((logp.argmax(-1) == target).all())


def _write_folder(folder, with_listing: bool):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        tiny_image(rng)[0].save(folder / name)
    if with_listing:
        lines = [
            {"image": "a.png", "prompt": "what color is the shape"},
            {"image": ["a.png", "b.png"], "prompt": "is there a circle"},
        ]
        (folder / "prompts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_input_folder_formats_and_errors(tmp_path):
    _write_folder(tmp_path, with_listing=False)
    plain = load_folder(tmp_path, prompt="describe")
    assert [len(s.images) for s in plain] == [1, 1] and plain[0].context == "describe"
    _write_folder(tmp_path, with_listing=True)
    listed = load_folder(tmp_path)
    assert [len(s.images) for s in listed] == [1, 2] and listed[1].context == "is there a circle"
    (tmp_path / "prompts.jsonl").write_text('{"image": "a.png"}\n{oops\n')
    with pytest.raises(InvalidInputError, match="prompts.jsonl:2: not valid JSON"):
        load_folder(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"image": "missing.png"}\n')
    with pytest.raises(InvalidInputError, match="image not found"):
        load_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no inputs"):
        load_folder(tmp_path / "empty")


def test_fidelity_command_on_a_folder(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _write_folder(inputs, with_listing=True)
    out = tmp_path / "fid.json"
    args = ["fidelity", "--inputs", str(inputs), "--reducers", "pool", "--budgets", "4", "--max-new-tokens", "4"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--dtype", "float32", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())
    assert row["name"] == "pool-4" and row["samples"] == 2
    assert row["steps"][0]["tokens_after"] == 4 and row["kl"] >= 0
    bad = CliRunner().invoke(app, ["fidelity", "--cache-dir", str(tmp_path / "cache")])
    assert bad.exit_code == 1 and "at least one pipeline" in bad.output


def test_prompt_formats():
    """``auto`` uses the processor's chat template (structured content) when it has one."""
    processor = tiny_processor()
    (sample,) = tiny_samples(1)
    plain = VLM(tiny_model(), processor, device="cpu")
    assert plain.prompt_format == "llava_hf"
    assert plain.prompt(sample).startswith("A chat between a curious user") and "USER: <image>\nwhat color" in plain.prompt(sample)
    processor.chat_template = (
        "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% endif %}{% endfor %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    templated = VLM(plain.model, processor, device="cpu")
    assert templated.prompt_format == "processor"
    assert templated.prompt(sample) == "USER: <image>\nwhat color is the shape in the image ASSISTANT:"
    texts, _, count, _ = templated.generate([sample], max_new_tokens=3)
    assert count.visual_in == 576 and len(texts) == 1
    forced = VLM(plain.model, processor, device="cpu", prompt_format="llava_hf")
    assert forced.prompt(sample).startswith("A chat between")
    with pytest.raises(InvalidInputError, match="prompt_format='chat'"):
        VLM(plain.model, processor, prompt_format="chat")


def test_embedded_model_has_the_llava_1_5_token_layout(vlm):
    """336 px images in 14-pixel patches: 24 x 24 = 576 image tokens (+ CLS in the tower)."""
    vision = vlm.model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (336, 14)
    (sample,) = tiny_samples(1, seed=4)
    inputs = vlm.encode([vlm.prompt(sample)], [sample])
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == vlm.model.config.image_token_id).sum()) == 576


def test_budgets_at_or_above_the_token_count_are_flagged(vlm):
    """Budgets 64/128/192 reduce the 576 tokens; 576 and more reduce nothing and say so."""
    samples = tiny_samples(2, seed=5)
    pipes = [(f"pool-{b}", _projector("pool", b)) for b in (64, 576, 1000)]
    with pytest.warns(UserWarning) as caught:
        r64, r576, r1000 = measure_fidelity(vlm, samples, pipes, max_new_tokens=3, batch_size=2)
    assert r64.steps[0].tokens_after == 64 and not r64.warnings
    for r, budget in ((r576, 576), (r1000, 1000)):
        assert r.steps[0].tokens_after == 576 and r.kl < 1e-6
        (text,) = r.warnings
        assert f"with budget {budget} kept every token (this model gives it 576 per input): nothing was reduced" in text
        assert "use a budget below 576 tokens" in text
    assert sorted(str(w.message) for w in caught) == sorted(r576.warnings + r1000.warnings)
