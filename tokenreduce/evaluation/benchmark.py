"""``tokenreduce eval``: the unreduced model and each pipeline over lmms-eval tasks, one table.

The checkpoint is loaded once; each pipeline patches it in turn (the model is restored
after every request batch), and lmms-eval's ``simple_evaluate`` runs the tasks for each.
Under ``accelerate launch`` every process evaluates its share of the documents (lmms-eval's
data parallelism); per-process time and token figures are gathered, and rank 0 writes the
table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..pipeline import Pipeline
from .report import BASELINE, EvalTable, PipelineRun


def describe(pipeline: Pipeline | None) -> str:
    """``reducer@stage[layer]:budget`` per step, ``+``-joined (``none`` for no pipeline)."""
    if pipeline is None or not len(pipeline):
        return "none"
    parts = []
    for s in pipeline:
        where = s.stage.value + (f"[{s.layer}]" if s.layer is not None else "")
        parts.append(f"{s.reducer.name}@{where}:{s.reducer.budget}")
    return " + ".join(parts)


def primary_metric(
    task: str, result: dict[str, Any], config: dict[str, Any] | None, override: str | None = None
) -> tuple[str, float]:
    """The metric a task is reported by: ``override``, else the first of its ``metric_list``
    present in the results, else the first numeric non-stderr entry."""
    values = {}
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in key:
            values[key.split(",")[0]] = float(value)
    if override:
        if override not in values:
            raise KeyError(f"task {task!r} has no metric {override!r}; it reports: {', '.join(values) or '(none)'}")
        return override, values[override]
    order = [m.get("metric") for m in (config or {}).get("metric_list", []) if isinstance(m, dict)]
    for name in order + list(values):
        if name in values:
            return name, values[name]
    raise KeyError(f"task {task!r} reported no numeric metric")


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every process (data parallel), or ``[obj]`` in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _task_stats(task: str, stats: dict[str, dict[str, float]], group_subtasks: dict[str, list[str]]) -> dict[str, float]:
    """A task's time/token figures; a group's are its subtasks' combined."""
    from .stats import merge_stats

    if task in stats:
        return stats[task]
    leaves = [t for t in group_subtasks.get(task, []) if t in stats]
    return merge_stats([{"group": stats[t]} for t in leaves]).get("group", {})


def run_benchmark(
    model: str,
    pipelines: Sequence[tuple[str, Pipeline]],
    tasks: Sequence[str],
    *,
    output_dir: str | Path,
    include_path: str | Sequence[str] | None = None,
    include_defaults: bool = True,
    limit: int | float | None = None,
    batch_size: int = 1,
    model_args: dict[str, Any] | None = None,
    metrics: dict[str, str] | None = None,
    log_samples: bool = False,
    skip_unreduced: bool = False,
) -> tuple[EvalTable | None, dict[str, Any]]:
    """Evaluate the unreduced model and each ``(name, pipeline)``; rank 0 writes the table.

    Args:
        model: checkpoint (hub id or local folder).
        pipelines: named pipelines to compare with the unreduced model.
        tasks: lmms-eval task (or group) names.
        output_dir: where ``results.md/json/png`` and the raw lmms-eval results go.
        include_path: extra lmms-eval task folders.
        include_defaults: index lmms-eval's own tasks too (off: only ``include_path``'s, faster).
        limit: documents per task (lmms-eval's ``--limit``; for quick checks only).
        batch_size: requests per model call.
        model_args: more ``TokenReduceLMM`` arguments (dtype, device, prompt_format, ...).
        metrics: per task, the metric to report instead of its first one.
        log_samples: keep per-sample outputs in the raw results.
        skip_unreduced: leave out the unreduced run (relative scores are then empty).

    Returns:
        The table (None on ranks other than 0) and the raw lmms-eval results per row.
    """
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from .lmms import TokenReduceLMM
    from .stats import merge_stats

    output_dir = Path(output_dir)
    lm = TokenReduceLMM(pretrained=model, batch_size=batch_size, **(model_args or {}))
    paths = list(include_path) if isinstance(include_path, (list, tuple)) else include_path
    manager = TaskManager(include_path=paths, include_defaults=include_defaults)
    rows: list[tuple[str, Pipeline | None]] = [] if skip_unreduced else [(BASELINE, None)]
    rows += list(pipelines)
    runs, raw = [], {}
    for name, pipeline in rows:
        lm.set_pipeline(pipeline)
        results = evaluator.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            batch_size=batch_size,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            bootstrap_iters=0,
        )
        stats = merge_stats(_gather(lm.stats_dict()))
        if lm.rank != 0 or results is None:
            continue
        raw[name] = results
        groups = results.get("group_subtasks", {})
        scores, metric_names, task_stats = {}, {}, {}
        for task in tasks:
            res = results.get("groups", {}).get(task) or results["results"].get(task)
            if res is None:
                continue
            metric, value = primary_metric(task, res, results.get("configs", {}).get(task), (metrics or {}).get(task))
            scores[task], metric_names[task] = value, metric
            task_stats[task] = _task_stats(task, stats, groups)
        runs.append(PipelineRun(name, describe(pipeline), scores, metric_names, task_stats))
    if lm.rank != 0:
        return None, raw
    table = EvalTable(model, list(tasks), runs)
    table.write(output_dir)
    raw_dir = output_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, results in raw.items():
        safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)
        (raw_dir / f"{safe}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return table, raw


__all__ = ["describe", "primary_metric", "run_benchmark"]
