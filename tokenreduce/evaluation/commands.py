"""What ``tokenreduce eval`` and ``tokenreduce fidelity`` do, apart from printing.

``--model tiny`` is the embedded default: a tiny random checkpoint (and, for ``eval``, two
tiny lmms-eval tasks ``tiny_pope`` / ``tiny_mc``) written on first use by the plugin that
implements the ``tokenreduce_default_eval`` hook (the built-in one: a LLaVA-1.5-layout
model); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..hookspecs import DefaultEval
from ..pipeline import Pipeline
from ..registry import get_registry

TINY = "tiny"


def parse_budget(text: str) -> int | float:
    """``"64"`` -> 64 tokens, ``"0.25"`` / ``"1.0"`` -> a ratio (as in YAML); a clear error otherwise.

    The same reading as ``run --budget`` (``"64.5"`` and ``"0"`` are refused, never truncated).
    """
    from ..budget import parse_budget as parse

    return parse(text, "--budgets")


def check_limit(limit: float | None) -> int | float | None:
    """``--limit``: a whole number of samples per task (>= 1), or a fraction of each task in (0, 1)."""
    if limit is None:
        return None
    if limit >= 1:
        if limit != int(limit):
            raise ConfigError(f"--limit={limit} must be a whole number of samples (>= 1) or a fraction in (0, 1)")
        return int(limit)
    if limit <= 0:
        raise ConfigError(f"--limit={limit} must be a whole number of samples (>= 1) or a fraction in (0, 1)")
    return limit


def split_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def named_file(spec: str | Path) -> tuple[str, Pipeline]:
    """A YAML pipeline file, named by its stem, or ``NAME=FILE`` to name its row.

    Naming rows ``method-budget`` (``vscan-64=docs/examples/reducers/vscan.yaml``) puts a
    multi-step method's files on one line of the plot, like the ``--reducers`` rows.
    """
    text = str(spec)
    name, sep, path = text.partition("=")
    if sep and not Path(text).is_file():
        if not name.strip() or not path.strip():
            raise ConfigError(f"pipeline {text!r}: write NAME=FILE (e.g. vscan-64=vscan.yaml) or just FILE")
        return name.strip(), Pipeline.coerce(path.strip())
    return Path(text).stem, Pipeline.coerce(text)


def named_pipelines(
    files: Sequence[str | Path], reducers: str | None, budgets: str | None, stage: str | None, layer: int | None
) -> list[tuple[str, Pipeline]]:
    """YAML files (named by their stem, or ``NAME=FILE``) plus one pipeline per reducer x budget (``name-budget``).

    A reducer may carry its own stage and layer, ``name@stage`` or ``name@llm_layer:K``,
    overriding ``stage`` / ``layer`` for its rows (so one command can mix encoder-side and
    decoder-layer methods). A ``--reducers`` row is one step: methods published as several
    steps (PyramidDrop, SparseVLM, VScan, MustDrop) come as YAML pipelines.
    """
    from ..runner import pipeline_from_arg

    out = [named_file(f) for f in files]
    names, sizes = split_list(reducers), [parse_budget(b) for b in split_list(budgets)]
    if names and not sizes:
        raise ConfigError("--reducers needs --budgets (e.g. --budgets 64,128,192)")
    for spec in names:
        name, _, where = spec.partition("@")
        st, _, lay = where.partition(":")
        try:
            own_layer = int(lay) if lay else layer
        except ValueError:
            raise ConfigError(f"reducer spec {spec!r}: the layer after ':' must be an int, got {lay!r}") from None
        for b in sizes:
            out.append((f"{name}-{b}", pipeline_from_arg(name, b, st or stage, own_layer)))
    seen: set[str] = set()
    for name, _ in out:
        if name in seen:
            raise ConfigError(f"two pipelines are named {name!r}; rename a YAML file or list a reducer once")
        seen.add(name)
    return out


def parse_pairs(items: Sequence[str], what: str) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict (values: int / float / bool / str)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {item!r} must look like key=value")
        out[key.strip()] = _scalar(value.strip())
    return out


def _scalar(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def default_eval() -> DefaultEval:
    """The embedded evaluation default, from the plugin implementing ``tokenreduce_default_eval``."""
    found = get_registry().pm.hook.tokenreduce_default_eval()
    if found is None:
        raise ConfigError(
            f"--model {TINY} needs a plugin implementing the tokenreduce_default_eval hook (the built-in "
            "tokenreduce_plugins do); none is installed: give a checkpoint with --model instead"
        )
    return found


def tiny_assets(folder: Path, tasks: bool = False) -> tuple[str, Path | None]:
    """Write (once) the embedded tiny checkpoint, and the tiny tasks if asked; returns (path, tasks folder)."""
    default = default_eval()
    ckpt = default.write_checkpoint(folder / "checkpoint")
    task_dir = None
    if tasks:
        task_dir = folder / "tasks"
        if not (task_dir / "tiny_pope.yaml").is_file():
            default.write_tasks(task_dir)
    return str(ckpt), task_dir


def eval_command(
    *,
    model: str,
    pipeline_files: Sequence[str | Path],
    reducers: str | None,
    budgets: str | None,
    stage: str | None,
    layer: int | None,
    tasks: str,
    output_dir: Path,
    include_path: Sequence[str] = (),
    default_tasks: bool = True,
    limit: float | None = None,
    batch_size: int = 1,
    model_args: Sequence[str] = (),
    metrics: Sequence[str] = (),
    log_samples: bool = False,
) -> Any:
    """Run the benchmark; returns the table (None on data-parallel ranks other than 0)."""
    from .benchmark import run_benchmark

    task_list = split_list(tasks)
    if not task_list:
        raise ConfigError("--tasks needs at least one lmms-eval task, e.g. --tasks gqa,pope")
    pipes = named_pipelines(pipeline_files, reducers, budgets, stage, layer)
    paths = list(include_path)
    with _process_group_closed():
        if model == TINY:
            from accelerate import Accelerator

            # Under accelerate launch, one process writes the files while the others wait. (An
            # Accelerator, not a bare PartialState: the first one made fixes the shared state,
            # and only Accelerator reads ACCELERATE_USE_CPU.)
            with Accelerator().main_process_first():
                model, task_dir = tiny_assets(Path(output_dir) / "_tiny", tasks=True)
            paths.append(str(task_dir))
        lim = check_limit(limit)
        table, _ = run_benchmark(
            model,
            pipes,
            task_list,
            output_dir=output_dir,
            include_path=paths or None,
            include_defaults=default_tasks,
            limit=lim,
            batch_size=batch_size,
            model_args=parse_pairs(model_args, "--model-arg"),
            metrics=parse_pairs(metrics, "--metric"),
            log_samples=log_samples,
        )
    return table


@contextmanager
def _process_group_closed() -> Iterator[None]:
    """Destroy the data-parallel process group that the block started (accelerate's, under
    ``torchrun``/``accelerate launch``) when it ends: a process that exits with its gloo group
    still alive sometimes aborts at exit ("terminate called without an active exception",
    SIGABRT), failing a run whose results were all written. A group that was already there
    belongs to the caller and is left alone."""
    import torch.distributed as dist

    had = dist.is_available() and dist.is_initialized()
    ok = False
    try:
        yield
        ok = True
    finally:
        if not had and dist.is_available() and dist.is_initialized():
            if ok:  # every rank got here: wait for the others' last collective before leaving
                dist.barrier()
            dist.destroy_process_group()


def fidelity_command(
    *,
    model: str,
    pipeline_files: Sequence[str | Path],
    reducers: str | None,
    budgets: str | None,
    stage: str | None,
    layer: int | None,
    inputs: Path | None,
    prompt: str | None,
    samples: int | None,
    max_new_tokens: int,
    batch_size: int,
    device: str | None,
    dtype: str,
    prompt_format: str,
    cache_dir: Path,
) -> list[Any]:
    """Measure fidelity of each pipeline on the inputs; returns :class:`FidelityResult` s."""
    from .fidelity import measure_fidelity
    from .inputs import DEFAULT_PROMPT, load_folder
    from .vlm import VLM

    pipes = named_pipelines(pipeline_files, reducers, budgets, stage, layer)
    if not pipes:
        raise ConfigError("give at least one pipeline: a YAML file, or --reducers NAME --budgets N")
    if model == TINY:
        model, _ = tiny_assets(cache_dir)
    vlm = VLM.load(model, device=device, dtype=dtype, prompt_format=prompt_format)
    if inputs is not None:
        items = load_folder(inputs, prompt or DEFAULT_PROMPT, samples)
    else:
        items = default_eval().samples(samples or 4)
        if prompt:
            for s in items:
                s.context = prompt
    return measure_fidelity(vlm, items, pipes, max_new_tokens=max_new_tokens, batch_size=batch_size)


__all__ = [
    "TINY",
    "eval_command",
    "fidelity_command",
    "named_file",
    "named_pipelines",
    "parse_budget",
    "parse_pairs",
    "split_list",
]
