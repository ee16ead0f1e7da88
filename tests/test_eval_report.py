"""The evaluation table and its helpers (no lmms-eval needed)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

import tokenreduce as tr
from tokenreduce import ConfigError, InvalidInputError, Stage
from tokenreduce.evaluation.benchmark import describe, primary_metric
from tokenreduce.evaluation.commands import check_limit, named_pipelines, parse_budget, parse_pairs
from tokenreduce.evaluation.report import BASELINE, EvalTable, PipelineRun
from tokenreduce.evaluation.stats import TaskStats, merge_stats
from tokenreduce.evaluation.vlm import TokenCount, count_tokens


def _table() -> EvalTable:
    stats = {"gqa": {"tokens": 576.0, "layer_mean_tokens": 576.0, "seconds_per_sample": 0.2}}
    runs = [
        PipelineRun(BASELINE, "none", {"gqa": 0.60, "pope": 0.80}, {"gqa": "exact_match", "pope": "acc"}, stats),
        PipelineRun(
            "apet-64", "apet@projector:64", {"gqa": 0.54, "pope": 0.84}, {}, {"gqa": {"tokens": 64.0, "seconds_per_sample": 0.1}}
        ),
        PipelineRun("zero", "x", {"gqa": 0.0}, {}, {}),
    ]
    return EvalTable("m", ["gqa", "pope"], runs)


def test_relative_and_mean_relative_scores():
    t = _table()
    apet = t.runs[1]
    assert t.relative(apet, "gqa") == pytest.approx(90.0)
    assert t.relative(apet, "pope") == pytest.approx(105.0)
    assert t.mean_relative(apet) == pytest.approx(97.5)
    assert t.mean_relative(t.baseline) == pytest.approx(100.0)
    # A task the row lacks is left out of its mean, not counted as 0.
    assert t.relative(t.runs[2], "pope") is None
    assert t.mean_relative(t.runs[2]) == pytest.approx(0.0)


def test_relative_is_undefined_when_the_unreduced_score_is_zero():
    runs = [PipelineRun(BASELINE, "none", {"a": 0.0}), PipelineRun("p", "x", {"a": 0.5})]
    t = EvalTable("m", ["a"], runs)
    assert t.relative(runs[1], "a") is None and t.mean_relative(runs[1]) is None


def test_markdown_json_and_plot_are_written(tmp_path):
    t = _table()
    paths = t.write(tmp_path)
    md = paths["markdown"].read_text()
    assert "| apet-64 | 0.54 (90.0%) | 0.84 (105.0%) | 97.5 | 64.0 | 100.0 |" in md
    assert "gqa (exact_match)" in md and "pope (acc)" in md
    data = json.loads(paths["json"].read_text())
    row = next(r for r in data["rows"] if r["name"] == "apet-64")
    assert row["relative"]["gqa"] == pytest.approx(90.0) and row["tokens"] == 64.0
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_primary_metric_order():
    res = {"alias": "gqa", "exact_match,none": 0.6, "exact_match_stderr,none": 0.01, "other,none": 0.1}
    assert primary_metric("gqa", res, {"metric_list": [{"metric": "exact_match"}]}) == ("exact_match", 0.6)
    assert primary_metric("gqa", res, None, override="other") == ("other", 0.1)
    assert primary_metric("gqa", res, None)[0] == "exact_match"
    with pytest.raises(KeyError, match="no metric 'nope'"):
        primary_metric("gqa", res, None, override="nope")


def test_parse_budget_and_pairs():
    assert parse_budget("64") == 64 and isinstance(parse_budget("64"), int)
    assert parse_budget("1.0") == 1.0 and isinstance(parse_budget("1.0"), float)
    with pytest.raises(InvalidInputError, match="'abc' is not a number"):
        parse_budget("abc")
    with pytest.raises(InvalidInputError, match="64.5"):  # never truncated to 64
        parse_budget("64.5")
    assert check_limit(3.0) == 3 and check_limit(0.25) == 0.25
    for bad in (2.5, 0, -1):
        with pytest.raises(ConfigError, match="--limit"):
            check_limit(bad)
    assert parse_pairs(["dtype=float16", "batch=2", "x=true"], "--model-arg") == {"dtype": "float16", "batch": 2, "x": True}
    with pytest.raises(ConfigError, match="key=value"):
        parse_pairs(["oops"], "--model-arg")


def test_named_pipelines_cross_reducers_and_budgets(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("pipeline:\n  - {stage: projector, reducer: pool, budget: 16}\n")
    pipes = named_pipelines([cfg], "random,pool", "8,0.5", None, None)
    assert [n for n, _ in pipes] == ["mine", "random-8", "random-0.5", "pool-8", "pool-0.5"]
    assert describe(pipes[1][1]) == "random@projector:8" and describe(None) == "none"
    with pytest.raises(ConfigError, match="--budgets"):
        named_pipelines([], "random", None, None, None)
    # Per-reducer stage and layer: name@stage or name@llm_layer:K.
    mixed = dict(named_pipelines([], "pool@vision_encoder,random@llm_layer:3", "16", "projector", None))
    assert describe(mixed["pool-16"]) == "pool@vision_encoder:16"
    assert describe(mixed["random-16"]) == "random@llm_layer[3]:16"
    with pytest.raises(ConfigError, match="must be an int"):
        named_pipelines([], "random@llm_layer:x", "16", None, None)


def test_count_tokens_from_records():
    rec = lambda stage, layer, before, after: SimpleNamespace(
        stage=stage, layer=layer, reducer="r", tokens_before=before, tokens_after=after
    )
    records = [rec(Stage.PROJECTOR, None, [36, 36], [8, 8]), rec(Stage.LLM_LAYER, 2, [8, 8], [4, 4])]
    c = count_tokens(72, 2, records, layers=4)
    assert c.llm_input == 16.0  # 72 - 2 * (36 - 8)
    # Layers 0-1 see 16 tokens, layers 2-3 see 8: mean 12.
    assert c.layer_mean == pytest.approx(12.0)
    assert count_tokens(72, 2, [], layers=4).layer_mean == 72.0


def test_stats_merge_across_processes():
    a, b = TaskStats(), TaskStats()
    a.add(TokenCount(rows=2, visual_in=72, llm_input=16.0, layer_mean=16.0), 1.0, [0, 1])
    b.add(TokenCount(rows=1, visual_in=36, llm_input=36.0, layer_mean=36.0), 2.0, [2])
    merged = merge_stats([{"t": a.as_dict()}, {"t": b.as_dict()}])["t"]
    assert merged["docs"] == 3 and merged["seconds"] == 3.0
    assert merged["tokens"] == pytest.approx((16 + 36) / 3)
    assert merged["seconds_per_sample"] == pytest.approx(1.0)
    assert math.isnan(PipelineRun("x", "", {}).tokens)


def test_pipeline_files_can_name_their_rows(tmp_path):
    cfg = tmp_path / "two.yaml"
    cfg.write_text(
        "pipeline:\n  - {stage: projector, reducer: pool, budget: 16}\n"
        "  - {stage: llm_layer, layer: 2, reducer: random, budget: 8}\n"
    )
    pipes = dict(named_pipelines([f"pool-16={cfg}", cfg], None, None, None, None))
    assert set(pipes) == {"pool-16", "two"}
    assert describe(pipes["pool-16"]) == "pool@projector:16 + random@llm_layer[2]:8" == describe(pipes["two"])
    odd = tmp_path / "a=b.yaml"  # a file whose name has '=' is still a file
    odd.write_text(cfg.read_text())
    assert [n for n, _ in named_pipelines([odd], None, None, None, None)] == ["a=b"]
    with pytest.raises(ConfigError, match="NAME=FILE"):
        named_pipelines([f"={cfg}"], None, None, None, None)


ROOT = Path(__file__).resolve().parents[1]


def _eval_command(page: Path) -> list[str]:
    """The paper-style ``tokenreduce.cli eval`` command of a page, as argv after ``eval``."""
    text = page.read_text()
    start = text.index("-m tokenreduce.cli eval")
    block = text[start : text.index("```", start)].replace("\\\n", " ")
    return shlex.split(block)[3:]


@pytest.mark.parametrize("page", ["README.md", "docs/evaluation.md"])
def test_paper_style_command_has_a_row_for_every_image_method(page):
    argv = _eval_command(ROOT / page)
    opts: dict[str, list[str]] = {}
    for flag, value in zip(argv[::2], argv[1::2]):
        opts.setdefault(flag, []).append(value)
    (reducers,), (budgets,) = opts["--reducers"], opts["--budgets"]
    files = [f"{name}={ROOT / path}" for name, _, path in (p.partition("=") for p in opts["--pipeline"])]
    pipes = named_pipelines(files, reducers, budgets, None, None)
    methods = {s.reducer.name for _, p in pipes for s in p}
    # Every registered image method (LLaVA's ApET preset; not the random / pool references, nor
    # the video methods and their decoder-side companions, which an image cannot run) has rows.
    from benchmarks.video import video_only

    names = set(tr.get_registry().reducers) - {"random", "pool", "apet", "apet-qwen"} - video_only()
    # PyramidDrop's published schedule is a ratio per step; the page shows its YAML separately.
    assert methods == names - {"pdrop"}
    # Multi-step methods come in their published form, not as their first step alone.
    steps = {s.reducer.name: len(p) for _, p in pipes for s in p}
    assert steps["vscan"] == 2 and steps["sparsevlm"] == 3 and steps["mustdrop"] == 5
    assert all(n == 1 for m, n in steps.items() if m not in ("vscan", "sparsevlm", "mustdrop"))
    assert {n for n, _ in pipes} >= {"vscan-64", "sparsevlm-64", "mustdrop-64", "holov-128", "vispruner-192"}
