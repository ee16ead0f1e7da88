"""The benchmark table: per-task score, % of the unreduced score, tokens kept, time per sample.

Written as Markdown, JSON and a plot (mean relative score against visual tokens kept).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BASELINE = "unreduced"


@dataclass
class PipelineRun:
    """One row: a pipeline (or the unreduced model) over the tasks.

    Attributes:
        name: row label (``unreduced`` for the baseline).
        description: the pipeline's steps, e.g. ``apet@projector:64``.
        scores: per task, the value of its primary metric.
        metrics: per task, the primary metric's name.
        stats: per task, ``tokens`` (visual tokens the decoder sees per sample),
            ``layer_mean_tokens``, ``visual_in``, ``seconds_per_sample``, ``docs``, ...
    """

    name: str
    description: str
    scores: dict[str, float]
    metrics: dict[str, str] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)

    def _mean_stat(self, key: str) -> float:
        vals = [s[key] for s in self.stats.values() if key in s]
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def tokens(self) -> float:
        return self._mean_stat("tokens")

    @property
    def layer_mean_tokens(self) -> float:
        return self._mean_stat("layer_mean_tokens")

    @property
    def ms_per_sample(self) -> float:
        return 1e3 * self._mean_stat("seconds_per_sample")


@dataclass
class EvalTable:
    """All rows; relative scores are taken against the row named :data:`BASELINE`."""

    model: str
    tasks: list[str]
    runs: list[PipelineRun]

    @property
    def baseline(self) -> PipelineRun | None:
        return next((r for r in self.runs if r.name == BASELINE), None)

    def relative(self, run: PipelineRun, task: str) -> float | None:
        """``100 * score / unreduced score``; None when the unreduced score is 0 or missing."""
        base = self.baseline
        if base is None or task not in base.scores or task not in run.scores:
            return None
        b = base.scores[task]
        return None if b == 0 or math.isnan(b) else 100.0 * run.scores[task] / b

    def mean_relative(self, run: PipelineRun) -> float | None:
        vals = [v for t in self.tasks if (v := self.relative(run, t)) is not None]
        return sum(vals) / len(vals) if vals else None

    # -- outputs ---------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        rows = []
        for run in self.runs:
            row = asdict(run)
            row["relative"] = {t: self.relative(run, t) for t in self.tasks}
            row["mean_relative"] = self.mean_relative(run)
            row["tokens"] = run.tokens
            row["layer_mean_tokens"] = run.layer_mean_tokens
            row["ms_per_sample"] = run.ms_per_sample
            rows.append(row)
        return {"model": self.model, "tasks": self.tasks, "baseline": BASELINE, "rows": rows}

    def to_markdown(self) -> str:
        metric_of = {t: next((r.metrics[t] for r in self.runs if t in r.metrics), "") for t in self.tasks}
        head = [
            "pipeline",
            *[f"{t} ({metric_of[t]})" if metric_of[t] else t for t in self.tasks],
            "mean rel. %",
            "tokens",
            "ms / sample",
        ]
        lines = [
            f"Model: `{self.model}`. Cells: score (% of unreduced). Tokens: visual tokens the decoder sees per sample.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        for run in self.runs:
            cells = [f"{run.name}"]
            for t in self.tasks:
                if t not in run.scores:
                    cells.append("-")
                    continue
                rel = self.relative(run, t)
                cells.append(f"{_fmt(run.scores[t])}" + ("" if rel is None else f" ({rel:.1f}%)"))
            mean = self.mean_relative(run)
            cells.append("-" if mean is None else f"{mean:.1f}")
            tokens = _fmt(run.tokens, 1)
            if not math.isnan(run.layer_mean_tokens) and abs(run.layer_mean_tokens - run.tokens) > 1e-6:
                tokens += f" (layer mean {_fmt(run.layer_mean_tokens, 1)})"
            cells.append(tokens)
            cells.append(_fmt(run.ms_per_sample, 1))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Mean relative score against tokens kept: one line per method (rows ``method-budget``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
        # One line per method across budgets: rows named "method-budget" share a family.
        families: dict[str, list[tuple[float, float]]] = {}
        for run in self.runs:
            mean = self.mean_relative(run)
            if mean is None or math.isnan(run.tokens):
                continue
            if run.name == BASELINE:
                ax.scatter([run.tokens], [mean], marker="*", s=120, color="black", zorder=4, label=BASELINE)
                continue
            families.setdefault(run.name.rsplit("-", 1)[0], []).append((run.tokens, mean))
        for family, points in families.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=4, label=family)
        ax.axhline(100.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("visual tokens per sample (decoder input)")
        ax.set_ylabel("mean score, % of unreduced")
        ax.set_title(f"{self.model}: {', '.join(self.tasks)}", fontsize=9)
        ax.grid(alpha=0.3)
        if families or self.baseline is not None:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path

    def write(self, folder: str | Path, stem: str = "results") -> dict[str, Path]:
        """Write ``stem.md``, ``stem.json`` and ``stem.png`` into ``folder``; returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": folder / f"{stem}.md", "json": folder / f"{stem}.json", "plot": folder / f"{stem}.png"}
        paths["markdown"].write_text(self.to_markdown())
        paths["json"].write_text(json.dumps(self.as_dict(), indent=2, default=_json_default) + "\n")
        self.plot(paths["plot"])
        return paths


def _fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if digits < 4 else f"{value:.4g}"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, set):
        return sorted(obj)
    return str(obj)


__all__ = ["BASELINE", "EvalTable", "PipelineRun"]
