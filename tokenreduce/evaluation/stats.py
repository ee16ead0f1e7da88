"""Per-task time and visual-token figures of an evaluation run, and their merge across processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .vlm import TokenCount


@dataclass
class TaskStats:
    """Time and visual tokens of one task's requests on this process."""

    seconds: float = 0.0
    requests: int = 0
    docs: set = field(default_factory=set)
    rows: int = 0
    visual_in: float = 0.0
    llm_input: float = 0.0
    layer_mean: float = 0.0

    def add(self, count: TokenCount, seconds: float, doc_ids: list[Any]) -> None:
        self.seconds += seconds
        self.requests += len(doc_ids)
        self.docs.update(doc_ids)
        self.rows += count.rows
        self.visual_in += count.visual_in
        self.llm_input += count.llm_input
        self.layer_mean += count.layer_mean

    def as_dict(self) -> dict[str, float]:
        rows = max(1, self.rows)
        return {
            "seconds": self.seconds,
            "requests": self.requests,
            "docs": len(self.docs),
            "visual_in": self.visual_in / rows,
            "tokens": self.llm_input / rows,
            "layer_mean_tokens": self.layer_mean / rows,
        }


def merge_stats(parts: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per-task stats of several processes (data parallel) combined; per-sample means re-weighted."""
    out: dict[str, dict[str, float]] = {}
    for part in parts:
        for task, s in part.items():
            o = out.setdefault(
                task, {"seconds": 0.0, "requests": 0, "docs": 0, "visual_in": 0.0, "tokens": 0.0, "layer_mean_tokens": 0.0}
            )
            n_old, n_new = o["requests"], s["requests"]
            for key in ("visual_in", "tokens", "layer_mean_tokens"):
                o[key] = (o[key] * n_old + s[key] * n_new) / max(1, n_old + n_new)
            for key in ("seconds", "requests", "docs"):
                o[key] += s[key]
    for o in out.values():
        o["seconds_per_sample"] = o["seconds"] / max(1, o["docs"])
    return out


__all__ = ["TaskStats", "merge_stats"]
