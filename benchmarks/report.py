"""Markdown tables and PNG plots from the JSON results (``python -m benchmarks.report [--out DIR]``).

Reads every ``roofline.json``, ``overhead.json``, ``e2e_*.json`` and ``attention_*.json``
of the folder and writes ``README.md`` (environment, the targets of issue 8 with how far
each is from its goal, one table per suite, errors and skipped work) and the plots
``latency_vs_budget_<model>.png``, ``memory_vs_budget_<model>.png`` and
``overhead_vs_n.png``. Video rows (``e2e_<key>.json`` of a model with frames) get a
"Video" section and ``video_<key>.png`` (:mod:`benchmarks.video_report`).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import video_report
from .common import read_json

TARGET_RATIO = 0.90  # ApET TTFT speed-up >= 90% of the roofline-ideal speed-up
TARGET_APET_SHARE = 0.02  # ApET's own time < 2% of the reduced prefill
TARGET_REDUCER_SHARE = 0.05  # no reducer slower than 5% of the unreduced prefill at N = 576


def load(out: Path) -> dict[str, Any]:
    """All result documents of a folder; end-to-end files of video rows under ``"video"``, the others under ``"e2e"``."""
    e2e = {p.stem[len("e2e_") :]: read_json(p) for p in sorted(out.glob("e2e_*.json"))}
    return {
        "roofline": read_json(out / "roofline.json"),
        "overhead": read_json(out / "overhead.json"),
        "e2e": {k: d for k, d in e2e.items() if not video_report.is_video(d)},
        "video": {k: d for k, d in e2e.items() if video_report.is_video(d)},
        "attention": {p.stem[len("attention_") :]: read_json(p) for p in sorted(out.glob("attention_*.json"))},
        # benchmarks/apet_in_model.py: ApET against `random` at the same budget, 20 reps in rotation.
        "apet_in_model": read_json(out / "apet_in_model_cuda.json"),
    }


# -- joins ---------------------------------------------------------------------------------


def prefill_ms(data: dict[str, Any], n: int, batch: int, device: str) -> tuple[float, str] | None:
    """Unreduced prefill of the e2e model whose image-token count is nearest ``n`` (within 2x), same batch and device kind."""
    best = None
    for key, doc in data["e2e"].items():
        if doc is None or doc["meta"]["device"].split(":")[0] != device:
            continue
        for r in doc["results"]:
            if r["setting"] == "none" and r["batch"] == batch and r["status"] == "ok":
                dist = abs(math.log(r["image_tokens"] / n))
                if dist <= math.log(2) and (best is None or dist < best[0]):
                    best = (dist, r["ttft_ms"], key)
    return None if best is None else (best[1], best[2])


def overhead_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Overhead records with ``share``: the fraction of the matching unreduced prefill."""
    doc = data["overhead"]
    if doc is None:
        return []
    rows = []
    for r in doc["results"]:
        r = dict(r)
        if r["status"] == "ok":
            match = prefill_ms(data, r["N"], r["B"], r["device"])
            if match is not None:
                r["prefill_ms"], r["prefill_model"] = match
                r["share"] = r["median_ms"] / match[0]
        rows.append(r)
    return rows


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _fmt(x: Any, spec: str = ".1f", none: str = "–") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _pct(x: float | None) -> str:
    return _fmt(None if x is None else 100 * x, ".2f") + ("%" if x is not None else "")


def _spread(lo: float | None, hi: float | None, spec: str) -> str:
    return "–" if lo is None or hi is None else f"{format(lo, spec)}–{format(hi, spec)}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


# -- targets -------------------------------------------------------------------------------


