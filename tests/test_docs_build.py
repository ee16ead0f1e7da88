"""The documentation site: generated pages and tables (docs/hooks.py), YAML examples, code
references in the pages, the strict mkdocs build, and a headless-browser check of the result."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tokenreduce as tr
from tokenreduce.runner import run_synthetic

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


hooks = _load("docs_hooks", DOCS / "hooks.py")
check_site = _load("docs_check_site", DOCS / "check_site.py")
BUILTINS = sorted(hooks.builtin_reducers())


def test_every_builtin_reducer_gets_a_page():
    # The entry points of pyproject.toml are what must be documented.
    assert {"random", "pool", "apet", "tome", "fastv"} <= set(BUILTINS)
    assert all(tr.get_registry().reducers[n].source == "tokenreduce" for n in BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_parameter_table_is_generated_from_the_model(name):
    params = tr.get_registry().reducer_class(name).Params
    table = hooks.params_table(name)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(params.model_fields) or (not params.model_fields and "No parameters" in table)
    for field_name, field in params.model_fields.items():
        row = next(line for line in lines if line.startswith(f"| `{field_name}` |"))
        if field.description:
            assert field.description.replace("|", "\\|").replace("\n", " ") in row


def test_table_shows_types_defaults_and_ranges():
    table = hooks.params_table("apet")
    assert "| `basis_tokens` | `int` | `10` | `>= 1` |" in table
    assert "| `basis_selection` | `str` | `'fps'` | `fps | dpc | random` |" in table
    assert "| `basis_blend` | `float` | `0.0` | `>= 0.0, <= 1.0` |" in table
    fields = hooks.config_fields()
    assert "| `stage` | `Stage` | *required* | `vision_encoder | projector | llm_layer` |" in fields
    assert "| `params` | `dict[str, Any]` | `{}` |" in fields


@pytest.mark.parametrize("name", BUILTINS)
def test_yaml_example_loads_and_runs(name):
    """The example each reducer page shows is a valid pipeline that runs on the embedded default."""
    text, _source = hooks.example_yaml(name)
    pipe = tr.loads_config(text, source=f"{name} example")
    assert any(step.reducer.name == name for step in pipe)
    rows = run_synthetic(pipe)
    assert [r.reducer for r in rows] == [s.reducer.name for s in pipe]
    assert all(0 < r.tokens_after <= r.tokens_before for r in rows)


def test_example_files_belong_to_registered_reducers():
    folder = DOCS / "examples" / "reducers"
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        assert path.stem in BUILTINS, f"{path} names no built-in reducer"
        assert hooks.example_yaml(path.stem) == (path.read_text(), f"docs/examples/reducers/{path.name}")


def test_generated_reducer_page_has_facts_docstring_table_and_example():
    page = hooks.fill_markers(hooks.reducer_page("tome"), "tome", page_dir="reducers/")
    cls = tr.get_registry().reducer_class("tome")
    assert page.startswith("# tome\n") and cls.paper in page and cls.summary() in page
    assert "## How it works" in page and "## Parameters" in page and "```yaml" in page
    assert "`vision_encoder`, `projector`, `llm_layer`" in page
    assert "<!-- tokenreduce:" not in page


def test_hand_written_page_keeps_its_text_and_gains_what_it_lacks():
    written = "# apet\n\nProse.\n\n## Knobs\n\n<!-- tokenreduce:params -->\n\nMore prose.\n"
    page = written + "\n" + "\n".join(hooks.missing_sections(written))
    page = hooks.fill_markers(page, "apet", page_dir="reducers/")
    assert page.count("| `basis_tokens` |") == 1  # the table where the author put it, not twice
    assert page.index("## Knobs") < page.index("| `basis_tokens` |") < page.index("More prose.")
    assert "## YAML example" in page and "reducer: apet" in page


def test_markers_quoted_in_text_are_left_alone():
    text = "Write `<!-- tokenreduce:params -->` on its own line.\n"
    assert hooks.fill_markers(text, None) == text
    with pytest.raises(ValueError, match="unknown marker tokenreduce:nope"):
        hooks.fill_markers("<!-- tokenreduce:nope -->\n", None)


def test_links_are_relative_to_the_page():
    assert "[`tome`](reducers/tome.md)" in hooks.fill_markers("<!-- tokenreduce:reducers -->", None, page_dir="")
    assert "[`tome`](tome.md)" in hooks.fill_markers("<!-- tokenreduce:reducers -->", None, page_dir="reducers/")
    assert "[Page](../reducers/tome.md)" in hooks.fill_markers("<!-- tokenreduce:all-params -->", None, page_dir="api/")


def test_benchmarks_page_shows_results_or_how_to_make_them(tmp_path):
    assert "No results committed yet" in hooks.benchmarks_markdown(tmp_path / "absent")
    (tmp_path / "speed.json").write_text(
        json.dumps(
            {
                "title": "Reducer speed",
                "hardware": "1x H100",
                "command": "python benchmarks/speed.py --a-very-long-option " + "x" * 200,
                "rows": [{"reducer": "apet", "median_ms": 1.23456}, {"reducer": "tome", "median_ms": 0.5, "note": "a|b"}],
            }
        )
    )
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "speed.png").write_bytes(b"\x89PNG")
    md = hooks.benchmarks_markdown(tmp_path, plot_prefix="benchmarks/results/")
    assert md.startswith("![speed](benchmarks/results/speed.png)")  # a picture first
    # The file's table is collapsed, with human column titles; the command sits in a code block, not a cell.
    assert '??? note "Reducer speed (speed.json)"' in md and "    **hardware:** 1x H100" in md
    assert "    | Reducer | Median (ms) | Note |" in md and "    | apet | 1.235 |  |" in md and "| tome | 0.5 | a\\|b |" in md
    assert "    ```bash\n    python benchmarks/speed.py --a-very-long-option" in md
    assert "could not be read" in md


def test_column_titles_are_words():
    assert hooks.column_title("ttft_none_ms") == "TTFT none (ms)"
    assert hooks.column_title("apet_minus_random_ms") == "ApET minus random (ms)"
    assert hooks.column_title("decode_tok_s") == "Decode (tokens/s)"
    assert hooks.column_title("peak_gib") == "Peak (GiB)" and hooks.column_title("B") == "B"


def test_benchmarks_page_opens_with_a_plot_and_what_reducers_buy():
    """The committed results as a person meets them: picture, the speed-up tables in words,
    the targets, then every file collapsed; no raw keys as titles, no long table cells."""
    md = hooks.benchmarks_markdown(plot_prefix="benchmarks/results/")
    first = md.lstrip().splitlines()[0]
    assert first.startswith("![speedup_") or first.startswith("![latency_vs_budget_"), first
    buys, targets, rest = md.index("## What each reducer buys"), md.index("### Targets"), md.index("## All results")
    assert buys < targets < rest
    top = md[:rest]
    assert "At batch 1" in top and "At batch 8" in top
    assert "| Reducer | Where it runs | Speed-up, batch 1 | TTFT ms, batch 1 | Speed-up, batch 8 | TTFT ms, batch 8 |" in top
    assert "| no reduction (reference) |" in top and "after the projector" in top and "decoder layer 2" in top
    # Below: every results file in its own collapsed block, and nothing else open.
    tail = md[rest:].split("\n")
    files = sorted(p.name for p in hooks.RESULTS.glob("*.json"))
    blocks = [line for line in tail if line.startswith("??? note")]
    assert len(blocks) == len(files) + 1  # + "All plots"
    for name in files:
        assert any(f"{name})" in b or f'"{name}"' in b for b in blocks), name
    assert all(not line or line.startswith(("    ", "??? ", "## ")) for line in tail)
    for line in md.splitlines():
        if line.lstrip().startswith("|"):
            cells = line.strip().strip("|").split("|")
            assert max(len(c) for c in cells) < 200, line[:120]  # no cell that wraps into a tower
            assert "python -m" not in line and "ttft_none_ms" not in line and "ttft_ms" not in line


def _code_references() -> set[str]:
    found = set()
    for page in DOCS.rglob("*.md"):
        found |= set(re.findall(r"`((?:tokenreduce|tokenreduce_plugins)(?:\.\w+)+)`", page.read_text()))
    return found


def test_dotted_names_in_the_pages_exist():
    """Every `tokenreduce.x.y` / `tokenreduce_plugins.x.y` a page names can be imported."""
    from tokenreduce.registry import PLUGIN_GROUP, REDUCER_GROUP

    refs = _code_references() - {REDUCER_GROUP, PLUGIN_GROUP}  # entry-point groups, not modules
    assert "tokenreduce.config.PipelineConfig" in refs
    for ref in sorted(refs):
        parts = ref.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
                assert obj is not None, f"{ref}: {attr} not found"
            break
        else:
            pytest.fail(f"{ref}: no importable module")


# -- the real build --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the [docs] extra is not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed")
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.mark.slow
def test_strict_build_writes_every_generated_page(site):
    for name in BUILTINS:
        html = (site / "reducers" / name / "index.html").read_text()
        for field_name in tr.get_registry().reducer_class(name).Params.model_fields:
            assert f"<code>{field_name}</code>" in html, f"{name}: {field_name} missing"
    assert json.loads((site / "tokenreduce.schema.json").read_text()) == json.loads(json.dumps(tr.json_schema()))
    config = (site / "configuration" / "index.html").read_text()
    assert all(f'id="{name}"' in config for name in BUILTINS)
    api = (site / "api" / "reducers" / "index.html").read_text()
    assert "ScoringReducer" in api and ":class:" not in api


@pytest.mark.slow
def test_built_benchmarks_page_has_its_picture_tables_and_collapsed_files(site):
    html = (site / "benchmarks" / "index.html").read_text()
    article = html[html.index("<article") :]
    assert article.index("<img") < article.index("<table")  # a picture before any table
    assert 'id="what-each-reducer-buys"' in article and "<details" in article
    first_details = article.index("<details")
    assert article.index('id="all-results"') < first_details or "Also:" in article[first_details : first_details + 400]
    plot = re.search(r'<img[^>]+src="([^"]+)"', article).group(1)
    assert (site / "benchmarks" / plot).resolve().is_file(), plot


@pytest.mark.slow
def test_site_renders_in_headless_chromium(site, tmp_path):
    if check_site.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the browser check needs it")
    results = check_site.check_site(site, tmp_path)
    assert len(results) == len(check_site.PAGES)
    for r in results:
        assert r.ok, f"{r.url}: pixel std {r.std:.1f}, title text found {r.title_found}, {r.error}"


def test_pictures_in_the_pages_are_the_generated_ones():
    """docs/assets holds exactly what docs/make_pictures.py makes, every one is used, and the
    committed diagram is the script's output (not edited by hand)."""
    pictures = _load("docs_make_pictures", DOCS / "make_pictures.py")
    made = set(pictures.figures()) | {"stages.svg"}
    assert {p.name for p in (DOCS / "assets").iterdir()} == made
    used = set()
    for page in DOCS.rglob("*.md"):
        used |= set(re.findall(r"\]\((?:\.\./)*assets/([\w.-]+)\)", page.read_text()))
    assert used == made
    assert (DOCS / "assets" / "stages.svg").read_text() == pictures.stages_svg()
    for name in made - {"stages.svg"}:
        assert (DOCS / "assets" / name).stat().st_size < 400_000  # small enough to commit


def test_blank_screenshot_fails_the_check(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(tmp_path / "blank.png")
    assert check_site.pixel_std(tmp_path / "blank.png") < check_site.MIN_STD
    assert not check_site.PageResult("u", tmp_path / "blank.png", 0.0, True).ok


def test_chromium_missing_is_reported_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install chromium"):
        check_site.check_site(tmp_path, tmp_path)
