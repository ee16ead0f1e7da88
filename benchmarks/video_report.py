"""The video row in the report: a chart, plain words and a table (used by :mod:`benchmarks.report`).

A video results file is an ``e2e_<key>.json`` whose model has ``frames``
(:mod:`benchmarks.video`); :func:`benchmarks.report.load` keeps those apart (``data["video"]``)
so that the image rows' tables, targets and joins never mix them in.

For each batch, every setting's TTFT (and its speed-up over no reduction: per-round ratios,
p10-p90), peak memory and decode rate, against the unreduced model on the eager path. A
record's ``path`` says how the model ran; a path the file has no records of shows as "not
available" (only ``eager`` exists so far; a fast path will sit beside it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Execution paths the table always accounts for: measured ones get columns, others say so.
PATHS = ("eager", "fast")
NOT_AVAILABLE = "not available"


def _timed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok" and r.get("ttft_ms") is not None]


def path_of(r: dict[str, Any]) -> str:
    return r.get("path") or "eager"


def is_video(doc: dict[str, Any] | None) -> bool:
    """Whether an e2e file is a video row (its model has frames)."""
    return bool(doc and (doc.get("model") or {}).get("frames"))


def measured_paths(doc: dict[str, Any]) -> list[str]:
    found = {path_of(r) for r in _timed(doc["results"])}
    return sorted(found, key=lambda p: (p != "eager", p))


def kept_words(r: dict[str, Any]) -> str:
    """The video tokens a setting keeps, step by step: ``627``, ``627, then 125 from layer 3``."""
    budgets, layers = list(r.get("step_budgets") or []), list(r.get("layers") or [])
    if not budgets:
        return "all"
    plan = r.get("plan") or []
    decode = [p.get("acts_at") == "decode" for p in plan] if len(plan) == len(budgets) else [False] * len(budgets)
    first = [] if r.get("stage") == "llm_layer" else [str(budgets[0])]
    later = zip(budgets[len(first) :], layers, decode[len(first) :])
    words = [f"{b} {'per decoded token ' if d else ''}from layer {k}" for b, k, d in later]
    return ", then ".join(first + words)


def rows(doc: dict[str, Any]) -> dict[str, Any]:
    """``{"batches", "paths", "base": {batch: record}, "rows": [...]}`` of one video file.

    Each row: ``setting``, ``reducer``, ``where``, ``kept`` and ``cells[(path, batch)] =
    {"record", "speedup", "decode_speedup"}``, speed-ups against stock eager without
    reduction at the same batch; the reference comes first, then by TTFT speed-up at the
    smallest batch, best first.
    """
    from .report import speedup_vs_stock, where_words

    recs = _timed(doc["results"])
    base = {r["batch"]: r for r in recs if r["reducer"] is None and path_of(r) == "eager"}
    out: dict[str, dict[str, Any]] = {}
    for r in recs:
        name = r.get("requested", r["setting"])
        row = out.setdefault(
            name,
            {
                "setting": name,
                "reducer": r["reducer"] or "none",
                "where": where_words(r) if r["reducer"] else "–",
                "kept": kept_words(r) if r["reducer"] else f"all {r.get('video_tokens', '?')}",
                "cells": {},
            },
        )
        ref = base.get(r["batch"])
        dec = None
        if ref is not None and r.get("decode_tok_s") and ref.get("decode_tok_s"):
            dec = r["decode_tok_s"] / ref["decode_tok_s"]
        row["cells"][(path_of(r), r["batch"])] = {
            "record": r,
            "speedup": speedup_vs_stock(r, ref) if ref is not None else None,
            "decode_speedup": dec,
        }
    batches = sorted({r["batch"] for r in recs})

    def order(row: dict[str, Any]) -> tuple[int, float]:
        if row["reducer"] == "none":
            return (0, 0.0)
        cell = row["cells"].get(("eager", batches[0])) if batches else None
        return (1, -((cell or {}).get("speedup") or {"median": 0.0})["median"])

    return {"batches": batches, "paths": measured_paths(doc), "base": base, "rows": sorted(out.values(), key=order)}


def _x(s: dict[str, Any] | None) -> str:
    from .report import _x as fmt

    return fmt(s)


def _n(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _decode(r: dict[str, Any]) -> str:
    d = r.get("decode") or {}
    if r.get("decode_tok_s") is None:
        return "–"
    out = f"{r['decode_tok_s']:.1f}"
    if d.get("p10_tok_s") is not None and d.get("reps", 0) > 1:
        out += f" ({d['p10_tok_s']:.1f}–{d['p90_tok_s']:.1f})"
    return out


def table(doc: dict[str, Any], batch: int) -> list[str]:
    """One batch: TTFT (speed-up), peak memory and decode rate per setting and measured path;
    a "Fast path" column says "not available" while no record has that path."""
    from .report import _table

    got = rows(doc)
    ps = got["paths"] or ["eager"]
    multi = len(ps) > 1
    head = ["Setting", "Where it runs", "Video tokens kept"]
    for p in ps:
        tag = f", {p}" if multi else ""
        head += [f"TTFT ms{tag}", f"TTFT speed-up{tag}", f"Peak GiB{tag}", f"Decode tokens/s{tag}", f"Decode speed-up{tag}"]
    missing = [p for p in PATHS if p not in ps]
    head += [f"{p.capitalize()} path" for p in missing]
    body = []
    for row in got["rows"]:
        name = "no reduction (reference)" if row["reducer"] == "none" else f"`{row['setting']}`"
        cells = [name, row["where"], row["kept"]]
        for p in ps:
            cell = row["cells"].get((p, batch))
            if cell is None:
                cells += ["–"] * 5
                continue
            r = cell["record"]
            cells += [
                f"{r['ttft_ms']:.1f}",
                _x(cell["speedup"]),
                _n(r.get("peak_gib"), ".2f"),
                _decode(r),
                _n(cell["decode_speedup"], ".2f") + ("×" if cell["decode_speedup"] is not None else ""),
            ]
        cells += [NOT_AVAILABLE] * len(missing)
        body.append(cells)
    return _table(head, body)


def summary(doc: dict[str, Any]) -> str:
    """Plain sentences per batch: the unreduced video's cost, how many settings beat it, the best, the baselines."""
    got = rows(doc)
    m = doc.get("model") or {}
    ratio = next((r["video_ratio"] for r in doc["results"] if r.get("video_ratio")), None)
    share = f"{ratio:.0%} of the video's tokens" if ratio else "the video budget"
    out = []
    for b in got["batches"]:
        base = got["base"].get(b)
        cells = [(row, row["cells"][("eager", b)]) for row in got["rows"] if row["reducer"] != "none" and ("eager", b) in row["cells"]]
        cells = [(row, c) for row, c in cells if c["speedup"]]
        if base is None or not cells:
            continue
        best_row, best = max(cells, key=lambda c: c[1]["speedup"]["median"])
        faster = sum(c["speedup"]["median"] > 1.0 for _, c in cells)
        mem = f", peaks at {base['peak_gib']:.1f} GiB" if base.get("peak_gib") is not None else ""
        dec = f" and decodes {base['decode_tok_s']:.0f} tokens/s" if base.get("decode_tok_s") else ""
        text = (
            f"At batch {b}, the model without reduction takes {base['ttft_ms']:.1f} ms to the first token of a "
            f"{m.get('frames', '?')}-frame video ({m.get('video_tokens', '?')} video tokens){mem}{dec}. "
            f"Keeping {share}, {faster} of {len(cells)} settings answer sooner; the fastest is "
            f"`{best_row['setting']}` at {best['record']['ttft_ms']:.1f} ms ({_x(best['speedup'])})."
        )
        base_rows = [(row, c) for row, c in cells if row["reducer"] in ("random", "pool")]
        if base_rows:
            text += " Baselines that use no time: " + ", ".join(
                f"`{row['setting']}` {_x(c['speedup'])}" for row, c in base_rows
            ) + "."
        out.append(text)
    return " ".join(out)