def targets(data: dict[str, Any], ov: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of issue 8: the measured value, the goal, met or by how much it is missed."""
    out = []
    first = next(iter(data["e2e"].values()), None)
    apet = []
    if first is not None:
        recs = _ok(first["results"])
        apet = [r for r in recs if (r["reducer"] or "").startswith("apet") and r["stage"] == "projector"]
        small = min((r["budget"] for r in apet), default=None)
        for b in sorted({r["batch"] for r in apet}, reverse=True):
            hit = [r for r in apet if r["budget"] == small and r["batch"] == b and "ratio" in r]
            if hit:
                r = hit[0]
                out.append(
                    {
                        "target": f"{r['setting']} on {r['model']}, {r['image_tokens']}→{small}, batch {b}: TTFT speed-up / ideal speed-up",
                        "value": r["ratio"],
                        "goal": f"≥ {TARGET_RATIO:.0%}",
                        "met": r["ratio"] >= TARGET_RATIO,
                        "detail": f"speed-up {r['speedup']:.2f}x vs ideal {r['ideal_speedup']:.2f}x "
                        f"(TTFT {r['ttft_ms']:.1f} ms vs ideal {r['ideal_ms']:.1f} ms)",
                        "fmt": "pct",
                        "primary": b == max(x["batch"] for x in apet),
                    }
                )
        device = first["meta"]["device"].split(":")[0]
        for r in [r for r in apet if r["budget"] == small]:
            share = _apet_share(ov, r, device)
            if share is not None:
                out.append(
                    {
                        "target": f"ApET's own time / reduced prefill ({r['model']}, batch {r['batch']})",
                        "value": share[0],
                        "goal": f"< {TARGET_APET_SHARE:.0%}",
                        "met": share[0] < TARGET_APET_SHARE,
                        "detail": f"standalone call (overhead suite): {share[1]:.3f} ms of {r['ttft_ms']:.1f} ms",
                        "fmt": "pct",
                    }
                )
            inside = (r.get("profile") or {}).get("reducers", {}).get(r["reducer"])
            if inside:
                ms = inside["device_ms"] if device == "cuda" else inside["cpu_ms"]
                out.append(
                    {
                        "target": f"ApET's own time / reduced prefill, inside the model ({r['model']}, batch {r['batch']})",
                        "value": ms / r["ttft_ms"],
                        "goal": f"< {TARGET_APET_SHARE:.0%}",
                        "met": ms / r["ttft_ms"] < TARGET_APET_SHARE,
                        "detail": f"profiled range `tokenreduce.{r['reducer']}`: {ms:.3f} ms of {r['ttft_ms']:.1f} ms",
                        "fmt": "pct",
                    }
                )
    out += _apet_in_model_targets(data.get("apet_in_model"))
    for key, doc in data["attention"].items():
        if doc is None:
            continue
        recs = doc["results"]
        n = doc["model"]["image_tokens"]
        for method in ("fastv", "pdrop"):
            for b in sorted({r["batch"] for r in recs if r["method"] == method}):
                ours = [
                    r
                    for r in recs
                    if r["method"] == method
                    and r["batch"] == b
                    and r["path"] == "tokenreduce-sdpa"
                    and r["status"] == "ok"
                ]
                orig = [
                    r
                    for r in recs
                    if r["method"] == method
                    and r["batch"] == b
                    and r["path"] == "official-eager"
                    and r["status"] == "ok"
                ]
                if not ours or not orig:
                    continue
                o, e = ours[0], orig[0]
                fp32 = [r for r in recs if r["method"] == method and r["path"] == "fp32-check" and r["status"] == "ok"]
                same = fp32[0]["identical"] if fp32 else e.get("kept_vs_tokenreduce", {}).get("identical")
                faster = o["ttft_ms"] < e["ttft_ms"]
                lighter = o["peak_gib"] is not None and e["peak_gib"] is not None and o["peak_gib"] < e["peak_gib"]
                out.append(
                    {
                        "target": f"{method} through tokenreduce vs eager original, {key} ({n} image tokens), batch {b}",
                        "value": e["ttft_ms"] / o["ttft_ms"],
                        "goal": "faster, less memory, same kept tokens",
                        "met": bool(faster and (lighter or o["peak_gib"] is None) and same),
                        "detail": f"TTFT {o['ttft_ms']:.1f} vs {e['ttft_ms']:.1f} ms; peak "
                        f"{_fmt(o['peak_gib'], '.2f')} vs {_fmt(e['peak_gib'], '.2f')} GiB; identical kept indices: {same}",
                        "fmt": "x",
                    }
                )
    at576 = [r for r in ov if r.get("share") is not None and r["N"] == 576 and r["device"] == "cuda"]
    if not at576:  # CPU-only runs (quick): check the same thing on what was measured
        smallest = min((r["N"] for r in ov if r.get("share") is not None), default=None)
        at576 = [r for r in ov if r.get("share") is not None and r["N"] == smallest]
    if at576:
        worst = max(at576, key=lambda r: r["share"])
        out.append(
            {
                "target": f"slowest reducer at N={worst['N']} / unreduced prefill (all B, D, dtypes)",
                "value": worst["share"],
                "goal": f"≤ {TARGET_REDUCER_SHARE:.0%}",
                "met": worst["share"] <= TARGET_REDUCER_SHARE,
                "detail": f"{worst['reducer']}@{worst['stage']} B={worst['B']} D={worst['D']} {worst['dtype']}: "
                f"{worst['median_ms']:.3f} ms vs {worst['prefill_ms']:.1f} ms ({worst['prefill_model']})",
                "fmt": "pct",
            }
        )
    return out


def _apet_share(ov: list[dict[str, Any]], r: dict[str, Any], device: str) -> tuple[float, float] | None:
    """ApET's standalone call time at this model's N, batch and width over the reduced prefill (same device, bf16)."""
    width = 4096 if "llava" in r["model"] else 3584
    cands = [
        o
        for o in ov
        if o.get("status") == "ok"
        and o["reducer"] == r["reducer"]
        and o["stage"] == "projector"
        and o["B"] == r["batch"]
        and o["device"] == device
        and o["dtype"] == "bfloat16"
    ]
    exact = [o for o in cands if o["N"] == r["image_tokens"] and o["D"] == width]
    pick = exact or sorted(cands, key=lambda o: (abs(o["N"] - r["image_tokens"]), abs(o["D"] - width)))[:1]
    if not pick:
        return None
    return pick[0]["median_ms"] / r["ttft_ms"], pick[0]["median_ms"]


# -- what each reducer buys ----------------------------------------------------------------

#: Execution path of a record (files written before paths existed measured stock eager).
def path_of(r: dict[str, Any]) -> str:
    return r.get("path") or "eager"


def timed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """End-to-end records with a TTFT (``ok``; a run stopped before its rounds leaves ``pending`` ones)."""
    return [r for r in rows if r.get("status") == "ok" and r.get("ttft_ms") is not None]


def paths(doc: dict[str, Any]) -> list[str]:
    """The execution paths of a file's records, eager first."""
    found = {path_of(r) for r in timed(doc["results"])}
    return sorted(found, key=lambda p: (p != "eager", p))


def percentiles(xs: list[float]) -> tuple[float, float, float]:
    """``(p10, median, p90)``, inclusive deciles as the suite records them."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    qs = statistics.quantiles(xs, n=10, method="inclusive")
    return qs[0], statistics.median(xs), qs[-1]


def speedup_vs_stock(rec: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """TTFT speed-up of ``rec`` over ``base`` (stock: eager, no reduction, same batch).

    With both records' per-round samples (interleaved rounds: round i of one was timed
    moments from round i of the other), the median and p10 / p90 of the per-round ratios;
    otherwise (older files: a median of 3 prefills timed back to back) the ratio of the
    medians and no spread.
    """
    a = (base.get("samples") or {}).get("ttft_ms") or []
    b = (rec.get("samples") or {}).get("ttft_ms") or []
    if len(a) >= 2 and len(a) == len(b) and bool(rec.get("resumed")) == bool(base.get("resumed")):
        p10, med, p90 = percentiles([x / y for x, y in zip(a, b)])
        return {"median": med, "p10": p10, "p90": p90, "rounds": len(a)}
    reps = (rec.get("ttft") or {}).get("reps")
    return {"median": base["ttft_ms"] / rec["ttft_ms"], "p10": None, "p90": None, "rounds": reps}


def where_words(r: dict[str, Any]) -> str:
    """Where a record's steps run, in words."""
    stage = {"projector": "after the projector", "vision_encoder": "in the vision encoder"}.get(r["stage"] or "", "")
    layers = r.get("layers") or []
    if not layers:
        return stage or "–"
    at = ("decoder layer " if len(layers) == 1 else "decoder layers ") + "/".join(map(str, layers))
    return at if r["stage"] == "llm_layer" else f"{stage}, then {at}"


