"""What a user or plugin author reads when a name, a plugin or a parameter is wrong (issue #16).

Entry points are real ``importlib.metadata.EntryPoint`` objects pointing at a module
written in the test, read by a fresh :class:`Registry` (the shared one is untouched).
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import textwrap

import pytest

import tokenreduce as tr
from tokenreduce import ConfigError, UnknownNameError
from tokenreduce.registry import REDUCER_GROUP, Registry

MODULE = '''
    """A third party's module: one good reducer, and objects that are not reducers."""
    import torch
    import tokenreduce as tr

    class Keep(tr.ScoringReducer):
        """Keep the first T tokens."""
        name = "tr16-keep"

        def score(self, tokens, valid, context):
            n = tokens.shape[1]
            return -torch.arange(n, dtype=torch.float32).expand(tokens.shape[0], n)

    def helper(tokens):
        return tokens

    class Plain:
        name = "tr16-plain"
'''


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    (tmp_path / "tr16_plugin.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "tr16_crashes.py").write_text("raise ImportError('tr16 needs a package that is not installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        md.EntryPoint("tr16-keep", "tr16_plugin:Keep", REDUCER_GROUP),
        md.EntryPoint("tr16-helper", "tr16_plugin:helper", REDUCER_GROUP),
        md.EntryPoint("tr16-plain", "tr16_plugin:Plain", REDUCER_GROUP),
        md.EntryPoint("tr16-renamed", "tr16_plugin:Keep", REDUCER_GROUP),
        md.EntryPoint("tr16-crashes", "tr16_crashes:Crashes", REDUCER_GROUP),
    ]
    monkeypatch.setattr(md, "entry_points", lambda group=None: [e for e in eps if e.group == group])
    reg = Registry()
    reg.load_entry_points()
    yield reg
    for mod in ("tr16_plugin", "tr16_crashes"):
        sys.modules.pop(mod, None)


def test_an_entry_point_naming_a_non_reducer_says_so(registry):
    broken = {b.name: b.error for b in registry.broken}
    assert "tr16-keep" in registry.reducers
    # A function and a plain class: the problem is what they are, not their name.
    assert "is not a subclass of tokenreduce.Reducer (it is a function, not a class)" in broken["tr16-helper"]
    assert "entry point 'tr16-helper' = 'tr16_plugin:helper'" in broken["tr16-helper"]
    assert "is not a subclass of tokenreduce.Reducer" in broken["tr16-plain"]
    for name in ("tr16-helper", "tr16-plain"):
        assert "entry-point name must equal" not in broken[name]
    # A real reducer under another name: then the name is the problem.
    assert "the entry-point name must equal the reducer's name" in broken["tr16-renamed"]


def test_asking_for_a_broken_plugin_says_it_failed_to_load_and_why(registry):
    with pytest.raises(UnknownNameError) as info:
        registry.reducer_class("tr16-crashes")
    msg = str(info.value)
    assert "'tr16-crashes' is installed but its plugin failed to load" in msg
    assert "tr16 needs a package that is not installed" in msg
    assert "Did you mean" not in msg


def test_an_unknown_name_lists_the_plugins_that_failed_to_load(registry):
    with pytest.raises(UnknownNameError) as info:
        registry.reducer_class("tr16-missing")
    msg = str(info.value)
    assert msg.startswith("unknown reducer 'tr16-missing'.")
    assert "These plugins failed to load (one may provide it):" in msg
    for name in ("tr16-crashes", "tr16-helper", "tr16-plain"):
        assert f"\n  {name}: " in msg
    assert "tr16 needs a package that is not installed" in msg


def test_names_differing_only_in_case_are_suggested_not_guessed():
    with pytest.raises(UnknownNameError, match=r"unknown reducer 'TOME'\. Did you mean 'tome'\?") as info:
        tr.create("TOME", budget=4)
    assert "failed to load" not in str(info.value)  # the answer is clear; no plugin listing
    with pytest.raises(UnknownNameError, match=r"Did you mean 'apet-llava'\?"):
        tr.create("apet_llava", budget=4)


def test_a_name_that_is_not_a_string_is_a_clear_error():
    for name in (None, 5, ["tome"]):
        with pytest.raises(UnknownNameError, match="unknown reducer"):
            tr.create(name, budget=4)


def test_misspelt_parameters_suggest_the_field():
    with pytest.raises(ConfigError, match=r"basis_token: Extra inputs are not permitted \(got 3\)\. Did you mean 'basis_tokens'\?$"):
        tr.create("apet", budget=64, basis_token=3)
    with pytest.raises(ConfigError, match=r"Did you mean 'basis_tokens'\?"):
        tr.create("apet", budget=64, Basis_Tokens=3)
    with pytest.raises(ConfigError, match=r"zzz: Extra inputs are not permitted \(got 1\)$"):
        tr.create("apet", budget=64, zzz=1)  # nothing close: no guess


def test_booleans_are_refused_where_numbers_belong():
    with pytest.raises(ConfigError, match=r"basis_tokens: a boolean is not allowed here; give a value of type int \(got True\)"):
        tr.create("apet", budget=64, basis_tokens=True)
    with pytest.raises(ConfigError, match=r"ridge: a boolean is not allowed here"):
        tr.create("apet", budget=64, ridge=True)
    # A real number is still read as before.
    assert tr.create("apet", budget=64, basis_tokens=3).params.basis_tokens == 3
