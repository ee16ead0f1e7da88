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
    ident, empty, bad = measure_fidelity(
        vlm, samples, [("identity", identity), ("empty", Pipeline([])), ("harsh", harsh)], max_new_tokens=5, batch_size=3
    )
    for r in (ident, empty):
        assert r.kl < 1e-6 and r.kl_first < 1e-6
        assert r.top1 == 1.0 and r.exact == 1.0
    assert ident.answer_tokens == bad.answer_tokens > 0
    step = ident.steps[0]
    assert (step.tokens_before, step.tokens_after) == (36, 36) and step.reconstruction_error < 1e-5
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
    assert count.visual_in == 3 * 36 and count.llm_input == 3 * 36
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
    assert count.visual_in == 36 and len(texts) == 1
    forced = VLM(plain.model, processor, device="cpu", prompt_format="llava_hf")
    assert forced.prompt(sample).startswith("A chat between")
    with pytest.raises(InvalidInputError, match="prompt_format='chat'"):
        VLM(plain.model, processor, prompt_format="chat")