def buys(doc: dict[str, Any]) -> dict[str, Any]:
    """What each reducer buys in one e2e file, at its smallest token count: per setting, per
    (path, batch), the TTFT and its speed-up over stock eager without reduction.

    Returns ``{"target", "batches", "paths", "base": {batch: record}, "rows": [...]}``;
    each row has ``setting``, ``reducer``, ``where`` and ``cells[(path, batch)] =
    {"record", "speedup"}``. Rows are sorted by the speed-up at the smallest batch, best first.
    """
    recs = timed(doc["results"])
    base = {r["batch"]: r for r in recs if r["reducer"] is None and path_of(r) == "eager"}
    reduced = [r for r in recs if r["reducer"] is not None]
    small = min((_label(r) for r in reduced), default=None)
    ps = paths(doc)
    batches = sorted({r["batch"] for r in recs})
    rows: dict[str, dict[str, Any]] = {}
    for r in recs:
        if r["reducer"] is not None and _label(r) != small:
            continue
        if r["reducer"] is None and path_of(r) == "eager":
            continue  # the reference itself
        name = r.get("requested", r["setting"])
        row = rows.setdefault(
            name,
            {
                "setting": name,
                "reducer": r["reducer"] or "none",
                "where": where_words(r) if r["reducer"] else "(no reduction)",
                "cells": {},
            },
        )
        ref = base.get(r["batch"])
        row["cells"][(path_of(r), r["batch"])] = {
            "record": r,
            "speedup": speedup_vs_stock(r, ref) if ref is not None else None,
        }
    first = batches[0] if batches else None

    def order(row: dict[str, Any]) -> float:
        cell = row["cells"].get((ps[0] if ps else "eager", first)) or next(iter(row["cells"].values()))
        return -(cell["speedup"] or {"median": 0.0})["median"]

    return {"target": small, "batches": batches, "paths": ps, "base": base, "rows": sorted(rows.values(), key=order)}


def _x(s: dict[str, Any] | None) -> str:
    """A speed-up with its spread: ``2.61× (2.55–2.66)``."""
    if s is None:
        return "–"
    out = f"{s['median']:.2f}×"
    if s.get("p10") is not None:
        out += f" ({s['p10']:.2f}–{s['p90']:.2f})"
    return out


def buys_summary(doc: dict[str, Any]) -> str:
    """One plain sentence per batch: what no reduction takes, how many reducers beat it, the best."""
    got = buys(doc)
    out = []
    for b in got["batches"]:
        base = got["base"].get(b)
        cells = [
            (row, row["cells"][("eager", b)])
            for row in got["rows"]
            if ("eager", b) in row["cells"] and row["cells"][("eager", b)]["speedup"] and row["reducer"] != "none"
        ]
        if base is None or not cells:
            continue
        best_row, best = max(cells, key=lambda c: c[1]["speedup"]["median"])
        faster = sum(cell["speedup"]["median"] > 1.0 for _, cell in cells)
        out.append(
            f"At batch {b}, the model without reduction takes {base['ttft_ms']:.1f} ms to the first token; "
            f"{faster} of {len(cells)} reducers make it faster, the best being `{best_row['setting']}` at "
            f"{best['record']['ttft_ms']:.1f} ms ({_x(best['speedup'])})."
        )
    return " ".join(out)


def buys_table(doc: dict[str, Any]) -> list[str]:
    """The table of :func:`buys`: one row per setting, speed-up (p10–p90) and TTFT per path and batch."""
    got = buys(doc)
    multi = len(got["paths"]) > 1
    cols = [(p, b) for p in got["paths"] for b in got["batches"]]
    head = ["Reducer", "Where it runs"]
    for p, b in cols:
        tag = f"{p}, batch {b}" if multi else f"batch {b}"
        head += [f"Speed-up, {tag}", f"TTFT ms, {tag}"]
    rows = [
        ["no reduction (reference)", "–"]
        + [x for p, b in cols for x in ("1.00×" if p == "eager" else "–", _ms(got["base"].get(b)) if p == "eager" else "–")]
    ]
    for row in got["rows"]:
        cells = []
        for key in cols:
            cell = row["cells"].get(key)
            cells += ["–", "–"] if cell is None else [_x(cell["speedup"]), _ms(cell["record"])]
        rows.append([f"`{row['setting']}`", row["where"], *cells])
    return _table(head, rows)


def _ms(r: dict[str, Any] | None) -> str:
    return "–" if r is None or r.get("ttft_ms") is None else f"{r['ttft_ms']:.1f}"


