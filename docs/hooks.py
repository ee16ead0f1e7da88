"""mkdocs hooks: the pages and tables that must stay true are generated from the code at build time.

* One page per built-in reducer (``reducers/<name>.md``), from the registry: summary,
  paper, stages, context, the class docstring, the parameter table (from the pydantic
  model, via :func:`tokenreduce.docgen.params_rows`) and a YAML example. A hand-written
  page ``docs/reducers/<name>.md`` (ApET's) is kept as written; its
  ``<!-- tokenreduce:... -->`` markers are filled in, and the generated sections it
  lacks are appended.
* Markers in any page: ``<!-- tokenreduce:params NAME -->``, ``<!-- tokenreduce:facts NAME -->``,
  ``<!-- tokenreduce:example NAME -->``, ``<!-- tokenreduce:reducers -->`` (the table of
  all reducers), ``<!-- tokenreduce:config-fields -->`` (the YAML format's fields),
  ``<!-- tokenreduce:all-params -->`` (every reducer's table), ``<!-- tokenreduce:adapters -->``
  (the registered model adapters), ``<!-- tokenreduce:families -->`` (their data rows), ``<!-- tokenreduce:benchmarks -->``.
* ``tokenreduce.schema.json`` (the JSON schema of the YAML format) is written into the site.
* The benchmark tables are read from ``benchmarks/results/*.json`` (plots ``*.png``/``*.svg``
  beside them are copied); without results the page says how to make them.

The text builders here import no mkdocs, so tests call them directly.
"""

from __future__ import annotations

import inspect
import json
import posixpath
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples" / "reducers"
RESULTS = ROOT / "benchmarks" / "results"
BUILTIN = "tokenreduce"
# A marker stands alone on its line (so one quoted inside a sentence or code span is left as is).
MARKER = re.compile(r"^[ \t]*<!--\s*tokenreduce:([a-z-]+)\s*([\w\-]*)\s*-->[ \t]*$", re.MULTILINE)
STAGE_ORDER = ("vision_encoder", "projector", "llm_layer")


# -- reducers --------------------------------------------------------------------------------------


def builtin_reducers() -> dict[str, type]:
    """Registered reducers that ship with tokenreduce, by name."""
    from tokenreduce import get_registry

    return {name: e.cls for name, e in sorted(get_registry().reducers.items()) if e.source == BUILTIN}


def reducer_class(name: str) -> type:
    from tokenreduce import get_registry

    return get_registry().reducer_class(name)


def _stages(cls: type) -> list[str]:
    return [s for s in STAGE_ORDER if s in {st.value for st in cls.stages}]


def _cell(text: str) -> str:
    """A code-styled table cell (a pipe inside a code span does not end the cell)."""
    if text == "(required)":
        return "*required*"
    return f"`{text}`" if text else ""


def _text(text: str) -> str:
    """A plain-text table cell: pipes escaped, one line."""
    return text.replace("|", "\\|").replace("\n", " ")


def fields_table(model: Any, first: str = "Field") -> str:
    """The table of a pydantic model's fields, from :func:`tokenreduce.docgen.params_rows`."""
    from tokenreduce.docgen import params_rows

    rows = params_rows(model)
    if not rows:
        return "No parameters.\n"
    out = [f"| {first} | Type | Default | Range | Description |", "| --- | --- | --- | --- | --- |"]
    for fname, typ, default, rng, desc in rows:
        out.append(f"| `{fname}` | {_cell(typ)} | {_cell(default)} | {_cell(rng)} | {_text(desc)} |")
    return "\n".join(out) + "\n"


def params_table(name: str) -> str:
    """The parameter table of a reducer, from its pydantic model (never hand-copied)."""
    return fields_table(reducer_class(name).Params, "Parameter")


def _default_example(name: str, cls: type) -> str:
    stage = _stages(cls)[0]  # encoder-side stages come first in STAGE_ORDER
    layer = ", layer: 2" if stage == "llm_layer" else ""
    return f"# {name}: {cls.summary()}\npipeline:\n  - {{stage: {stage}{layer}, reducer: {name}, budget: 64}}\n"


