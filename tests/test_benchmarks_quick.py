"""The benchmark code runs in ``--quick`` mode (tiny configs, CPU) and writes what the report needs.

One module-scoped run of ``python -m benchmarks.run --suite all --quick`` on the image models
into a temporary folder (the video row has its own run: tests/test_benchmarks_video.py); the
tests then check the JSON, Markdown and PNG it produced, plus the analytic
pieces (roofline counts, budgets, token counts of the published configs) and that the
hand-written "official" decoder loop reproduces the model's own forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tokenreduce
from benchmarks import apet_in_model, attention_cost, end_to_end, models, report, roofline, run, video

QUICK_MODELS = ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b")
ATTENTION_MODELS = ("llava-1.5-7b", "llava-next-7b")
META_KEYS = {"date", "command", "device", "gpu", "torch", "transformers", "tokenreduce", "quick"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    assert run.main(["--suite", "all", "--quick", "--models", *QUICK_MODELS, "--out", str(out), "--quiet"]) == 0
    return out


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_every_result_file_is_written(results: Path) -> None:
    names = {p.name for p in results.iterdir()}
    expected = {"roofline.json", "overhead.json", "README.md", "overhead_vs_n.png"}
    expected |= {f"e2e_{m}.json" for m in QUICK_MODELS} | {f"latency_vs_budget_{m}.png" for m in QUICK_MODELS}
    expected |= {f"attention_{m}.json" for m in ATTENTION_MODELS}
    assert expected <= names, f"missing: {sorted(expected - names)}"
    for png in results.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png.name
    assert not list(results.glob("*.tmp")), "an atomic write was left half done"


def test_metadata_names_the_run(results: Path) -> None:
    for path in results.glob("*.json"):
        meta = _load(path)["meta"]
        assert META_KEYS <= set(meta), f"{path.name}: {sorted(META_KEYS - set(meta))} missing"
        assert meta["quick"] is True and meta["device"] == "cpu"
        assert "--quick" in meta["command"] and meta["torch"] == torch.__version__
    peaks = _load(results / "roofline.json")["peaks"]
    assert peaks["matmul_tflops"] > 0 and peaks["bandwidth_gbs"] > 0


def test_overhead_times_every_reducer_at_every_stage(results: Path) -> None:
    doc = _load(results / "overhead.json")
    rows = doc["results"]
    reg = tokenreduce.get_registry()
    expected = {(n, s.value) for n, e in reg.reducers.items() for s in e.cls.stages}
    assert {(r["reducer"], r["stage"]) for r in rows} == expected
    for r in rows:
        assert r["status"] == "ok", r
        assert r["kept"] == r["T"] == round(r["N"] / 9)
        assert r["reps"] == 3 and 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert {(r["B"], r["N"], r["D"], r["dtype"]) for r in rows} == {(1, 144, 32, "bfloat16"), (2, 144, 32, "bfloat16")}


@pytest.mark.parametrize("model", QUICK_MODELS)
def test_end_to_end_records(results: Path, model: str) -> None:
    doc = _load(results / f"e2e_{model}.json")
    assert doc["model"]["image_tokens"] > 0 and doc["peaks"]["matmul_tflops"] > 0
    rows = doc["results"]
    assert not [r for r in rows if r["status"] not in ("ok", "unsupported")], "a setting failed"
    base = {r["batch"]: r for r in rows if r["setting"] == "none"}
    assert set(base) == {1, 2}
    n = doc["model"]["image_tokens"]
    reps = doc["config"]["reps"]
    assert reps == 3 and doc["config"]["warmup"] == 1 and doc["config"]["paths"] == ["eager"]
    for r in rows:
        if r["status"] != "ok":
            continue
        # Every setting: warmed up, timed in every round, percentiles of TTFT and decode recorded.
        assert r["path"] == "eager" and r["warmup"] == 1 and r["rounds"] == reps
        assert len(r["samples"]["ttft_ms"]) == len(r["samples"]["generate_ms"]) == reps
        t, d = r["ttft"], r["decode"]
        assert t["reps"] == reps and 0 < t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]
        # A round whose generate() took no longer than the median prefill has no decode time to
        # divide by (tiny CPU models only: 2 decoded tokens): it is left out and counted.
        assert 1 <= d["reps"] <= reps
        assert t["median_ms"] == r["ttft_ms"] and sorted(r["samples"]["ttft_ms"])[1] == r["ttft_ms"]
        assert 0 < d["p10_tok_s"] <= d["median_tok_s"] <= d["p90_tok_s"] and d["median_tok_s"] == r["decode_tok_s"]
        s = r["speedup_rounds"]
        assert s["reps"] == reps and s["p10"] <= s["median"] <= s["p90"]
        # The spread comes from per-round pairs with the unreduced setting of the same batch.
        ref = base[r["batch"]]["samples"]["ttft_ms"]
        pairs = sorted(x / y for x, y in zip(ref, r["samples"]["ttft_ms"]))
        assert s["median"] == pytest.approx(pairs[1])
    for r in base.values():
        assert r["status"] == "ok" and r["ttft_ms"] > 0 and r["ideal_ms"] > 0 and r["new_tokens"] == 3
        assert r["image_tokens_per_layer"] == [n] * doc["model"]["decoder_layers"]
        assert r["kv_prefill_bytes"] == r["kv_prefill_bytes_analytic"]
        assert r["speedup"] == pytest.approx(1.0) and r["ratio"] == pytest.approx(1.0)
    # Every registered method has its rows (the family's variant of ApET), run or refused at patch
    # time; the video methods and their decoder parts run in the video row instead.
    reg = tokenreduce.get_registry()
    family = next(s.family for s in models.QUICK_SPECS if s.key == model)
    variants = {v for fam in end_to_end.VARIANTS.values() for v in fam.values()} | set(end_to_end.VARIANTS)
    expected = {nm for nm in reg.reducers if nm not in variants and nm not in video.video_only()}
    expected |= {fam[family] for fam in end_to_end.VARIANTS.values()}
    assert {r["reducer"] for r in rows if r["reducer"] is not None} == expected
    reduced = [r for r in rows if r["reducer"] is not None and r["status"] == "ok"]
    assert any(r["reducer"].startswith("apet") for r in reduced), "ApET did not run"
    assert {r["stage"] for r in reduced} == {"projector", "vision_encoder", "llm_layer"}
    layers = doc["model"]["decoder_layers"]
    for r in reduced:
        # The decoder really saw the reduced sequence (LLaVA-NeXT keeps its row-newline tokens on top).
        last = r["image_tokens_per_layer"][-1]
        assert last == r["budget"] if model != "llava-next-7b" else r["budget"] <= last < n, r["setting"]
        assert r["stage_records"][-1]["tokens_after"] == [r["budget"]] * r["batch"]
        # One record per step, each keeping its step's budget (multi-step methods included).
        assert [s["tokens_after"] for s in r["stage_records"]] == [[b] * r["batch"] for b in r["step_budgets"]]
        setting = end_to_end.Setting(
            r["reducer"], r["stage"], tuple(r["step_budgets"]), tuple(r["layers"]), tuple(r["params"].items()), r["target"]
        )
        assert setting.name == r["setting"]
        if model != "llava-next-7b":
            assert r["image_tokens_per_layer"] == setting.image_tokens_per_layer(n, layers), r["setting"]
        assert r["kv_prefill_bytes"] < base[r["batch"]]["kv_prefill_bytes"]
        assert r["ideal_speedup"] > 1 and r["ratio"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
        assert {"vision", "projector", "decoder", "lm_head"} == set(r["roofline"]["components"])


def test_profile_of_the_target_settings(results: Path) -> None:
    rows = _load(results / "e2e_llava-1.5-7b.json")["results"]
    profiled = {r["setting"] for r in rows if "profile" in r}
    assert "none" in profiled and any(s.startswith("apet") for s in profiled)
    for r in rows:
        if "profile" in r:
            prof = r["profile"]
            assert prof["top"] and prof["total_cpu_ms"] > 0
            # The reducer's own time inside the model is a named range of the profile.
            assert set(prof["reducers"]) == ({r["reducer"]} if r["reducer"] else set())
            assert all(v["calls"] == 1 and v["cpu_ms"] > 0 for v in prof["reducers"].values())


@pytest.mark.parametrize("model", ATTENTION_MODELS)
def test_attention_cost_paths_agree(results: Path, model: str) -> None:
    rows = _load(results / f"attention_{model}.json")["results"]
    paths = {(r["method"], r["path"]) for r in rows if r["status"] == "ok"}
    assert paths >= {
        ("none", "sdpa"),
        ("none", "eager"),
        ("fastv", "tokenreduce-sdpa"),
        ("fastv", "official-eager"),
        ("pdrop", "tokenreduce-sdpa"),
        ("pdrop", "official-eager"),
        ("pdrop", "official"),
        ("fastv", "fp32-check"),
        ("pdrop", "fp32-check"),
    }
    for r in rows:
        if r["path"] == "fp32-check":
            assert r["identical"] is True, r
        elif r["method"] != "none" and r["path"] != "tokenreduce-sdpa":
            assert r["kept_vs_tokenreduce"]["overlap"] > 0.5, r


def test_report_has_every_section(results: Path) -> None:
    text = (results / "README.md").read_text()
    for head in ["## Environment", "## Targets (issue 8)", "## Attention cost", "## Reducer overhead", "## Plots"]:
        assert head in text, head
    for m in QUICK_MODELS:
        assert f"## End to end: {m}" in text
    data = report.load(results)
    rows = report.targets(data, report.overhead_rows(data))
    kinds = " ".join(t["target"] for t in rows)
    assert "TTFT speed-up / ideal speed-up" in kinds and "ApET's own time" in kinds
    assert "fastv through tokenreduce" in kinds and "pdrop through tokenreduce" in kinds and "slowest reducer" in kinds
    assert all(isinstance(t["met"], bool) for t in rows)


# -- the analytic pieces -----------------------------------------------------------------


def test_published_image_token_counts() -> None:
    counts = {s.key: models.image_token_count(s, models.build_config(s, quick=False)) for s in models.FULL_SPECS}
    # 24x24 patches; NeXT 672x672 = base 576 + 48 rows of (48 + newline); Qwen 96x96 patches merged 2x2;
    # OneVision: 32 frames of 27x27 patches pooled to 14x14, then the video's newline.
    assert counts == {
        "llava-1.5-7b": 576,
        "llava-next-7b": 576 + 48 * 49,
        "qwen2.5-vl-7b": 48 * 48,
        "llava-onevision-7b-video": 32 * 196 + 1,
    }


def test_settings_budgets_and_token_profile() -> None:
    assert end_to_end.scaled_budgets(576) == [192, 128, 64]
    assert end_to_end.scaled_budgets(2304) == [768, 512, 256]
    settings = end_to_end.settings_for(models.LLAVA, 576, 32, [64])
    pdrop = next(s for s in settings if s.reducer == "pdrop")
    # (64/576)^(1/3) per step: 576 -> 277 -> 133 -> 64 at the published layers 8/16/24.
    assert pdrop.layers == (8, 16, 24) and pdrop.budgets == (277, 133, 64)
    assert pdrop.image_tokens_per_layer(576, 32) == [576] * 8 + [277] * 8 + [133] * 8 + [64] * 8
    fastv = next(s for s in settings if s.reducer == "fastv")
    assert fastv.layers == (2,) and fastv.image_tokens_per_layer(576, 4) == [576, 576, 64, 64]
    names = [s.reducer for s in settings]
    assert names[0] is None and "apet-llava" in names and "apet-qwen" not in names and "apet" not in names
    assert next(s for s in end_to_end.settings_for(models.QWEN, 2304, 28, [256]) if s.reducer == "pdrop").layers == (
        7,
        14,
        21,
    )


def _mean_tokens(setting: end_to_end.Setting, n: int, layers: int) -> float:
    per_layer = setting.image_tokens_per_layer(n, layers)
    return sum(per_layer) / len(per_layer)


def test_multi_step_methods_run_their_published_schedules() -> None:
    by = {s.reducer: s for s in end_to_end.settings_for(models.LLAVA, 576, 32, [64])}
    # VScan (README, scripts/llava1_5): 96 after the projector, 32 from layer 16 on: 64 on average.
    vscan = by["vscan"]
    assert (vscan.stage, vscan.layers, vscan.budgets, vscan.name) == ("projector", (16,), (96, 32), "vscan@projector+L16:64")
    assert vscan.image_tokens_per_layer(576, 32) == [96] * 16 + [32] * 16 and _mean_tokens(vscan, 576, 32) == 64
    assert [(s.stage.value, s.layer, s.reducer.budget) for s in vscan.pipeline()] == [
        ("projector", None, 96),
        ("llm_layer", 16, 32),
    ]
    # SparseVLM "64": the official 66 / 30 / 17 selected tokens plus 16 / 2 / 1 recycled clusters.
    sparse = by["sparsevlm"]
    assert (sparse.stage, sparse.layers, sparse.budgets, sparse.budget) == ("llm_layer", (3, 7, 16), (82, 32, 18), 18)
    assert sparse.name == "sparsevlm@L3/7/16:64" and len(sparse.pipeline()) == 3
    # MustDrop: the documented example, a window merge to 432 then four decoder filters.
    must = by["mustdrop"]
    assert (must.stage, must.layers, must.budgets) == ("vision_encoder", (3, 7, 11, 15), (432, 192, 128, 96, 64))
    assert [s.stage.value for s in must.pipeline()] == ["vision_encoder"] + ["llm_layer"] * 4
    assert must.image_tokens_per_layer(576, 32) == [432] * 3 + [192] * 4 + [128] * 4 + [96] * 4 + [64] * 17
    assert (by["vispruner"].stage, by["vispruner"].budgets) == ("vision_encoder", (64,))
    for name in ("cdpruner", "holov"):
        assert (by[name].stage, by[name].layers, by[name].budgets) == ("projector", (), (64,))
    # Other budgets and depths: VScan keeps 1.5 T / 0.5 T from the middle layer (Qwen2.5-VL:
    # layer 14 of 28, as its official script), SparseVLM's official "128" / "192" schedules.
    at = {(s.reducer, s.label): s for s in end_to_end.settings_for(models.LLAVA, 576, 32, [128, 192])}
    assert at["vscan", 192].budgets == (288, 96) and at["vscan", 128].budgets == (192, 64)
    assert at["sparsevlm", 128].budgets == (312, 117, 39) and at["sparsevlm", 192].budgets == (309, 204, 113)
    assert at["mustdrop", 192].budgets == (432, 432, 384, 288, 192)  # never more than a step receives
    qwen = {s.reducer: s for s in end_to_end.settings_for(models.QWEN, 2304, 28, [256])}
    assert (qwen["vscan"].layers, qwen["vscan"].budgets) == ((14,), (384, 128)) and _mean_tokens(qwen["vscan"], 2304, 28) == 256
    assert qwen["sparsevlm"].layers == (3, 6, 14) and qwen["mustdrop"].layers == (3, 6, 10, 13)
    # A decoder too shallow for every published layer: steps that land on one layer keep the later budget.
    tiny = {s.reducer: s for s in end_to_end.settings_for(models.LLAVA, 36, 4, [12])}
    assert (tiny["vscan"].layers, tiny["vscan"].budgets) == ((2,), (18, 6))
    assert (tiny["mustdrop"].layers, tiny["mustdrop"].budgets) == ((1, 2), (27, 18, 12))
    assert end_to_end.published_stage(type(vscan.pipeline().steps[0].reducer)) == ("projector", (16,))


def test_roofline_counts_match_a_hand_count() -> None:
    spec = models.QUICK_SPECS[0]
    model = models.build_model(spec, device="cpu", dtype=torch.float32, quick=True)
    layer = models.text_model(model).layers[0]
    # q, o: 64x64; k, v: 64x32 (2 kv heads x 16); gate, up, down: 64x96.
    weights = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96
    assert roofline.linear_weights(layer)[0] == weights
    profile = roofline.token_profile(spec, model.config, image_tokens=36, prompt_len=91, per_layer=[36, 36, 10, 10])
    comps = {c.name: c for c in roofline.prefill_components(model, spec, profile, batch=2)}
    length = 55 + 10
    assert comps["decoder.3"].flops == 2.0 * 2 * length * weights + 2.0 * 2 * length**2 * 64
    assert comps["decoder.0"].flops > comps["decoder.3"].flops
    assert comps["lm_head"].flops == 2.0 * 2 * 64 * 128
    peaks = roofline.Peaks(1.0, 1.0, 1, 1.0, "cpu", "float32")
    summary = roofline.summarize_components(list(comps.values()), peaks)
    assert summary["ideal_ms"] == pytest.approx(sum(c.ideal_ms(peaks) for c in comps.values()))
    assert roofline.kv_cache_bytes_analytic(model, profile, 2) == 2 * 4 * 2 * 32 * (2 * 91 + 2 * 65)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_official_decoder_loop_reproduces_the_model(attn: str) -> None:
    spec = models.QUICK_SPECS[0]
    model = models.build_model(spec, device="cpu", dtype=torch.float32, quick=True)
    inputs = models.make_inputs(spec, model.config, batch=2, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        ref = model(**inputs.kwargs, use_cache=False).logits[:, -1:]
        ours, kept = attention_cost.official_prefill(model, inputs, None, attn=attn)
    assert kept == []
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_resume_keeps_measured_records_of_the_same_gpu_only(tmp_path: Path) -> None:
    meta = {"gpu": "H100", "device": "cuda", "quick": False, "torch": "2.11", "transformers": "5.17"}
    config = {"batches": [1, 8], "new_tokens": 64, "reps": 10, "warmup": 1, "paths": ["eager"]}
    rows = [
        {"setting": "none", "batch": 1, "status": "ok", "rounds": 10},
        {"setting": "dart[pivot_by=token_norm]@L2:64", "requested": "dart@L2:64", "batch": 8, "status": "ok", "rounds": 10},
        {"setting": "fastv@L2:64", "batch": 1, "status": "skipped"},
        {"setting": "tome@projector:64", "batch": 1, "status": "ok", "rounds": 4},  # run stopped mid-rounds
        {"setting": "pool@projector:64", "batch": 1, "status": "pending"},  # warmed up, never timed
    ]
    path = tmp_path / "e2e_m.json"
    path.write_text(json.dumps({"meta": meta, "config": config, "results": rows}))
    doc = {"config": config}
    kept = run._previous_e2e(path, meta, doc)
    # Keyed by the requested setting, batch and path (records from before paths: eager); skips re-run.
    assert set(kept) == {("none", 1, "eager"), ("dart@L2:64", 8, "eager")}
    assert doc["resumed_from"] == [meta]
    assert run._previous_e2e(path, {**meta, "gpu": "A100"}, {"config": config}) == {}
    assert run._previous_e2e(path, meta, {"config": {**config, "new_tokens": 8}}) == {}
    assert run._previous_e2e(path, meta, {"config": {**config, "reps": 20}}) == {}
    # Records grow round by round: the run's file replaces a record about the same setting and batch.
    results = [dict(r) for r in rows]
    run.upsert(results, {"setting": "dart[pivot_by=token_norm]@L2:64", "requested": "dart@L2:64", "batch": 8, "x": 1})
    run.upsert(results, {"setting": "dart@L2:64", "batch": 1, "x": 2})
    run.upsert(results, {"setting": "none", "batch": 1, "path": "fast", "x": 3})  # another path: its own record
    assert len(results) == len(rows) + 2 and results[1]["x"] == 1 and results[-2]["x"] == 2 and results[-1]["x"] == 3


def test_apet_in_model_separates_apet_from_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "aim.json"
    assert apet_in_model.main(["--quick", "--reps", "1", "--batches", "2", "--out", str(out)]) == 0
    doc = _load(out)
    assert doc["quick"] is True and "benchmarks.apet_in_model --quick" in doc["command"] and "tiny" in doc["title"]
    (row,) = doc["results"]
    assert row["batch"] == 2 and row["budget"] == 16 and row["reducer_input"]["shape"][0] == 2
    assert row["reducer_input"]["dtype"] == "bfloat16"
    assert row["apet_minus_random_ms"] == pytest.approx(row["ttft_apet_ms"] - row["ttft_random_ms"])
    assert row["speedup_apet"] == pytest.approx(row["ttft_none_ms"] / row["ttft_apet_ms"])
    assert 0 < row["apet_alone_ms"] and "| 2 | 16 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="not a LLaVA-1.5-family model; allowed: llava-1.5-7b"):
        apet_in_model.main(["--quick", "--model", "qwen2.5-vl-7b"])


def test_report_reads_apet_in_model_at_the_smallest_budget() -> None:
    row = {"image_tokens": 576, "reps": 20, "apet_alone_ms": 3.0, "ttft_none_ms": 160.0}
    doc = {
        "results": [
            {**row, "batch": 8, "budget": 64, "ttft_apet_ms": 50.0, "ttft_random_ms": 49.0, "apet_minus_random_ms": 1.0},
            {**row, "batch": 1, "budget": 64, "ttft_apet_ms": 40.0, "ttft_random_ms": 41.0, "apet_minus_random_ms": -1.0},
            {**row, "batch": 8, "budget": 128, "ttft_apet_ms": 70.0, "ttft_random_ms": 60.0, "apet_minus_random_ms": 10.0},
        ]
    }
    got = report._apet_in_model_targets(doc)
    assert [t["value"] for t in got] == [pytest.approx(0.02), 0.0]
    assert got[0]["met"] is False and "batch 8" in got[0]["target"] and "576→64" in got[0]["target"]
    assert got[1]["met"] is True and "noise" in got[1]["detail"]
    assert report._apet_in_model_targets(None) == []


# -- timing protocol of the end-to-end suite ---------------------------------------------------


class _FixedDeadline(run.Deadline):
    """A deadline with a fixed remaining time: admission decisions without wall-clock races."""

    def __init__(self, remaining: float):
        super().__init__(None)
        self._left = remaining

    def remaining(self) -> float:
        return self._left


@pytest.fixture(scope="module")
def tiny_llava() -> tuple[torch.nn.Module, models.ModelSpec, roofline.Peaks]:
    spec = models.QUICK_SPECS[0]
    model = models.build_model(spec, device="cpu", dtype=torch.bfloat16, quick=True)
    return model, spec, roofline.Peaks(1.0, 1.0, 1, 1.0, "cpu", "bfloat16")


def _run(tiny, cfg, deadline, trace=None, on_result=None):
    model, spec, peaks = tiny
    return end_to_end.run_model(
        model,
        spec,
        device="cpu",
        dtype=torch.bfloat16,
        peaks=peaks,
        cfg=cfg,
        deadline=deadline,
        reporter=run.Reporter(quiet=True),
        trace=trace,
        on_result=on_result,
    )


def test_settings_are_warmed_up_then_timed_in_interleaved_rounds(tiny_llava) -> None:
    cfg = end_to_end.E2EConfig(batches=(1, 2), base_budgets=(192,), new_tokens=3, reps=4, reducers=("random", "fastv"))
    trace: list = []
    seen: list = []
    recs = _run(tiny_llava, cfg, run.Deadline(None), trace, seen.append)
    units = [(r["setting"], r["batch"]) for r in recs]
    assert len(units) == 6 and all(r["status"] == "ok" and r["rounds"] == 4 for r in recs)
    # The model's own first generate() at each batch, before any setting.
    assert trace[:2] == [("model-warmup", None, 1, None), ("model-warmup", None, 2, None)]
    warm = [(s, b) for phase, s, b, _ in trace if phase == "warmup"]
    assert warm == units  # every setting warmed up (prefill + generate()), in priority order
    rounds = [(rnd, (s, b)) for phase, s, b, rnd in trace if phase == "round"]
    first_round = trace.index(next(t for t in trace if t[0] == "round"))
    assert all(t[0] != "warmup" for t in trace[first_round:])  # warm-ups all precede the timed calls
    # Round by round: each round times every setting once, and round r ends before r + 1 starts.
    assert [rnd for rnd, _ in rounds] == sorted(rnd for rnd, _ in rounds) and len(rounds) == 4 * len(units)
    for r in range(4):
        order = [u for rnd, u in rounds if rnd == r]
        assert sorted(order) == sorted(units)
        assert order == units[r % 6 :] + units[: r % 6]  # rotated: no setting always runs first
    # Records are re-emitted as rounds complete; the last emission of each is the final record.
    final = {(r["setting"], r["batch"]): r for r in seen}
    assert [final[u]["rounds"] for u in units] == [4] * 6 and len(seen) == 6 + 6 * 4


def test_a_setting_whose_rounds_do_not_fit_is_skipped_with_all_after_it(tiny_llava) -> None:
    cfg = end_to_end.E2EConfig(batches=(1,), base_budgets=(192,), new_tokens=3, reps=10, reducers=("random",))
    trace: list = []
    recs = _run(tiny_llava, cfg, _FixedDeadline(1e-6), trace)
    # Warmed up (which showed its rounds cannot fit), then recorded as skipped; later ones not even warmed.
    assert [r["status"] for r in recs] == ["skipped", "skipped"]
    assert all(r["error"] == "time budget of the suite used up" for r in recs)
    assert [t[1] for t in trace if t[0] == "warmup"] == ["none"] and not [t for t in trace if t[0] == "round"]
    recs = _run(tiny_llava, cfg, _FixedDeadline(0.0))  # already expired: nothing is run
    assert [r["status"] for r in recs] == ["skipped", "skipped"]
    with pytest.raises(ValueError, match="reps must be >= 1"):
        end_to_end.E2EConfig(reps=0)
    with pytest.raises(ValueError, match="paths must be among eager, fast"):
        end_to_end.E2EConfig(paths=("graphs",))


def test_report_pairs_rounds_and_reads_older_files() -> None:
    base = {"ttft_ms": 100.0, "samples": {"ttft_ms": [100.0, 90.0, 110.0]}}
    rec = {"ttft_ms": 50.0, "samples": {"ttft_ms": [50.0, 60.0, 40.0]}, "ttft": {"reps": 3}}
    got = report.speedup_vs_stock(rec, base)
    assert got["median"] == pytest.approx(2.0) and got["rounds"] == 3
    assert got["p10"] == pytest.approx(1.5 + 0.2 * (2.0 - 1.5)) and got["p90"] == pytest.approx(2.75 - 0.2 * (2.75 - 2.0))
    old = report.speedup_vs_stock({"ttft_ms": 50.0, "ttft": {"reps": 3}}, {"ttft_ms": 100.0})
    assert old == {"median": 2.0, "p10": None, "p90": None, "rounds": 3}
    # The committed first runs (written before rounds and paths) still give every table.
    older = report.load(Path("benchmarks/results/h100-first-runs"))
    doc = older["e2e"]["llava-1.5-7b"]
    assert report.paths(doc) == ["eager"] and "Older run" in report.spread_note(doc)
    table = "\n".join(report.buys_table(doc))
    assert "| Reducer | Where it runs | Speed-up, batch 1 | TTFT ms, batch 1 | Speed-up, batch 8 |" in table
    assert "`apet-llava@projector:64` | after the projector |" in table
    # The current results have both paths, and the issue-19 targets are computed from them.
    data = report.load(Path("benchmarks/results"))
    assert report.paths(data["e2e"]["llava-1.5-7b"]) == ["eager", "fast"]
    assert {t["met"] for t in report.targets19(data)} <= {True, False} and report.targets19(data)
    old_run = report.load(Path("benchmarks/results/h200-transformers-5.17"))
    assert all(report.buys(d)["rows"] for d in old_run["e2e"].values())


def test_report_puts_paths_side_by_side() -> None:
    def rec(setting, reducer, batch, path, ttft):
        return {
            "setting": setting, "reducer": reducer, "batch": batch, "path": path, "status": "ok", "ttft_ms": ttft,
            "stage": None if reducer is None else "projector", "layers": [], "budget": 64, "target": 64,
        }

    doc = {
        "config": {"reps": 10},
        "results": [
            rec("none", None, 1, "eager", 40.0),
            rec("none", None, 1, "fast", 20.0),
            rec("random@projector:64", "random", 1, "eager", 40.0),
            rec("random@projector:64", "random", 1, "fast", 10.0),
        ],
    }
    assert report.paths(doc) == ["eager", "fast"]
    table = "\n".join(report.buys_table(doc))
    assert "Speed-up, eager, batch 1" in table and "Speed-up, fast, batch 1" in table
    row = next(line for line in table.splitlines() if "random@" in line)
    assert "| 1.00× | 40.0 | 4.00× | 10.0 |" in row  # both against stock eager without reduction
    fast_none = next(line for line in table.splitlines() if line.startswith("| `none`"))
    assert "| – | – | 2.00× | 20.0 |" in fast_none


def test_end_to_end_measures_eager_and_fast_paths_in_the_same_rounds(tiny_llava) -> None:
    cfg = end_to_end.E2EConfig(
        batches=(1,), base_budgets=(192,), new_tokens=3, reps=2, reducers=("random", "fastv"), paths=("eager", "fast")
    )
    trace: list = []
    recs = _run(tiny_llava, cfg, run.Deadline(None), trace)
    by = {(r["setting"], r["path"]): r for r in recs}
    assert {p for _, p in by} == {"eager", "fast"} and all(r["status"] == "ok" for r in recs)
    # The fast path's unreduced setting is the identity pipeline; an llm_layer step runs split inside it.
    assert "fast_path_notes" not in by[("fastv@L2:12", "fast")]
    assert "fast_path_notes" not in by[("random@projector:12", "fast")]
    # Every round times every (setting, path) once: the paths are interleaved, not run one after the other.
    rounds = [(name, r) for phase, name, _, r in trace if phase == "round"]
    assert len(rounds) == 2 * len(recs)