def spread_note(doc: dict[str, Any]) -> str:
    """How the file's timings were taken, in words (older files: no spread, cold decode)."""
    cfg = doc.get("config", {})
    recs = timed(doc["results"])
    if any(r.get("samples") for r in recs):
        return (
            f"Each figure is the median of {cfg.get('reps', '?')} rounds (in brackets: p10–p90 of the per-round "
            f"speed-ups); every setting was warmed up, and each round timed every setting once."
        )
    return (
        f"Older run: each TTFT is a median of {cfg.get('prefill_reps', 3)} prefills timed back to back, so no "
        "spread is shown; its decode rates were timed on one cold `generate()` per setting."
    )


# -- targets of issue 19 ---------------------------------------------------------------------

#: Issue 19's goals (LLaVA-1.5-7B shape, 576 -> 64 at the projector unless stated).
TARGET19_B1 = 2.0  # projector methods, batch 1, vs stock eager
TARGET19_B1_LLM = 1.5  # fastv / dart at L2, batch 1
TARGET19_B8 = 3.5  # projector methods, batch 8
TARGET19_REDUCER_MS = {1: 1.0, 8: 2.0}  # every reducer at N=576, D=4096
TARGET19_APET_2880_MS = 5.0  # ApET at N=2880, D=4096, B=8
TARGET19_QWEN = 2.5  # apet-qwen@projector:256, B=1
TARGET19_VS_FAST = 1.7  # projector methods, batch 1, fast path vs the fast path without reduction


def _cross(r: dict[str, Any], base: dict[str, Any]) -> str:
    """A warning where two records come from different runs (one resumed): no paired rounds."""
    if bool(r.get("resumed")) != bool(base.get("resumed")):
        return "; **measured in different runs** (one resumed from an earlier run): indicative only"
    return ""


def targets19(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's targets that the results folder can answer, each met or missed (same keys as :func:`targets`)."""
    out = []

    def add(name: str, goal: float, key: str, reducers, batch, stage, layers, target, against: str = "eager") -> None:
        """One row per matching record, its speed-up over the unreduced setting of path ``against``
        ("eager": stock eager; "fast": the fast path without reduction, compared with fast records only)."""
        doc = data["e2e"].get(key)
        if not doc:
            return
        recs = timed(doc["results"])
        base = next((r for r in recs if r["reducer"] is None and r["batch"] == batch and path_of(r) == against), None)
        if base is None:
            return
        sel = [
            r
            for r in recs
            if r["reducer"] in reducers
            and r["batch"] == batch
            and r["stage"] == stage
            and list(r.get("layers") or []) == layers
            and _label(r) == target
            and (against == "eager" or path_of(r) == against)
        ]
        vs = "stock eager" if against == "eager" else "the fast path without reduction"
        gpu = doc["meta"].get("gpu") or doc["meta"]["device"]
        for r in sorted(sel, key=lambda r: (r["reducer"], path_of(r))):
            s = speedup_vs_stock(r, base)
            out.append(
                {
                    "target": f"{name}: `{r['setting']}` ({path_of(r)}) on {key}, batch {batch}, vs {vs}",
                    "value": s["median"],
                    "goal": f"≥ {goal:.1f}x",
                    "met": s["median"] >= goal,
                    "detail": f"TTFT {r['ttft_ms']:.1f} ms vs {base['ttft_ms']:.1f} ms; {_x(s)}; {gpu}" + _cross(r, base),
                    "fmt": "x",
                }
            )

    proj = ("apet-llava", "visionzip", "random")
    add("Batch-1 TTFT", TARGET19_B1, "llava-1.5-7b", proj, 1, "projector", [], 64)
    add("Batch-1 TTFT", TARGET19_VS_FAST, "llava-1.5-7b", proj, 1, "projector", [], 64, against="fast")
    add("LLM-layer method at batch 1", TARGET19_B1_LLM, "llava-1.5-7b", ("fastv", "dart"), 1, "llm_layer", [2], 64)
    add("Batch 8", TARGET19_B8, "llava-1.5-7b", proj, 8, "projector", [], 64)
    add("Qwen2.5-VL-7B at 1344², batch 1", TARGET19_QWEN, "qwen2.5-vl-7b", ("apet-qwen",), 1, "projector", [], 256)
    ov = [r for r in _ok((data["overhead"] or {}).get("results", [])) if r["device"] == "cuda" and r["D"] == 4096]
    if ov:
        home = _home_stages()
        for b, goal in TARGET19_REDUCER_MS.items():
            sel = [r for r in ov if r["N"] == 576 and r["B"] == b and home.get(r["reducer"], r["stage"]) == r["stage"]]
            if sel:
                worst = max(sel, key=lambda r: r["median_ms"])
                out.append(
                    {
                        "target": f"Reducer cost, slowest built-in reducer at its published stage, N=576, D=4096, B={b}",
                        "value": worst["median_ms"],
                        "goal": f"≤ {goal:.0f} ms",
                        "met": worst["median_ms"] <= goal,
                        "detail": f"{worst['reducer']}@{worst['stage']} {worst['dtype']}: {worst['median_ms']:.2f} ms "
                        f"(p10–p90 {worst['p10_ms']:.2f}–{worst['p90_ms']:.2f}); the call alone, the GPU idle "
                        "when it starts (its host time adds to its GPU time)",
                        "fmt": "ms",
                    }
                )
                queued = [r for r in sel if r.get("after_work")]
                if queued:
                    worst = max(queued, key=lambda r: r["after_work"]["median_ms"])
                    q = worst["after_work"]
                    out.append(
                        {
                            "target": f"Reducer cost as a model pays it (after {worst['after_work_lead_ms']:.0f} ms of "
                            f"other GPU work), slowest built-in reducer, N=576, D=4096, B={b}",
                            "value": q["median_ms"],
                            "goal": f"≤ {goal:.0f} ms",
                            "met": q["median_ms"] <= goal,
                            "detail": f"{worst['reducer']}@{worst['stage']} {worst['dtype']}: {q['median_ms']:.2f} ms "
                            f"(p10–p90 {q['p10_ms']:.2f}–{q['p90_ms']:.2f}); its host time overlaps the work before it",
                            "fmt": "ms",
                        }
                    )
        apet = [r for r in ov if r["reducer"] == "apet" and r["N"] == 2880 and r["B"] == 8 and r["stage"] == "projector"]
        if apet:
            worst = max(apet, key=lambda r: r["median_ms"])
            out.append(
                {
                    "target": "Reducer cost, ApET at N=2880, D=4096, B=8",
                    "value": worst["median_ms"],
                    "goal": f"≤ {TARGET19_APET_2880_MS:.0f} ms",
                    "met": worst["median_ms"] <= TARGET19_APET_2880_MS,
                    "detail": f"{worst['dtype']}: {worst['median_ms']:.2f} ms",
                    "fmt": "ms",
                }
            )
    return out


def format_value(t: dict[str, Any]) -> str:
    if t["fmt"] == "pct":
        return _pct(t["value"])
    if t["fmt"] == "ms":
        return f"{t['value']:.2f} ms"
    return f"{t['value']:.2f}x"


def _targets19(data: dict[str, Any]) -> list[str]:
    tg = targets19(data)
    rows = [[t["target"], format_value(t), t["goal"], "met" if t["met"] else "**missed**", t["detail"]] for t in tg]
    lines = ["## Targets (issue 19)", ""]
    if rows:
        lines += _table(["target", "value", "goal", "status", "detail"], rows)
    else:
        lines += ["No results for these targets yet."]
    if not any(p != "eager" for doc in data["e2e"].values() if doc for p in paths(doc)):
        lines += [
            "",
            "Only the eager path is measured so far; the targets against the fast path without reduction "
            "need records with another `path`.",
        ]
    return lines + [""]


# -- markdown ------------------------------------------------------------------------------


def markdown(data: dict[str, Any], out: Path, plots: list[str]) -> str:
    ov = overhead_rows(data)
    lines = ["# Benchmark results", ""]
    lines += [
        "Generated by `python -m benchmarks.report` from the JSON files in this folder; "
        "the docstrings of `benchmarks/*.py` say how each number is measured.",
        "",
    ]
    videos = data.get("video", {})
    if any(
        doc and doc["meta"].get("quick")
        for doc in [data["roofline"], data["overhead"], *data["e2e"].values(), *videos.values()]
    ):
        lines += [
            "**Quick mode**: tiny CPU configurations that test the benchmark code; the numbers are not benchmark figures.",
            "",
        ]
    lines += _environment(data)
    lines += _buys_sections(data)
    video, _ = video_docs(data, plots=plots)
    if video:
        lines += [video]
    lines += _targets19(data)
    lines += _targets(data, ov)
    for key, doc in [*data["e2e"].items(), *videos.items()]:
        if doc is not None:
            lines += _e2e(key, doc)
    lines += _attention(data)
    lines += _overhead(ov, data)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines) + "\n"