def paths_note(doc: dict[str, Any]) -> str:
    ps = measured_paths(doc)
    missing = [p for p in PATHS if p not in ps]
    if not missing:
        return ""
    return (
        f"Measured path{'s' if len(ps) > 1 else ''}: {', '.join(ps) or '–'} (stock transformers with the pipeline "
        f"patched in); the {', '.join(missing)} path{'s are' if len(missing) > 1 else ' is'} not available yet, "
        "so its columns say so."
    )


def plot_name(key: str) -> str:
    return f"video_{key}.png"


def plot(plt: Any, key: str, doc: dict[str, Any], out: Path) -> str | None:
    """``video_<key>.png``: per batch, three panels: TTFT speed-up (whiskers p10-p90), peak
    memory and decode tokens/s of every setting, the unreduced model as the reference line."""
    got = rows(doc)
    rs = got["rows"]
    if not rs or not got["batches"]:
        return None
    batches = got["batches"]
    fig, axes = plt.subplots(
        len(batches), 3, figsize=(15, 0.9 + 0.32 * len(rs) * len(batches) + 0.6 * (len(batches) - 1)), squeeze=False
    )
    colors = plt.get_cmap("tab10").colors
    labels = ["no reduction" if r["reducer"] == "none" else r["setting"] for r in rs]
    for row_axes, b in zip(axes, batches):
        base = got["base"].get(b)
        cells = [r["cells"].get(("eager", b)) for r in rs]

        def bars(ax, values, lo=None, hi=None, ref=None, xlabel="", _cells=cells):
            ys = [i for i, v in enumerate(values) if v is not None]
            xs = [values[i] for i in ys]
            colour = [colors[7] if rs[i]["reducer"] in ("none", "random", "pool") else colors[0] for i in ys]
            err = None
            if lo is not None and any(lo[i] is not None for i in ys):
                err = [[max(0.0, xs[j] - (lo[i] if lo[i] is not None else xs[j])) for j, i in enumerate(ys)],
                       [max(0.0, (hi[i] if hi[i] is not None else xs[j]) - xs[j]) for j, i in enumerate(ys)]]
            ax.barh(ys, xs, color=colour, xerr=err, ecolor="black", capsize=2, height=0.7)
            if ref is not None:
                ax.axvline(ref, color="black", linewidth=1, linestyle="--")
            if not ys:  # e.g. peak memory on CPU
                ax.text(0.5, 0.5, "not measured here", transform=ax.transAxes, ha="center", va="center", color="0.4")
                ax.set_xticks([])
            ax.set_yticks(range(len(rs)))
            ax.set_yticklabels(labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(xlabel)
            ax.grid(axis="x", alpha=0.3)

        sp = [c["speedup"] if c else None for c in cells]
        bars(
            row_axes[0],
            [s["median"] if s else None for s in sp],
            [s["p10"] if s else None for s in sp],
            [s["p90"] if s else None for s in sp],
            1.0,
            "time-to-first-token speed-up over no reduction (×)",
        )
        row_axes[0].set_title(f"batch {b}: TTFT without reduction {base['ttft_ms']:.0f} ms" if base else f"batch {b}", fontsize=10)

        recs = [c["record"] if c else None for c in cells]
        bars(
            row_axes[1],
            [r.get("peak_gib") if r else None for r in recs],
            ref=base.get("peak_gib") if base else None,
            xlabel="peak GPU memory during generate() (GiB)",
        )
        row_axes[1].set_title("peak memory (dashed: no reduction)", fontsize=10)
        dec = [(r or {}).get("decode") or {} for r in recs]
        bars(
            row_axes[2],
            [r.get("decode_tok_s") if r else None for r in recs],
            [d.get("p10_tok_s") for d in dec],
            [d.get("p90_tok_s") for d in dec],
            ref=base.get("decode_tok_s") if base else None,
            xlabel="decode tokens/s (whole batch)",
        )
        row_axes[2].set_title("decode rate (dashed: no reduction)", fontsize=10)
        for ax in row_axes[1:]:
            ax.set_yticklabels([])
    m = doc.get("model") or {}
    ratio = next((r["video_ratio"] for r in doc["results"] if r.get("video_ratio")), None)
    note = "; fast path: not available" if "fast" not in got["paths"] else ""
    fig.suptitle(
        f"{key}: {m.get('frames', '?')} frames, {m.get('video_tokens', '?')} video tokens, every setting keeps "
        f"{ratio:.0%} per video (eager path{note})" if ratio else key,
        fontsize=11,
        x=0.01,
        ha="left",
    )
    from matplotlib.patches import Patch

    fig.tight_layout(rect=(0, 0, 1, 0.97 if len(batches) > 1 else 0.93))
    fig.legend(
        handles=[Patch(color=colors[0], label="video method"), Patch(color=colors[7], label="reference / baseline")],
        fontsize=8,
        loc="upper right",
        ncol=2,
        frameon=False,
    )
    name = plot_name(key)
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def section(key: str, doc: dict[str, Any], *, plot_prefix: str = "", plots: list[str] | None = None, level: int = 3) -> list[str]:
    """The video row of one file: its chart (if drawn), what was run, the sentences and one table per batch."""
    from .report import spread_note

    m = doc.get("model") or {}
    meta = doc.get("meta") or {}
    where = meta.get("gpu") or meta.get("device", "?")
    ratio = next((r["video_ratio"] for r in doc["results"] if r.get("video_ratio")), None)
    h = "#" * level
    lines = [f"{h} {m.get('title', key)}", ""]
    name = plot_name(key)
    if plots is None or name in plots:
        lines += [f"![{Path(name).stem}]({plot_prefix}{name})", ""]
    lines += [
        f"{where}, torch {meta.get('torch')}, transformers {meta.get('transformers')}, {str(meta.get('date', ''))[:10]}. "
        f"One synthetic {m.get('frames', '?')}-frame video per prompt ({m.get('frame_tokens', '?')} tokens per frame, "
        f"{m.get('video_tokens', '?')} video tokens and the video's newline); every setting keeps "
        f"{f'{ratio:.0%}' if ratio else 'its share'} of them per video (`video_budget: per_video`), a method with a "
        "decoder part as its YAML example runs it. Speed-ups are against the same model without reduction at "
        f"the same batch size; decode over {(doc.get('config') or {}).get('new_tokens', '?')} new tokens.",
        "",
        summary(doc),
        "",
        spread_note(doc),
        "",
    ]
    note = paths_note(doc)
    if note:
        lines += [note, ""]
    got = rows(doc)
    for b in got["batches"]:
        if len(got["batches"]) > 1:
            lines += [f"**Batch {b}**", ""]
        lines += table(doc, b) + [""]
    problems = [
        f"- B={r['batch']} `{r['setting']}`: {r['status']}: {r.get('error', 'rounds not run')}"
        for r in doc["results"]
        if r.get("status") != "ok" or r.get("ttft_ms") is None
    ]
    if problems:
        lines += ["Not measured:", ""] + problems + [""]
    return lines


def docs_section(data: dict[str, Any], plot_prefix: str = "", plots: list[str] | None = None) -> tuple[str, list[str]]:
    """The Benchmarks page's "Video" section and the plot files it shows (``("", [])`` without video results)."""
    docs = {k: d for k, d in (data.get("video") or {}).items() if d and _timed(d.get("results", []))}
    if not docs:
        return "", []
    lines = [
        "## Video",
        "",
        "The video methods on a LLaVA-OneVision-7B-shaped model: time to the first token, peak memory and decode "
        "rate, each against the same model without reduction.",
        "",
    ]
    shown = []
    for key, doc in docs.items():
        lines += section(key, doc, plot_prefix=plot_prefix, plots=plots)
        if plots is None or plot_name(key) in plots:
            shown.append(plot_name(key))
    return "\n".join(lines) + "\n", shown