def example_yaml(name: str) -> tuple[str, str]:
    """``(yaml text, where it comes from)``: ``docs/examples/reducers/<name>.yaml`` if present,
    else a generated one-step pipeline at the reducer's first stage with default parameters."""
    path = EXAMPLES / f"{name}.yaml"
    if path.is_file():
        return path.read_text(), f"docs/examples/reducers/{name}.yaml"
    return _default_example(name, reducer_class(name)), ""


def example_block(name: str) -> str:
    text, source = example_yaml(name)
    title = f' title="{source}"' if source else ""
    video = "frames" in reducer_class(name).required_context  # the embedded default model takes images only
    how = (
        f"Check it with `tokenreduce validate {source}` and apply it to a video model "
        "(see the Video page: the embedded default model takes images only)."
        if source and video
        else f"Check it with `tokenreduce validate {source}`, run it on the embedded default with "
        f"`tokenreduce run {source}`, or picture it with `tokenreduce show IMAGE --pipeline {source}`."
        if source
        else "Save it as `pipeline.yaml` and check it with `tokenreduce validate pipeline.yaml`."
    )
    return f"```yaml{title}\n{text.rstrip()}\n```\n\n{how}\n"


# Docstrings may use Sphinx roles (:class:`~a.B`); the site shows them as code: ``B``
# for ``~a.B`` (Sphinx's short form), ``a.B`` otherwise.
ROLE_MD = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([\w.]+)`")
ROLE_HTML = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):<code>(~?)([\w.]+)</code>")


def _role_name(m: re.Match[str]) -> str:
    return m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)


def _rest_to_markdown(text: str) -> str:
    return ROLE_MD.sub(lambda m: f"`{_role_name(m)}`", text)


def facts(name: str) -> str:
    """Summary, paper, stages, needed context, class and usage of a reducer, one bold-labelled line each."""
    cls = reducer_class(name)
    stages = ", ".join(f"`{s}`" for s in _stages(cls))
    lines = [f"*{cls.summary()}*", ""]
    rows = [("Paper", cls.paper or "(none given)"), ("Stages", stages)]
    from tokenreduce.requirements import describe_requires

    needs = describe_requires(cls)
    if needs:
        rows.append(("Needs context", "; ".join(needs)))
    rows.append(("Class", f"`{cls.__module__}.{cls.__qualname__}`"))
    rows.append(("Use", f'`tokenreduce.create("{name}", budget=64)` or `reducer: {name}` in YAML'))
    lines += [f"**{k}:** {v}  " for k, v in rows]
    return "\n".join(lines) + "\n"


def reducer_page(name: str) -> str:
    """The generated page of a built-in reducer without a hand-written one."""
    cls = reducer_class(name)
    doc = inspect.getdoc(cls) or ""
    body = "\n".join(doc.splitlines()[1:]).strip()
    parts = [f"# {name}\n", facts(name)]
    if body:
        parts += ["## How it works\n", _rest_to_markdown(body) + "\n"]
    parts += missing_sections("")
    return "\n".join(parts)


def missing_sections(markdown: str) -> list[str]:
    """The generated sections a reducer page lacks (markers count as present)."""
    used = {m.group(1) for m in MARKER.finditer(markdown)}
    parts = []
    if "params" not in used:
        parts += ["## Parameters\n", "<!-- tokenreduce:params -->\n"]
    if "example" not in used:
        parts += ["## YAML example\n", "<!-- tokenreduce:example -->\n"]
    return parts


def reducers_table(link_prefix: str = "") -> str:
    """All built-in reducers: link, stages, summary."""
    out = ["| Reducer | Stages | Needs context | What it does |", "| --- | --- | --- | --- |"]
    for name, cls in builtin_reducers().items():
        stages = ", ".join(_stages(cls))
        ctx = ", ".join(sorted(cls.required_context)) or "-"
        out.append(f"| [`{name}`]({link_prefix}{name}.md) | {stages} | {ctx} | {cls.summary()} |")
    return "\n".join(out) + "\n"


def adapters_table() -> str:
    """Every registered model adapter (built-in or not): models, default positions, source."""
    from tokenreduce import get_registry

    entries = sorted(get_registry().adapters.items())
    if not entries:
        return "No model adapter is registered in this build.\n"
    out = ["| Adapter | Model classes | Default positions | Class | Source |", "| --- | --- | --- | --- | --- |"]
    for name, e in entries:
        models = ", ".join(f"`{m}`" for m in e.cls.model_classes)
        out.append(
            f"| `{name}` | {models} | `{e.cls.default_positions}` | `{e.cls.__module__}.{e.cls.__qualname__}` | {e.source} {e.version} |"
        )
    return "\n".join(out) + "\n"


def families_table() -> str:
    """The data row (``family``) of every registered adapter that has one: a family as data."""
    from dataclasses import fields

    from tokenreduce import get_registry

    rows = [(name, e.cls.family) for name, e in sorted(get_registry().adapters.items()) if hasattr(e.cls, "family")]
    if not rows:
        return "No registered adapter describes its family as a data row in this build.\n"
    names = [f.name for f in fields(rows[0][1]) if f.name not in ("name", "model_classes")]
    out = ["| Adapter | " + " | ".join(f"`{n}`" for n in names) + " |", "| --- |" + " --- |" * len(names)]
    for name, fam in rows:
        cells = []
        for n in names:
            v = getattr(fam, n)
            if n == "placeholders":
                v = ", ".join(f"{m}: `{attr}`" for m, attr in v)
            elif isinstance(v, tuple):
                v = ", ".join(f"`{x}`" for x in v)
            else:
                v = "–" if v is None else f"`{v}`"
            cells.append(v)
        out.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def all_params(link_prefix: str = "") -> str:
    """Every built-in reducer's parameter table, one section each (configuration reference)."""
    parts = []
    for name, cls in builtin_reducers().items():
        stages = ", ".join(f"`{s}`" for s in _stages(cls))
        parts += [
            f"### {name}\n",
            f"{cls.summary()} Stages: {stages}. [Page]({link_prefix}{name}.md).\n",
            params_table(name),
        ]
    return "\n".join(parts)


def config_fields() -> str:
    from tokenreduce.config import PipelineConfig, StepConfig

    return "\n".join(
        ["### Top level\n", fields_table(PipelineConfig), "### A step (`pipeline:` items)\n", fields_table(StepConfig)]
    )


# -- benchmarks ------------------------------------------------------------------------------------


_META = (
    "title",
    "description",
    "command",
    "hardware",
    "device",
    "gpu",
    "cpu",
    "torch",
    "transformers",
    "date",
    "dtype",
    "notes",
)
# Words of result keys as a person reads them (``ttft_none_ms`` -> "TTFT none (ms)").
_WORDS = {"ttft": "TTFT", "kv": "KV", "apet": "ApET", "gpu": "GPU", "cpu": "CPU", "tok": "tokens", "mb": "MB"}
_UNITS = {"ms": "ms", "s": "s", "gib": "GiB", "mib": "MiB", "mb": "MB", "bytes": "bytes", "gbs": "GB/s"}


def column_title(key: str) -> str:
    """A result key as a column title: words, known acronyms, the unit in brackets."""
    if len(key) <= 2:
        return key  # B, N, D, T, k: the shapes' usual letters
    parts = key.split("_")
    unit = ""
    if key.endswith("_tok_s"):
        parts, unit = parts[:-2], "tokens/s"
    elif len(parts) > 1 and parts[-1] in _UNITS:
        unit = _UNITS[parts.pop()]
    words = " ".join(_WORDS.get(p, p) for p in parts)
    words = words[:1].upper() + words[1:]
    return f"{words} ({unit})" if unit else words


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(v, (int, float)) for v in value):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, (dict, list)):
        text = json.dumps(value)
        return f"`{text[:40]}…`" if len(text) > 40 else f"`{text}`"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _rows_table(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    out = ["| " + " | ".join(column_title(c) for c in cols) + " |", "|" + " --- |" * len(cols)]
    for row in rows:
        out.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
    return "\n".join(out) + "\n"


def _indent(text: str) -> str:
    """Content of a collapsed ``??? note`` block."""
    return "\n".join(("    " + line) if line.strip() else "" for line in text.splitlines()) + "\n"


def collapsed(title: str, body: str, kind: str = "note") -> str:
    """A block that is closed until clicked (pymdownx.details)."""
    return f'??? {kind} "{title.replace(chr(34), chr(39))}"\n\n' + _indent(body) + "\n"


def benchmark_section(path: Path, report: Any = None) -> str:
    """One results file, collapsed: its metadata (the command in a code block), then its rows as a table.

    With :mod:`benchmarks.report` at hand, end-to-end, overhead and attention files use its
    tables (human column titles, percentiles); any other file a generic table.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"!!! warning\n    `{path.name}` could not be read: {err}\n"
    title = data.get("title", path.stem) if isinstance(data, dict) else path.stem
    label = path.name if title == path.stem else f"{title} ({path.name})"
    parts = [f"Source: `{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}`\n"]
    rows: Any = data
    if isinstance(data, dict):
        meta = {**data.get("meta", {}), **{k: data[k] for k in _META if k in data and k != "title"}}
        command = meta.pop("command", None)
        shown = [(k, meta[k]) for k in _META if k in meta and meta[k] not in (None, "")]
        parts += [f"**{k}:** {_fmt(v)}  " for k, v in shown]
        if command:
            parts += ["", "```bash", str(command), "```"]
        parts.append("")
        rows = next((data[k] for k in ("rows", "results", "records") if isinstance(data.get(k), list)), None)
        special = _report_table(path, data, report)
        if special is not None:
            parts.append(special)
            return collapsed(label, "\n".join(parts))
        if rows is None:
            rest = {k: v for k, v in data.items() if k not in _META and k != "meta"}
            parts.append("```json\n" + json.dumps(rest, indent=2)[:4000] + "\n```\n")
            return collapsed(label, "\n".join(parts))
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        parts.append(_rows_table(rows))
    else:
        parts.append("```json\n" + json.dumps(rows, indent=2)[:4000] + "\n```\n")
    return collapsed(label, "\n".join(parts))


def _report_table(path: Path, data: dict[str, Any], report: Any) -> str | None:
    """The report's own table for the suites it knows (without its heading), else None."""
    if report is None or "meta" not in data or not isinstance(data.get("results"), list):
        return None
    try:
        if path.name.startswith("e2e_"):
            lines = report._e2e(path.stem[len("e2e_") :], data)[2:]
        elif path.name == "overhead.json":
            lines = report._overhead(data["results"], {"overhead": data})[2:]
        elif path.name.startswith("attention_"):
            lines = report._attention({"attention": {path.stem[len("attention_") :]: data}})[2:]
        else:
            return None
    except (KeyError, TypeError, ValueError):
        return None  # a file of an older layout: the generic table
    return "\n".join(line.replace("### ", "**", 1) + "**" if line.startswith("### ") else line for line in lines)


def benchmark_plots(results: Path = RESULTS) -> list[Path]:
    return sorted(p for p in results.glob("*") if p.suffix in {".png", ".svg"}) if results.is_dir() else []


def _report_module() -> Any:
    """:mod:`benchmarks.report` (the repository root on the path), or None where it cannot load."""
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import report
    except ImportError:
        return None
    return report


def _lead_plot(plots: list[Path], keys: list[str]) -> Path | None:
    """The picture the page opens with: the speed-ups of the first model, else its latency plot."""
    by_name = {p.name: p for p in plots}
    for key in keys:
        for name in (f"speedup_{key}.png", f"latency_vs_budget_{key}.png"):
            if name in by_name:
                return by_name[name]
    return plots[0] if plots else None


def _buys_section(report: Any, key: str, doc: dict[str, Any], heading: bool = True) -> str:
    got = report.buys(doc)
    meta = doc["meta"]
    title = doc.get("model", {}).get("title", key)
    where = meta.get("gpu") or meta.get("device")
    lines = [
        f"### {title}" if heading else f"**{title}**",
        "",
        f"{where}, torch {meta.get('torch')}, transformers {meta.get('transformers')}, {meta.get('date', '')[:10]}; "
        f"each reducer keeps {got['target']} image tokens of {doc.get('model', {}).get('image_tokens', '?')}. "
        "Speed-up = time to first token without reduction / with it, at the same batch size "
        "(above 1: faster).",
        "",
        report.buys_summary(doc),
        "",
        report.spread_note(doc),
        "",
        *report.buys_table(doc),
        "",
    ]
    return "\n".join(lines)


def _targets_section(report: Any, data: dict[str, Any]) -> str:
    tg = report.targets19(data)
    if not tg:
        return ""
    lines = [
        "### Targets",
        "",
        "The goals of issue 19 (LLaVA-1.5-7B, 576 → 64 image tokens after the projector unless stated), "
        "met or missed by the committed results.",
        "",
        "| Target | Measured | Goal | Status |",
        "| --- | --- | --- | --- |",
    ]
    for t in tg:
        status = "met" if t["met"] else "**missed**"
        lines.append(f"| {t['target']} | {report.format_value(t)} | {t['goal']} | {status} |")
    if not any(p != "eager" for doc in data["e2e"].values() if doc for p in report.paths(doc)):
        lines += [
            "",
            "Every figure here is the eager path (stock transformers with the pipeline patched in); "
            "a faster execution path will be shown beside it, from the same run, once it is measured.",
        ]
    return "\n".join(lines) + "\n"


def _older_runs(report: Any, results: Path) -> list[str]:
    """Each sub-folder of results with end-to-end files (a run on another stack), collapsed."""
    out = []
    for sub in sorted(p for p in results.iterdir() if p.is_dir()):
        try:
            docs = {k: d for k, d in report.load(sub)["e2e"].items() if d and report.timed(d.get("results", []))}
        except (KeyError, TypeError, ValueError):
            continue
        if not docs:
            continue
        first = next(iter(docs.values()))["meta"]
        title = (
            f"Also: {first.get('gpu') or first.get('device')}, transformers {first.get('transformers')} "
            f"(benchmarks/results/{sub.name}/)"
        )
        out.append(collapsed(title, "\n".join(_buys_section(report, k, d, heading=False) for k, d in docs.items())))
    return out


def benchmarks_markdown(results: Path = RESULTS, plot_prefix: str = "") -> str:
    """The Benchmarks page: a picture and what each reducer buys first, targets, then every
    results file collapsed (or how to make them, without results)."""
    files = sorted(results.glob("*.json")) if results.is_dir() else []
    plots = benchmark_plots(results)
    if not files and not plots:
        scripts = sorted((ROOT / "benchmarks").glob("*.py"))
        listed = "\n".join(f"- `python benchmarks/{s.name}`" for s in scripts) or "- (no benchmark scripts yet)"
        return (
            '!!! note "No results committed yet"\n'
            "    `benchmarks/results/` holds no JSON results in this build. Run the scripts below; each prints\n"
            "    a table and writes its JSON to `benchmarks/results/`, which this page then shows.\n\n" + listed + "\n"
        )
    report = _report_module()
    data: dict[str, Any] = {"e2e": {}}
    if report is not None:
        try:
            data = report.load(results)
        except (KeyError, TypeError, ValueError):
            data = {"e2e": {}}
    e2e = {k: d for k, d in data.get("e2e", {}).items() if d and report is not None and report.timed(d.get("results", []))}
    parts = []
    # The video rows (benchmarks/video_report.py): chart, words and tables, after the image rows.
    video, shown = ("", [])
    if report is not None and hasattr(report, "video_docs"):
        video, shown = report.video_docs(data, plot_prefix, [p.name for p in plots])
    lead = _lead_plot([p for p in plots if p.name not in shown], list(e2e))
    if lead is not None:
        parts.append(f"![{lead.stem}]({plot_prefix}{lead.name})\n")
    if e2e:
        parts.append("## What each reducer buys\n")
        parts += [_buys_section(report, key, doc) for key, doc in e2e.items()]
        targets = _targets_section(report, data)
        if targets:
            parts.append(targets)
    if video:
        parts.append(video)
    if e2e:
        parts += _older_runs(report, results)
    rest = [p for p in plots if p != lead and p.name not in shown]
    if rest:
        parts.append("## All results\n")
        parts.append(collapsed("All plots", "\n".join(f"![{p.stem}]({plot_prefix}{p.name})\n" for p in rest)))
    else:
        parts.append("## All results\n")
    parts += [benchmark_section(p, report) for p in files]
    return "\n".join(parts)


# -- markers -------------------------------------------------------------------------------------------


def fill_markers(markdown: str, page_name: str | None = None, *, page_dir: str = "") -> str:
    """Replace every ``<!-- tokenreduce:KIND [NAME] -->`` marker; NAME defaults to the page's reducer."""

    def rel(target_dir: str) -> str:
        """Prefix that leads from this page's folder to ``target_dir`` (both relative to docs/)."""
        path = posixpath.relpath(target_dir or ".", page_dir.rstrip("/") or ".")
        return "" if path == "." else path + "/"

    def replace(m: re.Match[str]) -> str:
        kind, name = m.group(1), m.group(2) or page_name or ""
        if kind == "params":
            return params_table(name)
        if kind == "example":
            return example_block(name)
        if kind == "facts":
            return facts(name)
        if kind == "reducers":
            return reducers_table(rel("reducers"))
        if kind == "all-params":
            return all_params(rel("reducers"))
        if kind == "adapters":
            return adapters_table()
        if kind == "families":
            return families_table()
        if kind == "config-fields":
            return config_fields()
        if kind == "benchmarks":
            return benchmarks_markdown(plot_prefix=rel("benchmarks/results"))
        raise ValueError(f"unknown marker tokenreduce:{kind}")

    return MARKER.sub(replace, markdown)


# -- mkdocs events ---------------------------------------------------------------------------------------


def on_config(config: Any) -> Any:
    """Fill the ``Reducers`` nav section with one page per built-in reducer."""
    for item in config.nav or []:
        if isinstance(item, dict) and "Reducers" in item:
            overview = item["Reducers"] if isinstance(item["Reducers"], str) else "reducers/index.md"
            item["Reducers"] = [{"Overview": overview}] + [{name: f"reducers/{name}.md"} for name in builtin_reducers()]
    return config


def _nav_paths(nav: Any) -> set[str]:
    paths: set[str] = set()
    for item in nav or []:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            paths |= _nav_paths(value)
        elif isinstance(value, str):
            paths.add(value)
    return paths


def on_files(files: Any, config: Any) -> Any:
    """Add the generated reducer pages, the JSON schema and the benchmark plots; pages that
    mkdocs.yml does not list yet go to a "More" section, so none is unreachable."""
    from mkdocs.structure.files import File

    from tokenreduce import json_schema

    for name in builtin_reducers():
        uri = f"reducers/{name}.md"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=reducer_page(name)))
    files.append(File.generated(config, "tokenreduce.schema.json", content=json.dumps(json_schema(), indent=2) + "\n"))
    for plot in benchmark_plots():
        files.append(File.generated(config, f"benchmarks/results/{plot.name}", abs_src_path=str(plot)))
    listed = _nav_paths(config.nav)
    unlisted = [f.src_uri for f in files.documentation_pages() if f.src_uri not in listed]
    if config.nav and unlisted:
        config.nav.append({"More": sorted(unlisted)})
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the markers; complete hand-written reducer pages with the generated sections they lack."""
    uri = page.file.src_uri
    name = None
    if uri.startswith("reducers/") and uri.count("/") == 1 and uri != "reducers/index.md":
        name = uri[len("reducers/") : -len(".md")]
        if (DOCS / uri).is_file():  # hand-written: append what it lacks
            missing = missing_sections(markdown)
            if missing:
                markdown = markdown.rstrip() + "\n\n" + "\n".join(missing)
    page_dir = uri.rsplit("/", 1)[0] + "/" if "/" in uri else ""
    return fill_markers(markdown, name, page_dir=page_dir)


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Roles in the API reference (rendered by mkdocstrings) become plain code too."""
    return ROLE_HTML.sub(lambda m: f"<code>{_role_name(m)}</code>", html)