def video_docs(data: dict[str, Any], plot_prefix: str = "", plots: list[str] | None = None) -> tuple[str, list[str]]:
    """The "Video" section (chart, plain words, a table per batch) of the video rows in ``data``
    and the plot files it shows; ``("", [])`` when there are none. The Benchmarks page of the
    docs and ``README.md`` both use it (``plots``: the plot files present, None = assume drawn)."""
    return video_report.docs_section(data, plot_prefix, plots)


def _buys_sections(data: dict[str, Any]) -> list[str]:
    """What each reducer buys, per model: a sentence per batch and the speed-up table."""
    lines = []
    for key, doc in data["e2e"].items():
        if doc is None or not timed(doc["results"]):
            continue
        got = buys(doc)
        lines += [f"## What each reducer buys: {key}, {got['target']} image tokens kept", ""]
        lines += [buys_summary(doc), "", spread_note(doc), ""]
        lines += buys_table(doc) + [""]
    return lines


def _environment(data: dict[str, Any]) -> list[str]:
    lines = ["## Environment", ""]
    roof = data["roofline"]
    docs = [("roofline", roof)] + [("overhead", data["overhead"])]
    docs += [(f"e2e {k}", v) for k, v in [*data["e2e"].items(), *data.get("video", {}).items()]] + [
        (f"attention {k}", v) for k, v in data["attention"].items()
    ]
    rows = []
    for name, doc in docs:
        if doc is None:
            continue
        m = doc["meta"]
        rows.append([name, m.get("gpu") or m["device"], m["torch"], m["transformers"], m["date"], f"`{m['command']}`"])
    lines += _table(["results", "device", "torch", "transformers", "date (UTC)", "command"], rows) + [""]
    if roof is not None:
        p = roof["peaks"]
        lines += [
            f"Measured peaks ({p['device']}): {p['matmul_tflops']:.3g} TFLOP/s ({p['dtype']} GEMM {p['matmul_n']}³, best run), "
            f"{p['bandwidth_gbs']:.0f} GB/s (copy of {p['copy_mib']:.0f} MiB, read + write).",
            "",
        ]
    return lines


