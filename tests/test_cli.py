import json
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
    res = invoke("run", str(Path(__file__).resolve().parents[1] / "examples" / "pipeline.yaml"))
    assert res.exit_code == 0, res.output
    assert "LlavaForConditionalGeneration" in res.output
    for stage, before, after in (("vision_encoder", 576, 288), ("projector", 288, 64), ("llm_layer", 64, 32)):
        line = next(l for l in res.output.splitlines() if stage in l)
        assert f"{before}" in line and f"{after}" in line
