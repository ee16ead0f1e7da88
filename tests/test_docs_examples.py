"""Code in the docs cannot rot: every block marked runnable is executed, and the example plugin
distribution of the tutorial (docs/examples/my_reducer) is built, installed, listed, loaded
from YAML and run through the conformance kit.

A block is marked by a ``<!-- test -->`` line right before its opening fence. Python blocks of
a page run in order in one namespace; bash blocks run line by line, ``tokenreduce ...``
lines (optionally ``| grep WORD``) through the CLI app in this process, anything else in
bash. Both run in a scratch folder that links the repository's ``examples/`` and ``docs/``,
with the example plugin installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tokenreduce as tr
from tokenreduce.cli import app
from tokenreduce.registry import reset_registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLE = DOCS / "examples" / "my_reducer"
FENCE = re.compile(r"^<!-- test -->\n```(python|bash)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str


def marked_blocks() -> dict[str, list[Block]]:
    pages: dict[str, list[Block]] = {}
    for path in sorted(DOCS.rglob("*.md")):
        if "examples" in path.relative_to(DOCS).parts:
            continue
        text = path.read_text()
        rel = str(path.relative_to(DOCS))
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 3  # first line of code
            pages.setdefault(rel, []).append(Block(rel, line, m.group(1), m.group(2)))
    return pages


PAGES = marked_blocks()


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The example distribution, built from a copy (in-tree builds leave files behind) and
    installed into a folder put on sys.path, as a user's ``pip install`` would."""
    root = tmp_path_factory.mktemp("my_reducer")
    src = root / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(site))
    reset_registry()
    yield site
    sys.path.remove(str(site))
    for mod in [m for m in sys.modules if m == "my_reducer" or m.startswith("my_reducer.")]:
        del sys.modules[mod]
    reset_registry()


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    for name in ("examples", "docs"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


def run_bash(block: Block, site: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), COLUMNS="200")
    for offset, raw in enumerate(block.code.splitlines()):
        line = raw.split("  #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{block.page}:{block.line + offset}: {line}"
        command, _, grep = line.partition(" | grep ")
        words = shlex.split(command)
        if words[0] == "tokenreduce" and "|" not in command:
            res = CliRunner().invoke(app, words[1:], env={"COLUMNS": "200"})
            output, code = res.output, res.exit_code
        else:
            proc = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", command], capture_output=True, text=True, env=env, timeout=120
            )
            output, code = proc.stdout + proc.stderr, proc.returncode
        assert code == 0, f"{where}\nexit {code}\n{output}"
        if grep:
            assert grep.strip() in output, f"{where}\n{grep.strip()!r} not in output:\n{output}"


def test_the_pages_have_runnable_blocks():
    """Guards the collector: the pages that must run code do have marked blocks."""
    assert {"index.md", "getting-started.md", "concepts.md", "writing-a-plugin.md", "model-adapters.md"} <= set(PAGES)
    assert {b.lang for blocks in PAGES.values() for b in blocks} == {"python", "bash"}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_marked_blocks_run(page, plugin_site, scratch):
    namespace: dict = {"__name__": f"docs_{page}"}
    try:
        for block in PAGES[page]:
            if block.lang == "python":
                code = compile(block.code, f"{page}:{block.line}", "exec")
                exec(code, namespace)  # a docs example; failures point at page:line
            else:
                run_bash(block, plugin_site)
    finally:
        reset_registry()  # blocks may register reducers or adapters by hand


# -- the example plugin distribution ------------------------------------------------------------------


def test_example_plugin_is_found_through_its_entry_point(plugin_site):
    entry = tr.get_registry().reducers["norm"]
    assert (entry.source, entry.version) == ("tokenreduce-my-reducer", "0.1.0")
    assert entry.cls.__module__ == "my_reducer.norm"
    assert not [b for b in tr.get_registry().broken if b.source == "tokenreduce-my-reducer"]


def test_example_plugin_is_listed_by_the_cli(plugin_site):
    res = CliRunner().invoke(app, ["list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    line = next(row for row in res.output.splitlines() if " norm " in row)
    assert "0.1.0" in line and "tokenreduce-my-reducer" in line and "llm_layer, projector, vision_encoder" in line
    assert "tokenreduce-my-reducer" not in res.output.split("Broken plugins")[-1] or "Broken plugins" not in res.output


def test_example_plugin_loads_from_its_yaml(plugin_site):
    pipe = tr.load_config(EXAMPLE / "pipeline.yaml")
    assert pipe.steps[0].reducer == tr.create("norm", 64, stage="projector", ord=2.0, centre=True)
    with pytest.raises(tr.ConfigError, match="ord"):
        tr.loads_config("pipeline:\n  - {stage: projector, reducer: norm, budget: 8, params: {ord: 0.5}}\n")


def test_example_plugin_own_tests_pass(plugin_site):
    """The plugin's tests/test_norm.py (the conformance kit and its own check), as its author runs them."""
    spec = importlib.util.spec_from_file_location("my_reducer_tests", EXAMPLE / "tests" / "test_norm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, n) for n in dir(module) if n.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()
