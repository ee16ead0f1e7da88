"""The ``tokenreduce`` command line: list, info, run, validate, schema."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import ConfigError, TokenReduceError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Pluggable visual-token reduction for VLMs.")


def _width(stream: object) -> int | None:
    """Piped output (CI logs, files) would wrap tables at 80 columns; COLUMNS still wins."""
    if os.environ.get("COLUMNS") or getattr(stream, "isatty", lambda: False)():
        return None
    return 120


def _console(stderr: bool = False) -> Console:
    # Built per use: the width depends on the environment at call time (COLUMNS, a tty).
    return Console(stderr=stderr, width=_width(sys.stderr if stderr else sys.stdout))


def _fail(err: Exception) -> None:
    # Escaped: messages hold brackets ("tokenreduce[eval]", "[CLS]") that rich would read as markup.
    _console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", markup=True, highlight=False)
    raise typer.Exit(code=1)


def _budget(text: str | None, option: str = "--budget") -> int | float | None:
    """A budget option as typed: "64" is 64 tokens, "0.25" a ratio; "64.5" or "0" fail (never truncated)."""
    from .budget import parse_budget

    return None if text is None else parse_budget(text, option)


def _is_config_file(arg: str) -> bool:
    """Whether ``run``'s CONFIG is a pipeline file (as :func:`~tokenreduce.runner.pipeline_from_arg` decides)."""
    return Path(arg).suffix in {".yaml", ".yml", ".json"} or Path(arg).is_file()


@app.command("list")
def list_cmd() -> None:
    """Every installed reducer (version, stages, summary), adapters, and broken plugins."""
    from .registry import get_registry

    reg = get_registry()
    table = Table(title="Reducers", show_lines=False)
    for col in ("name", "version", "stages", "source", "summary"):
        table.add_column(col)
    for name, entry in sorted(reg.reducers.items()):
        stages = ", ".join(sorted(s.value for s in entry.cls.stages))
        table.add_row(name, entry.version, stages, entry.source, entry.cls.summary())
    _console().print(table)
    if reg.adapters:
        at = Table(title="Model adapters")
        for col in ("name", "version", "models", "source"):
            at.add_column(col)
        for name, entry in sorted(reg.adapters.items()):
            at.add_row(name, entry.version, ", ".join(entry.cls.model_classes), entry.source)
        _console().print(at)
    if reg.broken:
        bt = Table(title="Broken plugins (not loaded)", style="red")
        for col in ("name", "source", "error"):
            bt.add_column(col)
        for b in reg.broken:
            bt.add_row(b.name, b.source, b.error)
        _console().print(bt)


@app.command("info")
def info_cmd(name: str = typer.Argument(..., help="Reducer name.")) -> None:
    """A reducer's paper, stages, context needs and parameter table."""
    from .docgen import params_rows
    from .registry import get_registry
    from .requirements import describe_requires

    try:
        cls = get_registry().reducer_class(name)
    except TokenReduceError as err:
        _fail(err)
    _console().print(f"[bold]{name}[/]: {cls.summary()}")
    if cls.paper:
        _console().print(f"paper: {cls.paper}")
    _console().print(f"stages: {', '.join(sorted(s.value for s in cls.stages))}")
    needs = describe_requires(cls)
    if needs:
        _console().print("needs context:", highlight=False)
        for line in needs:
            _console().print(f"  {line}", highlight=False, markup=False)
    table = Table(title="Parameters")
    for col in ("name", "type", "default", "range", "description"):
        table.add_column(col)
    for row in params_rows(cls.Params):
        table.add_row(*row)
    _console().print(table)


@app.command("run")
def run_cmd(
    config: str = typer.Argument(..., help="A YAML pipeline file, or a reducer name."),
    budget: Optional[str] = typer.Option(
        None, help="Budget when CONFIG is a reducer name: tokens (an int >= 1) or a ratio in (0, 1]."
    ),
    stage: Optional[str] = typer.Option(None, help="Stage when CONFIG is a reducer name."),
    layer: Optional[int] = typer.Option(None, help="Decoder layer when CONFIG is a reducer name (llm_layer)."),
    seed: int = typer.Option(0, help="Seed of the embedded default model / workload."),
    synthetic: bool = typer.Option(False, help="Use the synthetic tensor workload instead of the tiny model."),
    repeats: int = typer.Option(10, min=1, help="Timed runs after a warm-up; times are their median (p10–p90)."),
) -> None:
    """Run a pipeline on the embedded default (tiny seeded model, no download) and print per-stage figures."""
    from .runner import pipeline_from_arg, run_default

    try:
        b = _budget(budget)
        if _is_config_file(config):
            given = [f"--{n}" for n, v in (("budget", budget), ("stage", stage), ("layer", layer)) if v is not None]
            if given:  # the file's own values win; ignoring the options silently would mislead
                raise ConfigError(
                    f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} when CONFIG is a reducer "
                    f"name; {config} is a pipeline file: "
                    "set the budget, stage and layer in the file"
                )
        pipeline = pipeline_from_arg(config, b, stage, layer)
        title, rows = run_default(pipeline, seed=seed, synthetic=synthetic, repeats=repeats)
    except TokenReduceError as err:
        _fail(err)
    table = Table(title=title)
    for col in ("stage", "reducer", "layer", "tokens before", "tokens after", "time (ms)", "recon. error"):
        table.add_column(col, justify="right" if col not in ("stage", "reducer") else "left", no_wrap=True)
    for r in rows:
        table.add_row(
            r.stage,
            r.reducer,
            "" if r.layer is None else str(r.layer),
            str(r.tokens_before),
            str(r.tokens_after),
            r.time_text,
            "" if r.error is None else f"{r.error:.4f}",
        )
    _console().print(table)


