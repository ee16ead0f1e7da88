"""The ``tokenreduce`` command line: list, info, run, validate, schema."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import TokenReduceError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Pluggable visual-token reduction for VLMs.")
console = Console()
err_console = Console(stderr=True)


def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {err}", markup=True, highlight=False)
    raise typer.Exit(code=1)


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
    console.print(table)
    if reg.adapters:
        at = Table(title="Model adapters")
        for col in ("name", "version", "models", "source"):
            at.add_column(col)
        for name, entry in sorted(reg.adapters.items()):
            at.add_row(name, entry.version, ", ".join(entry.cls.model_classes), entry.source)
        console.print(at)
    if reg.broken:
        bt = Table(title="Broken plugins (not loaded)", style="red")
        for col in ("name", "source", "error"):
            bt.add_column(col)
        for b in reg.broken:
            bt.add_row(b.name, b.source, b.error)
        console.print(bt)


@app.command("info")
def info_cmd(name: str = typer.Argument(..., help="Reducer name.")) -> None:
    """A reducer's paper, stages, context needs and parameter table."""
    from .docgen import params_rows
    from .registry import get_registry

    try:
        cls = get_registry().reducer_class(name)
    except TokenReduceError as err:
        _fail(err)
    console.print(f"[bold]{name}[/]: {cls.summary()}")
    if cls.paper:
        console.print(f"paper: {cls.paper}")
    console.print(f"stages: {', '.join(sorted(s.value for s in cls.stages))}")
    if cls.required_context:
        console.print(f"needs context: {', '.join(sorted(cls.required_context))}")
    table = Table(title="Parameters")
    for col in ("name", "type", "default", "range", "description"):
        table.add_column(col)
    for row in params_rows(cls.Params):
        table.add_row(*row)
    console.print(table)


@app.command("run")
def run_cmd(
    config: str = typer.Argument(..., help="A YAML pipeline file, or a reducer name."),
    budget: Optional[float] = typer.Option(None, help="Budget when CONFIG is a reducer name (int, or ratio < 1)."),
    stage: Optional[str] = typer.Option(None, help="Stage when CONFIG is a reducer name."),
    layer: Optional[int] = typer.Option(None, help="Decoder layer for an llm_layer step."),
    seed: int = typer.Option(0, help="Seed of the embedded default model / workload."),
    synthetic: bool = typer.Option(False, help="Use the synthetic tensor workload instead of the tiny model."),
) -> None:
    """Run a pipeline on the embedded default (tiny seeded model, no download) and print per-stage figures."""
    from .runner import pipeline_from_arg, run_default

    b: int | float | None = None
    if budget is not None:
        b = int(budget) if budget >= 1 else budget
    try:
        pipeline = pipeline_from_arg(config, b, stage, layer)
        title, rows = run_default(pipeline, seed=seed, synthetic=synthetic)
    except TokenReduceError as err:
        _fail(err)
    table = Table(title=title)
    for col in ("stage", "reducer", "layer", "tokens before", "tokens after", "time (ms)", "recon. error"):
        table.add_column(col, justify="right" if col not in ("stage", "reducer") else "left")
    for r in rows:
        table.add_row(
            r.stage,
            r.reducer,
            "" if r.layer is None else str(r.layer),
            str(r.tokens_before),
            str(r.tokens_after),
            f"{r.milliseconds:.2f}",
            "" if r.error is None else f"{r.error:.4f}",
        )
    console.print(table)


@app.command("validate")
def validate_cmd(file: Path = typer.Argument(..., help="YAML pipeline file.")) -> None:
    """Check a YAML pipeline; errors point at the line and field."""
    from .config import load_config

    try:
        pipe = load_config(file)
    except TokenReduceError as err:
        _fail(err)
    steps = ", ".join(f"{s.reducer.name}@{s.stage.value}" + (f"[{s.layer}]" if s.layer is not None else "") for s in pipe)
    console.print(f"[green]ok[/]: {file} ({len(pipe)} step(s): {steps})", highlight=False)


@app.command("schema")
def schema_cmd(output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write to this file.")) -> None:
    """The JSON schema of the YAML pipeline format (for editors)."""
    from .config import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n")
        console.print(f"wrote {output}")
    else:
        sys.stdout.write(text + "\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