def _apet_in_model_targets(doc: dict[str, Any] | None) -> list[dict[str, Any]]:
    """ApET's share of the reduced prefill from ``benchmarks/apet_in_model.py`` (smallest budget).

    That script times ApET against ``random`` at the same budget (same tokens downstream) in
    rotation over many reps, so ``ApET - random`` is ApET's own cost in the model.
    """
    if not doc or not doc.get("results"):
        return []
    small = min(r["budget"] for r in doc["results"])
    out = []
    for r in sorted((r for r in doc["results"] if r["budget"] == small), key=lambda r: -r["batch"]):
        cost = max(r["apet_minus_random_ms"], 0.0)
        noise = "ApET timed faster than random, so the difference is run-to-run noise; " if r["apet_minus_random_ms"] < 0 else ""
        out.append(
            {
                "target": f"ApET's own time / reduced prefill, ApET - random at the same budget "
                f"(apet_in_model, {r['image_tokens']}→{small}, batch {r['batch']})",
                "value": cost / r["ttft_apet_ms"],
                "goal": f"< {TARGET_APET_SHARE:.0%}",
                "met": cost / r["ttft_apet_ms"] < TARGET_APET_SHARE,
                "detail": f"{noise}TTFT ApET {r['ttft_apet_ms']:.1f} ms vs random {r['ttft_random_ms']:.1f} ms vs none "
                f"{r['ttft_none_ms']:.1f} ms (median of {r['reps']}); ApET alone on the same tokens "
                f"{r['apet_alone_ms']:.2f} ms",
                "fmt": "pct",
            }
        )
    return out


def _targets(data: dict[str, Any], ov: list[dict[str, Any]]) -> list[str]:
    rows = []
    tg = targets(data, ov)
    for t in tg:
        value = format_value(t)
        rows.append([t["target"], value, t["goal"], "met" if t["met"] else "**missed**", t["detail"]])
    lines = (
        ["## Targets (issue 8)", ""]
        + (
            _table(["target", "value", "goal", "status", "detail"], rows)
            if rows
            else ["No results for the targets yet."]
        )
        + [""]
    )
    missed = [t for t in tg if not t["met"]]
    if missed:
        lines += _where_time_goes(data)
    return lines


def _where_time_goes(data: dict[str, Any]) -> list[str]:
    """Profiler summaries and the per-component roofline of the profiled runs."""
    lines = []
    for key, doc in data["e2e"].items():
        for r in doc["results"] if doc else []:
            prof = r.get("profile")
            if not prof:
                continue
            lines += [f"### Where the time goes: {r['setting']}, {key}, batch {r['batch']}", ""]
            comps = r["roofline"]["components"]
            lines += [
                f"TTFT {r['ttft_ms']:.1f} ms; roofline ideal {r['ideal_ms']:.2f} ms = "
                + ", ".join(f"{k} {v['ideal_ms']:.2f} ms" for k, v in comps.items())
                + f"; profiled device time {prof['total_device_ms']:.1f} ms, host time {prof['total_cpu_ms']:.1f} ms.",
                "",
            ]
            rows = [
                [f"`{t['op'][:60]}`", str(t["calls"]), _fmt(t["self_device_ms"], ".2f"), _fmt(t["self_cpu_ms"], ".2f")]
                for t in prof["top"]
            ]
            lines += _table(["operator", "calls", "self device ms", "self host ms"], rows) + [""]
    return lines


def _e2e(key: str, doc: dict[str, Any]) -> list[str]:
    m = doc["model"]
    lines = [
        f"## End to end: {key}",
        "",
        f"{m['title']}: `{m['class']}`, {m['parameters'] / 1e9:.2f} B parameters "
        f"({m['weights_gib']:.1f} GiB {m['dtype']}), {m['image_tokens']} image tokens, prompt {m['prompt_len']} tokens, "
        f"`{m['attn_implementation']}` attention, built in {m['build_s']:.1f} s. Decode over "
        f"{doc['config']['new_tokens']} new tokens.",
        "",
    ]
    multi = len(paths(doc)) > 1
    rows, problems = [], []
    for r in doc["results"]:
        if r["status"] != "ok" or r.get("ttft_ms") is None:
            problems.append(f"- B={r['batch']} `{r['setting']}`: {r['status']}: {r.get('error', 'rounds not run')}")
            continue
        ttft, dec = r.get("ttft") or {}, r.get("decode") or {}
        rows.append(
            [f"`{r['setting']}`"]
            + ([path_of(r)] if multi else [])
            + [
                str(r["batch"]),
                _fmt(r["ttft_ms"]),
                _spread(ttft.get("p10_ms"), ttft.get("p90_ms"), ".1f"),
                str(ttft.get("reps", "–")),
                _fmt(r.get("speedup"), ".2f"),
                _fmt(r.get("ideal_speedup"), ".2f"),
                _pct(r.get("ratio")),
                _fmt(r["ideal_ms"], ".1f"),
                _fmt(r["decode_tok_s"], ".0f"),
                _spread(dec.get("p10_tok_s"), dec.get("p90_tok_s"), ".0f"),
                _fmt(r["peak_gib"], ".2f"),
                _fmt(r["kv_prefill_bytes"] / 2**20 if r["kv_prefill_bytes"] else None, ".1f"),
            ]
        )
    lines += _table(
        ["setting"]
        + (["path"] if multi else [])
        + [
            "B",
            "TTFT ms",
            "TTFT p10–p90",
            "rounds",
            "speed-up",
            "ideal speed-up",
            "achieved/ideal",
            "ideal ms",
            "decode tok/s",
            "decode p10–p90",
            "peak GiB",
            "KV MiB",
        ],
        rows,
    )
    lines += [""]
    skipped = sum(r["status"] == "skipped" for r in doc["results"])
    problems = [p for p in problems if ": skipped:" not in p]
    if problems:
        lines += ["Not measured:", ""] + problems + [""]
    if skipped:
        lines += [
            f"{skipped} runs skipped (time budget); measure them with "
            f"`python -m benchmarks.run --suite e2e --resume --models {key}`.",
            "",
        ]
    return lines