@app.command("validate")
def validate_cmd(file: Path = typer.Argument(..., help="YAML pipeline file.")) -> None:
    """Check a YAML pipeline as `run` would, without a model; errors point at the line and field.

    Each step also runs once on the synthetic tokens of `run --synthetic`, so a reducer's
    own rules on its budget and parameters are checked; what needs the model (its layer
    count) is checked by `run`.
    """
    from .config import validate_config

    try:
        pipe = validate_config(file)
    except TokenReduceError as err:
        _fail(err)
    steps = ", ".join(f"{s.reducer.name}@{s.stage.value}" + (f"[{s.layer}]" if s.layer is not None else "") for s in pipe)
    _console().print(f"[green]ok[/]: {file} ({len(pipe)} step(s): {steps})", highlight=False)


@app.command("schema")
def schema_cmd(output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write to this file.")) -> None:
    """The JSON schema of the YAML pipeline format (for editors)."""
    from .config import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n")
        _console().print(f"wrote {output}")
    else:
        sys.stdout.write(text + "\n")


@app.command("show")
def show_cmd(
    image: Path = typer.Argument(..., help="Image file (PNG, JPEG, ...)."),
    pipeline: list[Path] = typer.Option([], "--pipeline", "-p", help="YAML pipeline, or NAME=FILE to name its row; repeat for several rows."),
    reducers: Optional[str] = typer.Option(None, help="Comma-separated reducer names, one column each (e.g. apet,tome,pool)."),
    budget: str = typer.Option("64", help="Budget of each --reducers column: tokens (an int >= 1) or a ratio in (0, 1]."),
    stage: Optional[str] = typer.Option(None, help="Stage of the --reducers columns (default: each reducer's first)."),
    model: Optional[str] = typer.Option(
        None, help="Checkpoint (hub id or path) whose vision tower makes the tokens; default: the offline stand-in."
    ),
    output: Path = typer.Option(Path("show.png"), "-o", "--output", help="PNG to write."),
    seed: int = typer.Option(0, help="Seed of the stand-in tokens' random projection."),
) -> None:
    """Picture what pipelines keep of IMAGE: kept patches, merge groups, ApET's error map."""
    from .pipeline import Pipeline
    from .runner import pipeline_from_arg
    from .visualize import show

    try:
        b = _budget(budget)
        columns = [(path.stem, Pipeline.coerce(path)) for path in pipeline]
        for name in (reducers or "").split(","):
            if name.strip():
                columns.append(("", pipeline_from_arg(name.strip(), b, stage, None)))
        written = show(image, columns, output, model=model, seed=seed)
    except TokenReduceError as err:
        _fail(err)
    _console().print(f"wrote {written} ({len(columns)} column(s))", highlight=False)


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., help="Checkpoint (hub id or folder), or 'tiny' for the embedded tiny model and tasks."),
    tasks: str = typer.Option(..., help="Comma-separated lmms-eval tasks, e.g. gqa,pope,mme."),
    pipeline: list[Path] = typer.Option([], "--pipeline", "-p", help="YAML pipeline, or NAME=FILE to name its row; repeat for several rows."),
    reducers: Optional[str] = typer.Option(None, help="Comma-separated reducers (name, name@stage or name@llm_layer:K), one row per reducer x budget."),
    budgets: Optional[str] = typer.Option(None, help="Comma-separated budgets for --reducers, e.g. 64,128,192."),
    stage: Optional[str] = typer.Option(None, help="Stage of the --reducers rows (default: each reducer's first)."),
    layer: Optional[int] = typer.Option(None, help="Decoder layer of llm_layer --reducers rows."),
    output_dir: Path = typer.Option(Path("eval_results"), "-o", "--output-dir", help="Where results.md/json/png go."),
    limit: Optional[float] = typer.Option(None, help="Documents per task (int) or fraction; quick checks only."),
    batch_size: int = typer.Option(1, help="Requests per model call."),
    include_path: list[str] = typer.Option([], help="Extra lmms-eval task folder; repeatable."),
    default_tasks: bool = typer.Option(True, help="Index lmms-eval's own tasks (off: only --include-path's)."),
    model_arg: list[str] = typer.Option([], help="More model args key=value (dtype, device, prompt_format, ...)."),
    metric: list[str] = typer.Option([], help="task=metric to report instead of the task's first metric."),
    log_samples: bool = typer.Option(False, help="Keep per-sample outputs in raw/*.json."),
) -> None:
    """Benchmark the unreduced model and each pipeline with lmms-eval: one table (Markdown, JSON, plot).

    Needs the \\[eval] extra: pip install "tokenreduce\\[eval]". Data parallel: `accelerate launch -m tokenreduce.cli eval ...`.
    """
    try:
        from .evaluation.commands import eval_command

        table = eval_command(
            model=model,
            pipeline_files=pipeline,
            reducers=reducers,
            budgets=budgets,
            stage=stage,
            layer=layer,
            tasks=tasks,
            output_dir=output_dir,
            include_path=include_path,
            default_tasks=default_tasks,
            limit=limit,
            batch_size=batch_size,
            model_args=model_arg,
            metrics=metric,
            log_samples=log_samples,
        )
    except ImportError as err:
        _fail(ImportError(f'{err}; `tokenreduce eval` needs lmms-eval: pip install "tokenreduce[eval]"'))
    except TokenReduceError as err:
        _fail(err)
    if table is not None:  # rank 0
        sys.stdout.write(table.to_markdown())
        _console().print(f"wrote {output_dir}/results.md, results.json, results.png", highlight=False)


