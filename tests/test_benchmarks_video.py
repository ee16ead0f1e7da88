"""The video row of the benchmarks runs end to end on the tiny LLaVA-OneVision config (CPU).

One module-scoped ``python -m benchmarks.run --suite e2e --quick --models
llava-onevision-7b-video`` into a temporary folder: no reduction, every registered video
method (whatever exists when the test runs) and the ``random`` / ``pool`` baselines, each
keeping 10% of the video per video; then the JSON records, the report's Video section and
its chart. Plus the published configuration's counts and how a method's YAML example
becomes its benchmark pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tokenreduce
from benchmarks import end_to_end, models, report, run, video, video_report

KEY = "llava-onevision-7b-video"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("video")
    assert run.main(["--suite", "e2e", "--quick", "--models", KEY, "--out", str(out), "--quiet"]) == 0
    return out


def _doc(results: Path) -> dict:
    return json.loads((results / f"e2e_{KEY}.json").read_text())


def _registered(plan: list[dict]) -> bool:
    reg = tokenreduce.get_registry()
    return all(p["reducer"] in reg.reducers for p in plan)


def test_published_configuration_and_token_counts() -> None:
    (spec,) = models.video_specs(quick=False)
    cfg = models.build_config(spec, quick=False)
    v, t = cfg.vision_config, cfg.text_config
    # SigLIP so400m/14 at 384 (26 of its 27 layers, as llava-hf ships it), Qwen2-7B.
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size) == (1152, 26, 14, 384)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (3584, 28, 28, 4)
    assert (cfg.video_token_id, t.vocab_size, cfg.vision_feature_select_strategy) == (151647, 152128, "full")
    # 27 x 27 patches pooled 2x2 (ceil) to 14 x 14 per frame, 32 frames, one newline per video.
    assert models.frame_token_count(cfg) == 196
    assert models.video_token_count(spec, cfg) == 6272 and models.image_token_count(spec, cfg) == 6273
    with torch.device("meta"):
        model = models.model_class(spec)._from_config(cfg)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.03  # LLaVA-OneVision-7B


def test_inputs_are_one_video_per_row() -> None:
    (spec,) = models.video_specs(quick=True)
    cfg = models.build_config(spec, quick=True)
    inp = models.make_inputs(spec, cfg, batch=2, device="cpu", dtype=torch.float32)
    ids = inp.kwargs["input_ids"]
    assert inp.kwargs["pixel_values_videos"].shape == (2, spec.frames, 3, 48, 48)
    assert (ids == cfg.video_token_id).sum(1).tolist() == [inp.image_tokens] * 2
    assert inp.extra == {"frames": 16, "frame_tokens": 36, "video_tokens": 16 * 36} and inp.image_tokens == 16 * 36 + 1
    # The stock model consumes exactly these placeholders (it raises on a mismatch).
    model = models.build_model(spec, device="cpu", dtype=torch.float32, quick=True)
    with torch.no_grad():
        assert model(**inp.kwargs).logits.shape[:2] == ids.shape


def test_video_row_records(results: Path) -> None:
    doc = _doc(results)
    m = doc["model"]
    assert (m["frames"], m["frame_tokens"], m["video_tokens"], m["image_tokens"]) == (16, 36, 576, 577)
    rows = doc["results"]
    reps = doc["config"]["reps"]
    assert doc["config"]["video_ratio"] == 0.1 and reps == 3
    expected = {None, *video.video_methods(), *video.BASELINES}
    assert {r["reducer"] for r in rows} == expected and {r["batch"] for r in rows} == {1, 2}
    base = {r["batch"]: r for r in rows if r["reducer"] is None}
    for r in base.values():
        assert r["status"] == "ok" and r["image_tokens_per_layer"] == [577] * m["decoder_layers"]
    for r in rows:
        if r["reducer"] is None:
            continue
        assert r["video_budget"] == "per_video" and r["video_ratio"] == 0.1 and r["target"] == 58, r["setting"]
        assert r["setting"].endswith(":10%") and r["plan"][0]["budget"] == 0.1
        if not _registered(r["plan"]):  # a companion not registered yet: the registry says which
            assert r["status"] == "error" and "unknown reducer" in r["error"], r
            continue
        # Every video method and baseline ran: none was refused its frames.
        assert r["status"] == "ok", r
        assert r["path"] == "eager" and r["rounds"] == reps and len(r["samples"]["ttft_ms"]) == reps
        assert 0 < r["ttft"]["p10_ms"] <= r["ttft_ms"] <= r["ttft"]["p90_ms"]
        assert r["speedup_rounds"]["reps"] == reps and r["decode"]["reps"] >= 1
        first = r["plan"][0]
        assert len(r["plan"]) == len(r["step_budgets"])
        assert r["stage_records"][0]["tokens_after"] == [r["step_budgets"][0]] * r["batch"]
        assert abs(r["step_budgets"][0] - 58) <= 1  # 10% of 576, as the method's own rounding makes it
        # One record per prefill step, each keeping its step's budget (a decoder part counts the
        # newline too); a step that acts only while decoding leaves the prompt whole.
        prefill = [b for b, p in zip(r["step_budgets"], r["plan"]) if p["acts_at"] != "decode"]
        assert [s["tokens_after"] for s in r["stage_records"]] == [[b] * r["batch"] for b in prefill]
        setting = video.setting_of(r["reducer"], 576, m["decoder_layers"])
        assert setting.name == r["setting"] and list(setting.budgets) == r["step_budgets"]
        assert r["image_tokens_per_layer"] == setting.image_tokens_per_layer(577, m["decoder_layers"]), r["setting"]
        if first["stage"] != "llm_layer":
            # The decoder saw the reduced video (plus its newline) from its first layer on.
            assert r["image_tokens_per_layer"][0] == r["step_budgets"][0] + 1, r["setting"]
        assert r["kv_prefill_bytes"] < base[r["batch"]]["kv_prefill_bytes"]
        assert [s["tokens_before"] for s in r["stage_records"][:1]] == [[576] * r["batch"]]
    for name in video.BASELINES:
        assert all(r["status"] == "ok" for r in rows if r["reducer"] == name), name


def test_report_has_a_video_section_and_chart(results: Path) -> None:
    text = (results / "README.md").read_text()
    data = report.load(results)
    assert KEY in data["video"] and KEY not in data["e2e"]
    assert "## Video" in text and f"![video_{KEY}](video_{KEY}.png)" in text and f"## End to end: {KEY}" in text
    assert (results / f"video_{KEY}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Setting | Where it runs | Video tokens kept | TTFT ms | TTFT speed-up | Peak GiB | Decode tokens/s |" in text
    assert "| Fast path |" in text and "| not available |" in text and "the fast path is not available yet" in text
    assert "| no reduction (reference) | – | all 576 |" in text and "`random@projector:10%` | after the projector | 58 |" in text
    assert "At batch 1, the model without reduction takes" in text and "Baselines that use no time" in text
    # The docs' section: the same, with the picture's path as the page sees it, and the plot it shows.
    section, shown = report.video_docs(data, plot_prefix="benchmarks/results/", plots=[f"video_{KEY}.png"])
    assert section.startswith("## Video\n") and f"](benchmarks/results/video_{KEY}.png)" in section
    assert shown == [f"video_{KEY}.png"] and "<details" not in section and "??? " not in section
    assert section.index("![") < section.index("| Setting")  # the chart before the table
    assert report.video_docs({"video": {}}) == ("", [])


def test_kept_words_and_paths() -> None:
    assert video_report.kept_words({"stage": "projector", "step_budgets": [627, 125], "layers": [3]}) == "627, then 125 from layer 3"
    assert video_report.kept_words({"stage": "llm_layer", "step_budgets": [627], "layers": [2]}) == "627 from layer 2"
    plan = [{"acts_at": "prefill"}, {"acts_at": "decode"}]
    got = video_report.kept_words({"stage": "projector", "step_budgets": [627, 125], "layers": [3], "plan": plan})
    assert got == "627, then 125 per decoded token from layer 3"
    doc = {"results": [{"status": "ok", "ttft_ms": 1.0, "path": "eager"}, {"status": "ok", "ttft_ms": 1.0, "path": "fast"}]}
    assert video_report.measured_paths(doc) == ["eager", "fast"] and video_report.paths_note(doc) == ""


def test_image_rows_leave_video_methods_out() -> None:
    names = {s.reducer for s in end_to_end.settings_for(models.LLAVA, 576, 32, [64])}
    reg = tokenreduce.get_registry()
    assert not {n for n in names if n and video.needs_frames(reg.reducers[n].cls)}
    assert names.isdisjoint(video.companions())


def test_a_yaml_example_with_a_decoder_part_becomes_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video, "EXAMPLES", tmp_path)
    (tmp_path / "m.yaml").write_text(
        "video_budget: per_video\npipeline:\n"
        "  - {stage: projector, reducer: m, budget: 3136, params: {k: 2}}\n"
        "  - {stage: llm_layer, layer: 3, reducer: m-llm, budget: 0.2}\n"
        "  - {stage: llm_layer, layer: 14, reducer: m-llm, budget: 300}\n"
    )
    plan = video.method_plan("m", 28)
    # 10% at the encoder step (3136 -> 627.2 of 6272: x 0.2), later ratios kept, counts scaled alike.
    assert [(p.stage, p.layer, p.reducer, p.budget, dict(p.params)) for p in plan] == [
        ("projector", None, "m", 0.1, {"k": 2}),
        ("llm_layer", 3, "m-llm", 0.2, {}),
        ("llm_layer", 14, "m-llm", 60, {}),
    ]
    # A shallow decoder: layers at the same relative depth, never two steps on one layer.
    assert [p.layer for p in video.method_plan("m", 4)] == [None, 1, 2]
    (tmp_path / "m.yaml").write_text(
        "pipeline:\n  - {stage: projector, reducer: m, budget: 0.5}\n  - {stage: llm_layer, layer: 2, reducer: m, budget: 100}\n"
    )
    assert [p.budget for p in video.method_plan("m", 28)] == [0.1, round(100 * 0.1 / 0.5)]


def test_every_registered_video_method_gets_a_setting() -> None:
    settings = video.video_settings(6272, 28)
    assert settings[0].reducer is None
    got = [s.reducer for s in settings[1:]]
    reg = tokenreduce.get_registry()
    assert got == video.video_methods() + [b for b in video.BASELINES if b in reg.reducers]
    for s in settings[1:]:
        assert s.label == 627 and s.name.endswith(":10%") and s.plan[0].budget == 0.1
        if s.reducer in video.BASELINES:
            assert (s.stage, s.layers, s.budgets) == ("projector", (), (627,))
        elif _registered([p.as_dict() for p in s.plan]):
            pipe = s.pipeline()
            assert pipe.video_budget == "per_video" and pipe.steps[0].reducer.name == s.reducer
            assert [st.reducer.name for st in pipe] == [p.reducer for p in s.plan]
    with pytest.raises(ValueError, match="video_ratio must be in"):
        end_to_end.E2EConfig(video_ratio=0.0)


def test_a_broken_example_fails_its_setting_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video, "EXAMPLES", tmp_path)
    (tmp_path / "pool.yaml").write_text("pipeline:\n  - {stage: projector, reducer: pool, budget: yes}\n")
    monkeypatch.setattr(video, "BASELINES", ())  # pool as if it were a video method with an example
    setting = video.setting_of("pool", 576, 4)
    assert setting.error is not None and "pool.yaml:2" in setting.error and "budget" in setting.error
    with pytest.raises(tokenreduce.ConfigError, match="the YAML example of 'pool'"):
        setting.pipeline()
