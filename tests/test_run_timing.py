"""``tokenreduce run`` timings: a median and its spread over repeats after a warm-up, not one noisy run."""

from typer.testing import CliRunner

from tokenreduce.cli import app
from tokenreduce.runner import StageRow, summarize, timing_text


def invoke(*args):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_run_timing_summary_and_repeats_option():
    median, spread = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert median == 3.0 and spread == (1.4, 4.6)  # linear interpolation between order statistics
    assert summarize([7.0]) == (7.0, None) and timing_text(7.0, None) == "7.00"
    res = invoke("run", "pool", "--budget", "64", "--synthetic", "--repeats", "4")
    assert res.exit_code == 0, res.output
    assert "median (p10–p90) of 4 calls after a warm-up" in " ".join(res.output.split())
    res = invoke("run", "pool", "--budget", "64", "--synthetic", "--repeats", "0")
    assert res.exit_code != 0 and "repeats" in res.output


def test_stage_row_time_text_shows_median_and_spread():
    row = StageRow("projector", "pool", None, 576, 64, 2.5, 0.1, (2.0, 3.25))
    assert row.time_text == "2.50 (2.00–3.25)"
    assert StageRow("projector", "pool", None, 576, 64, 2.5, 0.1).time_text == "2.50"