def _attention(data: dict[str, Any]) -> list[str]:
    if not data["attention"]:
        return []
    lines = ["## Attention cost: official code paths vs tokenreduce", ""]
    rows, problems = [], []
    for key, doc in data["attention"].items():
        for r in doc["results"] if doc else []:
            if r["path"] == "fp32-check":
                if r["status"] == "ok":
                    rows.append(
                        [
                            key,
                            str(r["image_tokens"]),
                            "1",
                            r["method"],
                            "fp32 index check",
                            "–",
                            "–",
                            str(r["identical"]),
                            _pct(r.get("overlap")),
                        ]
                    )
                continue
            if r["status"] != "ok":
                problems.append(
                    f"- {key} B={r['batch']} {r['method']} {r['path']}: {r['status']}: {r.get('error', '')}"
                )
                continue
            kept = r.get("kept_vs_tokenreduce") or {}
            rows.append(
                [
                    key,
                    str(r["image_tokens"]),
                    str(r["batch"]),
                    r["method"],
                    r["path"],
                    _fmt(r["ttft_ms"]),
                    _fmt(r["peak_gib"], ".2f"),
                    str(kept.get("identical", "–")),
                    _pct(kept.get("overlap")),
                ]
            )
    lines += _table(
        ["model", "N", "B", "method", "path", "TTFT ms", "peak GiB", "same kept as tokenreduce", "overlap"], rows
    ) + [""]
    if problems:
        lines += ["Not measured:", ""] + problems + [""]
    return lines


def _overhead(ov: list[dict[str, Any]], data: dict[str, Any]) -> list[str]:
    if not ov:
        return []
    doc = data["overhead"]
    budget = doc.get("time_budget_s")
    lines = [
        "## Reducer overhead",
        "",
        "Median ms per call (T = N/9) of every reducer at every stage it supports; in brackets, the share of "
        "the unreduced prefill of the matching model (nearest image-token count, same batch and device). "
        + (f"Time budget {budget:.0f} s." if budget else "No time budget."),
        "",
    ]
    ok = _ok(ov)
    for device, dtype, width in sorted({(r["device"], r["dtype"], r["D"]) for r in ok}):
        sel = [r for r in ok if r["device"] == device and r["dtype"] == dtype and r["D"] == width]
        cols = sorted({(r["B"], r["N"]) for r in sel})
        pairs = sorted({(r["reducer"], r["stage"]) for r in sel})
        idx = {(r["reducer"], r["stage"], r["B"], r["N"]): r for r in sel}
        rows = []
        for name, st in pairs:
            cells = []
            for c in cols:
                r = idx.get((name, st, *c))
                share = f" ({_pct(r['share'])})" if r is not None and r.get("share") is not None else ""
                cells.append("–" if r is None else _fmt(r["median_ms"], ".3f") + share)
            rows.append([f"`{name}@{st}`", *cells])
        lines += [f"### {device}, {dtype}, D={width}", ""]
        lines += _table(["reducer", *[f"B={b} N={n}" for b, n in cols]], rows) + [""]
    bad = [r for r in ov if r["status"] not in ("ok", "skipped")]
    skipped = sum(r["status"] == "skipped" for r in ov)
    if bad:
        lines += (
            ["Errors:", ""]
            + sorted(
                {f"- `{r['reducer']}@{r['stage']}` ({r['device']}): {r['status']}: {r.get('error', '')}" for r in bad}
            )
            + [""]
        )
    if skipped:
        lines += [f"{skipped} points skipped (time budget); rerun with a larger `--overhead-s`.", ""]
    return lines


# -- plots ---------------------------------------------------------------------------------


