import json
import re
from pathlib import Path

from typer.testing import CliRunner

from tokenreduce.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_list_shows_reducers_with_stages():
    res = invoke("list")
    assert res.exit_code == 0, res.output
    assert "random" in res.output and "pool" in res.output
    assert "llm_layer, projector, vision_encoder" in res.output


def test_info_shows_generated_parameter_table():
    res = invoke("info", "random")
    assert res.exit_code == 0
    assert "seed" in res.output and ">= 0" in res.output and "Seed of the random scores" in res.output


def test_info_unknown_name_suggests():
    res = invoke("info", "pol")
    assert res.exit_code == 1
    assert "Did you mean 'pool'" in res.output


def test_run_by_name_on_synthetic_prints_table():
    res = invoke("run", "pool", "--budget", "64", "--synthetic")
    assert res.exit_code == 0, res.output
    assert "576" in res.output and "64" in res.output and "recon. error" in res.output


def test_run_yaml(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(
        "pipeline:\n  - {stage: vision_encoder, reducer: pool, budget: 144}\n"
        "  - {stage: projector, reducer: random, budget: 64}\n"
    )
    res = invoke("run", str(p), "--synthetic")
    assert res.exit_code == 0, res.output
    assert "vision_encoder" in res.output and "projector" in res.output and "144" in res.output


def test_validate_ok_and_error_with_line(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("pipeline:\n  - {stage: projector, reducer: random, budget: 64}\n")
    res = invoke("validate", str(good))
    assert res.exit_code == 0 and "ok" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline:\n  - {stage: projector, reducer: random, budget: 64, params: {seeed: 1}}\n")
    res = invoke("validate", str(bad))
    assert res.exit_code == 1
    assert "bad.yaml:2:" in res.output and "seeed" in res.output


def test_schema_writes_json(tmp_path):
    out = tmp_path / "schema.json"
    res = invoke("schema", "-o", str(out))
    assert res.exit_code == 0
    schema = json.loads(out.read_text())
    assert "pipeline" in schema["properties"]


def test_run_embedded_default_model_with_all_three_stages():
    res = invoke("run", str(Path(__file__).resolve().parents[1] / "examples" / "pipeline.yaml"), "--repeats", "3")
    assert res.exit_code == 0, res.output
    assert "LlavaForConditionalGeneration" in res.output
    # Timings are a median with its 10th-90th percentile spread, over repeats after a warm-up.
    assert "median (p10–p90) of 3 runs after a warm-up" in " ".join(res.output.split())
    for stage, before, after in (("vision_encoder", 576, 288), ("projector", 288, 64), ("llm_layer", 64, 32)):
        line = next(l for l in res.output.splitlines() if stage in l)
        assert f"{before}" in line and f"{after}" in line
        assert re.search(r"│ +(\d+\.\d\d) \((\d+\.\d\d)–(\d+\.\d\d)\) │", line), line
        median, low, high = map(float, re.search(r"(\d+\.\d\d) \((\d+\.\d\d)–(\d+\.\d\d)\)", line).groups())
        assert low <= median <= high


# -- issue 16 -----------------------------------------------------------------------------------


def test_budget_option_is_never_truncated():
    res = invoke("run", "pool", "--budget", "64.5", "--synthetic")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "--budget=64.5 is out of range" in res.output and "a number of tokens must be an int" in res.output
    res = invoke("run", "pool", "--budget", "0", "--synthetic")
    assert res.exit_code == 1
    assert "--budget must be a positive int (tokens to keep) or a ratio in (0, 1]" in res.output
    res = invoke("run", "pool", "--budget", "0.25", "--synthetic")
    assert res.exit_code == 0, res.output
    assert "144" in res.output  # a quarter of 576


def test_run_options_that_a_pipeline_file_would_ignore_are_errors(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("pipeline:\n  - {stage: projector, reducer: random, budget: 64}\n")
    res = invoke("run", str(p), "--budget", "32", "--synthetic")
    assert res.exit_code == 1
    assert "--budget only applies when CONFIG is a reducer name" in res.output


def test_validate_runs_every_check_that_needs_no_model(tmp_path):
    apet = tmp_path / "apet.yaml"
    apet.write_text("pipeline:\n  - {stage: projector, reducer: apet, budget: 5, params: {basis_tokens: 10}}\n")
    res = invoke("validate", str(apet))
    assert res.exit_code == 1
    assert "apet.yaml:2:5: pipeline.0" in res.output and "basis_tokens=10" in res.output
    fastv = tmp_path / "fastv.yaml"
    fastv.write_text("pipeline:\n  - {stage: llm_layer, layer: 0, reducer: fastv, budget: 64}\n")
    res = invoke("validate", str(fastv))
    assert res.exit_code == 1
    assert "fastv.yaml:2:31: pipeline.0.layer" in res.output and "must be >= 1" in res.output
    # run rejects both, for the same reasons.
    for path, reason in ((apet, "basis_tokens=10"), (fastv, "must be >= 1")):
        res = invoke("run", str(path), "--synthetic")
        assert res.exit_code == 1 and reason in res.output


def test_brackets_in_help_and_errors_are_printed():
    res = invoke("eval", "--help")
    assert res.exit_code == 0
    assert "Needs the [eval] extra" in res.output and 'pip install "tokenreduce[eval]"' in res.output
    # Error text goes out as written, brackets included (rich would read "[eval]" as markup).
    res = invoke("info", "tome[eval]")
    assert res.exit_code == 1 and "unknown reducer 'tome[eval]'" in res.output


def test_a_non_utf8_file_is_an_error_not_a_traceback(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"pipeline:\n  - {stage: projector, reducer: random, budget: 64} # caf\xe9\n")
    res = invoke("validate", str(p))
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "latin1.yaml:2:" in res.output and "not UTF-8" in res.output
