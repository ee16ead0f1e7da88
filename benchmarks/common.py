"""Shared pieces of the benchmark suites: run metadata, timing, JSON output, deadlines, progress."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def run_meta(*, quick: bool, device: str, command: str | None = None) -> dict[str, Any]:
    """What a result depends on: hardware, library versions, date, the exact command."""
    import transformers

    import tokenreduce

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or command_line(),
        "device": device,
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenreduce": tokenreduce.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "quick": quick,
    }


def command_line(argv: list[str] | None = None, module: str = "benchmarks.run") -> str:
    """The command as typed (``python -m benchmarks.run ...``); ``argv`` = arguments of an in-process call."""
    if argv is not None:
        return " ".join(shlex.quote(a) for a in ["python", "-m", module, *argv])
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("benchmarks", "run.py")):
        argv = ["python", "-m", "benchmarks.run", *argv[1:]]
    elif argv and argv[0].endswith(".py"):
        argv = ["python", *argv]
    return " ".join(shlex.quote(a) for a in argv)


def write_json(path: Path, obj: Any) -> None:
    """Write atomically, so a run killed mid-write leaves the previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if hasattr(obj, "value"):  # enums such as Stage
        return obj.value
    return repr(obj)


class Deadline:
    """A wall-clock budget: work items check it before starting and are skipped once it has passed."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str, *, reps: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls after ``warmup`` untimed ones.

    On CUDA every call is bracketed by CUDA events (device time of the work the call
    queues, host overhead included when the queue runs dry); on CPU by ``perf_counter``.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    if str(device).startswith("cuda"):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def summarize(ms: list[float]) -> dict[str, float]:
    """Median and spread of timings in milliseconds."""
    qs = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) >= 2 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "p10_ms": qs[0], "p90_ms": qs[-1], "reps": len(ms)}


def free_device_memory(collect: bool = False) -> None:
    """Return cached GPU blocks to the driver; ``collect`` also runs the (slow, ~1 s) garbage collector."""
    if collect:
        import gc

        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float | None]]:
    """Yields a dict filled on exit with ``peak_gib`` (max allocated during the block; None on CPU)."""
    out: dict[str, float | None] = {"peak_gib": None}
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30


class Reporter:
    """Progress bars and log lines (rich when installed, plain prints otherwise)."""

    def __init__(self, *, quiet: bool = False):
        self.quiet = quiet
        self._progress = None
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[item]}"),
                disable=quiet,
            )
        except ImportError:  # pragma: no cover - rich is a dependency of the package
            pass

    def __enter__(self) -> Reporter:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def task(self, description: str, total: int) -> Any:
        if self._progress is not None:
            return self._progress.add_task(description, total=total, item="")
        return description

    def advance(self, task: Any, item: str = "", steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(task, advance=steps, item=item)

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)
