"""End to end through lmms-eval: ``tokenreduce eval`` on the tiny model and tiny local tasks.

Needs the ``[eval]`` extra (lmms-eval); skipped without it. The comparison with lmms-eval's
own ``llava_hf`` model also needs decord (llava_hf imports it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tokenreduce import ConfigError

try:  # lmms-eval can fail to import for other reasons than absence (a CUDA-only torchvision)
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager
except Exception as err:  # noqa: BLE001  # pragma: no cover - depends on the environment
    pytest.skip(
        f'lmms-eval is not usable here ({type(err).__name__}: {err}); pip install "tokenreduce[eval]"', allow_module_level=True
    )

from tokenreduce.cli import app
from tokenreduce.evaluation.lmms import TokenReduceLMM, pipeline_from_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One ``tokenreduce eval`` run: unreduced + random-4 on tiny_pope (generate) and tiny_mc (loglikelihood)."""
    out = tmp_path_factory.mktemp("eval")
    args = ["eval", "--model", "tiny", "--tasks", "tiny_pope,tiny_mc", "--reducers", "random", "--budgets", "4"]
    args += ["--no-default-tasks", "--batch-size", "2", "--log-samples", "-o", str(out)]
    args += ["--model-arg", "device=cpu", "--model-arg", "dtype=float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_eval_writes_the_table(run):
    out, printed = run
    table = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == ["unreduced", "random-4"] and table["tasks"] == ["tiny_pope", "tiny_mc"]
    base, red = rows["unreduced"], rows["random-4"]
    assert base["mean_relative"] == pytest.approx(100.0)
    assert base["tokens"] == 576.0 and red["tokens"] == 4.0  # LLaVA-1.5's 24 x 24 patches
    assert red["description"] == "random@projector:4"
    for row in rows.values():
        assert set(row["scores"]) == {"tiny_pope", "tiny_mc"}
        assert all(0.0 <= v <= 1.0 for v in row["scores"].values())
        assert row["ms_per_sample"] > 0
    md = (out / "results.md").read_text()
    assert "| random-4 |" in md and "tiny_pope (accuracy)" in md and "| unreduced |" in printed
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_multiple_choice_goes_through_loglikelihood(run):
    out, _ = run
    raw = json.loads((out / "raw" / "unreduced.json").read_text())
    docs = raw["samples"]["tiny_mc"]
    assert len(docs) == 6
    for doc in docs:
        # lmms-eval logs each choice's response; ours is (mean loss, is_greedy).
        losses = [float(r[0][0]) for r in doc["resps"]]
        assert len(losses) == 4 and all(v > 0 for v in losses)
        assert doc["acc"] == float(int(np.argmin(losses)) == int(doc["target"]))


def test_unreduced_scores_exactly_what_lmms_eval_llava_hf_scores(run):
    pytest.importorskip("decord", reason="lmms-eval's llava_hf model imports decord")
    out, _ = run
    ckpt, tasks = out / "_tiny" / "checkpoint", out / "_tiny" / "tasks"
    plain = evaluator.simple_evaluate(
        model="llava_hf",
        model_args=f"pretrained={ckpt},dtype=float32,device_map=cpu",
        tasks=["tiny_pope"],
        device="cpu",
        force_simple=True,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    ours = json.loads((out / "raw" / "unreduced.json").read_text())
    assert plain["results"]["tiny_pope"]["accuracy,none"] == ours["results"]["tiny_pope"]["accuracy,none"]
    table = json.loads((out / "results.json").read_text())
    assert table["rows"][0]["scores"]["tiny_pope"] == plain["results"]["tiny_pope"]["accuracy,none"]
    # Not only the score: every generated answer is the same text.
    assert [s["resps"] for s in plain["samples"]["tiny_pope"]] == [s["resps"] for s in ours["samples"]["tiny_pope"]]


def test_model_is_registered_and_parses_its_pipeline_args(run):
    from lmms_eval.models import get_model

    assert get_model("tokenreduce") is TokenReduceLMM
    pipe = pipeline_from_args(reducer="pool", budget="0.5")
    assert pipe.steps[0].reducer.budget == 0.5 and pipe.steps[0].stage.value == "projector"
    assert pipeline_from_args() is None
    with pytest.raises(ConfigError, match="not both"):
        pipeline_from_args(pipeline="a.yaml", reducer="pool", budget=4)
    with pytest.raises(ConfigError, match="needs budget"):
        pipeline_from_args(reducer="pool")
    out, _ = run
    with pytest.raises(ConfigError, match="unknown --model_args for tokenreduce: colour"):
        TokenReduceLMM(pretrained=str(out / "_tiny" / "checkpoint"), device="cpu", colour="red")


def test_data_parallel_run_matches_the_single_process_run(run, tmp_path):
    """Two processes (torchrun, CPU/gloo) split the documents; the gathered table is the same."""
    import os
    import subprocess
    import sys

    out, _ = run
    dp = tmp_path / "dp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tokenreduce.cli", "eval"]
    cmd += ["--model", "tiny", "--tasks", "tiny_pope,tiny_mc", "--reducers", "random", "--budgets", "4", "--no-default-tasks"]
    cmd += ["--batch-size", "2", "--log-samples", "-o", str(dp), "--model-arg", "dtype=float32"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = json.loads((out / "results.json").read_text())["rows"]
    parallel = json.loads((dp / "results.json").read_text())["rows"]
    assert [r["scores"] for r in parallel] == [r["scores"] for r in single]
    assert [r["tokens"] for r in parallel] == [r["tokens"] for r in single]
    assert all(r["stats"]["tiny_pope"]["docs"] == 6 for r in parallel)  # both halves counted

    def answers(path):
        return sorted((s["doc_id"], s["resps"]) for s in json.loads(path.read_text())["samples"]["tiny_pope"])

    assert answers(dp / "raw" / "unreduced.json") == answers(out / "raw" / "unreduced.json")