@app.command("fidelity")
def fidelity_cmd(
    pipeline: list[Path] = typer.Argument(None, help="YAML pipeline file(s)."),
    reducers: Optional[str] = typer.Option(None, help="Comma-separated reducers, one pipeline per reducer x budget."),
    budgets: Optional[str] = typer.Option(None, help="Comma-separated budgets for --reducers."),
    stage: Optional[str] = typer.Option(None, help="Stage of the --reducers pipelines."),
    layer: Optional[int] = typer.Option(None, help="Decoder layer of llm_layer --reducers pipelines."),
    model: str = typer.Option("tiny", help="Checkpoint (hub id or folder); default: the embedded tiny model."),
    inputs: Optional[Path] = typer.Option(None, help="Folder of images (+ prompts.jsonl); default: embedded images."),
    prompt: Optional[str] = typer.Option(None, help="Prompt for images without one in prompts.jsonl."),
    samples: Optional[int] = typer.Option(None, help="Use at most this many inputs."),
    max_new_tokens: int = typer.Option(16, help="Length of the unreduced greedy answer compared."),
    batch_size: int = typer.Option(4, help="Inputs per model call."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, ... (default: cuda if available)."),
    dtype: str = typer.Option("auto", help="auto, float16, bfloat16 or float32."),
    prompt_format: str = typer.Option("auto", help="auto, llava_hf or processor (see docs/evaluation.md)."),
    cache_dir: Path = typer.Option(Path.home() / ".cache" / "tokenreduce", help="Where the embedded tiny model is written."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """Label-free check of pipelines against the unreduced model: KL, top-1 agreement, reconstruction."""
    try:
        from .evaluation.commands import fidelity_command

        results = fidelity_command(
            model=model,
            pipeline_files=pipeline or [],
            reducers=reducers,
            budgets=budgets,
            stage=stage,
            layer=layer,
            inputs=inputs,
            prompt=prompt,
            samples=samples,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            prompt_format=prompt_format,
            cache_dir=cache_dir,
        )
    except TokenReduceError as err:
        _fail(err)
    table = Table(title=f"Fidelity to the unreduced model ({results[0].samples} inputs)")
    for col in ("pipeline", "KL (nats/token)", "KL first token", "top-1 agree", "exact decode", "steps: tokens, recon. error"):
        table.add_column(col, justify="left" if col in ("pipeline", "steps: tokens, recon. error") else "right")
    for r in results:
        steps = "; ".join(
            f"{s.reducer}@{s.stage}{'' if s.layer is None else f'[{s.layer}]'} {s.tokens_before:.0f}->{s.tokens_after:.0f}, "
            f"{s.reconstruction_error:.4f}"
            for s in r.steps
        )
        table.add_row(r.name, f"{r.kl:.4g}", f"{r.kl_first:.4g}", f"{r.top1:.3f}", f"{r.exact:.3f}", steps)
    _console().print(table)
    if json_out:
        json_out.write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
        _console().print(f"wrote {json_out}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