def plots(data: dict[str, Any], out: Path) -> list[str]:
    """Write the PNG plots; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    # Up to 12 methods on one axis: 10 colours x 4 markers never repeat a pair.
    style = cycler(marker=["o", "s", "^", "D"]) * cycler(color=plt.get_cmap("tab10").colors)
    plt.rcParams["axes.prop_cycle"] = cycler(color=[s["color"] for s in style], marker=[s["marker"] for s in style])

    names = []
    for key, doc in data.get("video", {}).items():
        name = video_report.plot(plt, key, doc, out) if doc and timed(doc["results"]) else None
        if name:
            names.append(name)
    for key, doc in data["e2e"].items():
        if doc is None:
            continue
        recs = _ok(doc["results"])
        if not recs:
            continue
        name = _speedup_plot(plt, key, doc, out)
        if name:
            names.append(name)
        for metric, label, fname in (
            ("ttft_ms", "time to first token (ms)", "latency"),
            ("peak_gib", "peak GPU memory (GiB)", "memory"),
        ):
            if all(r.get(metric) is None for r in recs):
                continue
            batches = sorted({r["batch"] for r in recs})
            fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
            for ax, b in zip(axes[0], batches):
                sel = [r for r in recs if r["batch"] == b]
                by = defaultdict(list)
                for r in sel:
                    if r["reducer"] is not None and r.get(metric) is not None:
                        by[f"{r['reducer']}@{_where(r)}"].append(r)
                for name, rs in sorted(by.items()):
                    rs.sort(key=_label)
                    ax.plot([_label(r) for r in rs], [r[metric] for r in rs], label=name)
                base = [r for r in sel if r["reducer"] is None and r.get(metric) is not None]
                if base:
                    ax.axhline(base[0][metric], color="black", linestyle="--", marker="", label="no reduction")
                if metric == "ttft_ms":
                    ideal = {
                        r["budget"]: r["ideal_ms"]
                        for r in sel
                        if r["reducer"] is not None and r["stage"] == "projector" and not r["layers"]
                    }
                    if ideal:
                        xs = sorted(ideal)
                        ax.plot(
                            xs,
                            [ideal[x] for x in xs],
                            color="gray",
                            linestyle=":",
                            marker="",
                            label="roofline ideal (projector)",
                        )
                ax.set_title(f"{key}, batch {b}")
                ax.set_xlabel("image tokens kept (multi-step methods: as their papers count them)")
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
            axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            fig.tight_layout()
            name = f"{fname}_vs_budget_{key}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            names.append(name)
    ov = _ok(overhead_rows(data))
    if ov:
        device = "cuda" if any(r["device"] == "cuda" for r in ov) else "cpu"
        sel = [r for r in ov if r["device"] == device]
        dtype = "bfloat16" if any(r["dtype"] == "bfloat16" for r in sel) else sel[0]["dtype"]
        width = max(r["D"] for r in sel)
        sel = [r for r in sel if r["dtype"] == dtype and r["D"] == width]
        batches = sorted({r["B"] for r in sel})
        fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
        home = _home_stages()
        for ax, b in zip(axes[0], batches):
            by = defaultdict(list)
            for r in sel:
                if r["B"] == b and home.get(r["reducer"], r["stage"]) == r["stage"]:
                    by[f"{r['reducer']}@{r['stage']}"].append(r)
            for name, rs in sorted(by.items()):
                rs.sort(key=lambda r: r["N"])
                ax.plot([r["N"] for r in rs], [r["median_ms"] for r in rs], label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"reducer time per call (published stage), {device} {dtype}, B={b}, D={width}", fontsize=9)
            ax.set_xlabel("tokens N (budget N/9)")
            ax.set_ylabel("ms (median)")
            ax.grid(alpha=0.3, which="both")
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(out / "overhead_vs_n.png", dpi=110)
        plt.close(fig)
        names.append("overhead_vs_n.png")
    return names


def _speedup_plot(plt: Any, key: str, doc: dict[str, Any], out: Path) -> str | None:
    """``speedup_<model>.png``: each reducer's TTFT speed-up over no reduction at its smallest
    token count, one panel per batch, bars per path, whiskers p10–p90 where recorded."""
    got = buys(doc)
    rows = [r for r in got["rows"] if any(c["speedup"] for c in r["cells"].values())]
    if not rows:
        return None
    batches, ps = got["batches"], got["paths"]
    height = 0.8 / len(ps)
    fig, axes = plt.subplots(
        1, len(batches), figsize=(5.2 * len(batches), 0.9 + 0.28 * len(rows) * len(ps)), squeeze=False, sharey=True
    )
    colors = plt.get_cmap("tab10").colors
    for ax, b in zip(axes[0], batches):
        for j, path in enumerate(ps):
            ys, xs, lo, hi = [], [], [], []
            for i, row in enumerate(rows):
                cell = row["cells"].get((path, b))
                if cell is None or cell["speedup"] is None:
                    continue
                sp = cell["speedup"]
                ys.append(i + (j - (len(ps) - 1) / 2) * height)
                xs.append(sp["median"])
                lo.append(sp["median"] - sp["p10"] if sp["p10"] is not None else 0.0)
                hi.append(sp["p90"] - sp["median"] if sp["p90"] is not None else 0.0)
            faster = [x >= 1.0 for x in xs]
            ax.barh(
                ys,
                xs,
                height=height * 0.9,
                xerr=[lo, hi] if any(lo) or any(hi) else None,
                color=[colors[2 * j] if f else colors[2 * j + 1] for f in faster],
                ecolor="black",
                capsize=2,
                label=path if len(ps) > 1 else None,
            )
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_title(f"batch {b}: no reduction = {_ms(got['base'].get(b))} ms", fontsize=10)
        ax.set_xlabel("time-to-first-token speed-up over no reduction (×)")
        ax.grid(axis="x", alpha=0.3)
        if len(ps) > 1:
            ax.legend(fontsize=8)
    axes[0][0].set_yticks(range(len(rows)))
    axes[0][0].set_yticklabels([r["setting"] for r in rows], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(
        f"{key}: what each reducer buys at {got['target']} image tokens (right of the line = faster)",
        fontsize=11,
    )
    fig.tight_layout()
    name = f"speedup_{key}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _where(r: dict[str, Any]) -> str:
    """Where a record's steps ran, as in its setting's name: ``projector``, ``L8/16/24``, ``projector+L16``."""
    if not r["layers"]:
        return r["stage"]
    return ("" if r["stage"] == "llm_layer" else f"{r['stage']}+") + "L" + "/".join(map(str, r["layers"]))


def _label(r: dict[str, Any]) -> int:
    """The token count a record's setting is labelled with (``target``; older files: the final ``budget``)."""
    return r.get("target") or r["budget"]


def _home_stages() -> dict[str, str]:
    """Each registered reducer's benchmark stage (its published one), for uncluttered plots."""
    import tokenreduce

    from .end_to_end import published_stage

    reg = tokenreduce.get_registry()
    return {name: published_stage(e.cls)[0] for name, e in reg.reducers.items()}


def write_report(out: Path) -> Path:
    """Regenerate ``README.md`` and the plots of a results folder (tables only when matplotlib is missing)."""
    data = load(out)
    try:
        names = plots(data, out)
    except ImportError as err:  # e.g. a bare GPU image: rerun `python -m benchmarks.report` where matplotlib is
        print(f"plots skipped: {err}")
        names = []
    path = out / "README.md"
    path.write_text(markdown(data, out, names))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description="Regenerate README.md and plots of a results folder."
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    print(write_report(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
