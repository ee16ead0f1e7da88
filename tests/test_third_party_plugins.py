"""A throwaway third-party distribution, built and installed in the test, is found through its
entry points; a deliberately broken one is reported without hiding the good one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tokenreduce as tr
from tokenreduce.registry import reset_registry
from tokenreduce.testing import check_reducer

GOOD = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "tr-good-plugin"
        version = "1.2.3"
        [project.entry-points."tokenreduce.reducers"]
        firstk = "tr_good_plugin:FirstK"
        [tool.setuptools]
        py-modules = ["tr_good_plugin"]
    """,
    "tr_good_plugin.py": '''
        """A third-party reducer: keep the first T valid tokens."""
        import torch
        from pydantic import Field
        import tokenreduce as tr

        class FirstKParams(tr.ReducerParams):
            offset: int = Field(default=0, ge=0, description="Ignored offset, to test params.")

        class FirstK(tr.ScoringReducer):
            """Keep the first T valid tokens."""
            name = "firstk"
            stages = frozenset(tr.Stage)
            Params = FirstKParams

            def score(self, tokens, valid, context):
                n = tokens.shape[1]
                return -torch.arange(n, device=tokens.device, dtype=torch.float32).expand(tokens.shape[0], n)
    ''',
}

BROKEN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "tr-broken-plugin"
        version = "0.0.1"
        [project.entry-points."tokenreduce.reducers"]
        crashes = "tr_broken_plugin.crashes:Crashes"
        [project.entry-points."tokenreduce"]
        hooks = "tr_broken_plugin.hooks"
        [tool.setuptools]
        packages = ["tr_broken_plugin"]
    """,
    "tr_broken_plugin/__init__.py": "",
    "tr_broken_plugin/crashes.py": "raise ImportError('this plugin needs a package that is not installed')\n",
    "tr_broken_plugin/hooks.py": '''
        import tokenreduce as tr
        from tokenreduce_plugins.random_select import RandomReducer

        class Clash(RandomReducer):
            """Tries to take the built-in name 'random'."""

        class NotAReducer:
            name = "not-a-reducer"

        @tr.hookimpl
        def tokenreduce_register_reducers():
            return [Clash, NotAReducer]
    ''',
}


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    site = root / "site"
    for name, files in (("good", GOOD), ("broken", BROKEN)):
        _write(root / name, files)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "--target", str(site), str(root / name)],
            check=True,
            capture_output=True,
        )
    sys.path.insert(0, str(site))
    reset_registry()
    yield site
    sys.path.remove(str(site))
    for mod in [m for m in sys.modules if m.startswith(("tr_good_plugin", "tr_broken_plugin"))]:
        del sys.modules[mod]
    reset_registry()


def test_third_party_reducer_is_registered_with_its_version(site):
    reg = tr.get_registry()
    entry = reg.reducers["firstk"]
    assert (entry.source, entry.version) == ("tr-good-plugin", "1.2.3")
    out = tr.create("firstk", budget=3)(__import__("torch").randn(1, 6, 2))
    assert out.indices.tolist() == [[0, 1, 2]]


def test_broken_plugins_are_reported_and_do_not_hide_others(site):
    reg = tr.get_registry()
    broken = {b.name: b for b in reg.broken if b.source == "tr-broken-plugin"}
    assert "needs a package that is not installed" in broken["crashes"].error
    assert "duplicate reducer name 'random'" in broken["random"].error
    assert "is not a subclass of tokenreduce.Reducer" in broken["not-a-reducer"].error
    # The clash resolved by rule: the built-in keeps the name.
    assert reg.reducers["random"].source == "tokenreduce"
    assert "firstk" in reg.reducers and "pool" in reg.reducers


def test_third_party_reducer_loads_from_yaml(site, tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("pipeline:\n  - {stage: vision_encoder, reducer: firstk, budget: 2, params: {offset: 1}}\n")
    pipe = tr.load_config(p)
    assert pipe.steps[0].reducer == tr.create("firstk", budget=2, stage="vision_encoder", offset=1)


def test_third_party_reducer_passes_the_kit(site):
    check_reducer(tr.get_registry().reducer_class("firstk"), max_examples=15)


def test_cli_list_shows_good_and_broken(site):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), COLUMNS="200")
    out = subprocess.run([sys.executable, "-m", "tokenreduce.cli", "list"], capture_output=True, text=True, env=env, check=True)
    assert "firstk" in out.stdout and "1.2.3" in out.stdout and "tr-good-plugin" in out.stdout
    assert "Broken plugins" in out.stdout and "crashes" in out.stdout and "duplicate reducer name" in out.stdout
