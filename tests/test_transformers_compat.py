"""The transformers compatibility layer: the supported window, and the helpers adapters go through."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from models import tiny_llava, tiny_qwen2_5_vl
from tokenreduce_plugins.adapters import compat

import tokenreduce
from tokenreduce import ConfigError, Step, create

ADAPTERS = Path(compat.__file__).parent


@pytest.mark.parametrize("version", ["5.16.1", "5.25.0", "6.0.0", "4.57.6", "5.16.0.dev0"])
@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2_5_vl], ids=["llava", "qwen2.5-vl"])
def test_apply_refuses_an_untested_release(monkeypatch, version, build):
    monkeypatch.setattr(compat, "installed_version", lambda: version)
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    model = build(0)
    with pytest.raises(ConfigError) as err:
        tokenreduce.patch(model, Step("projector", create("random", 4)))
    msg = str(err.value)
    assert f"transformers {version} is installed" in msg and compat.SUPPORTED in msg
    assert all(v in msg for v in compat.TESTED_RELEASES)
    assert "forward" not in model.__dict__  # refused before anything was patched


@pytest.mark.parametrize("version", ["5.17.0", "5.20.2", "5.24.0", "5.24.1", "5.18.0.dev0"])
def test_every_release_of_the_window_is_accepted(version):
    compat.check_supported(version)


def test_the_escape_hatch_warns_instead(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda: "5.30.0")
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    model = tiny_llava(0)
    with pytest.warns(RuntimeWarning, match="5.30.0 is installed"):
        handle = tokenreduce.patch(model, Step("projector", create("random", 4)))
    handle.remove()


def test_the_installed_release_is_inside_the_window():
    # CI runs the suite on both ends of the window; this pins that it never runs outside it.
    compat.check_supported()


def test_cache_keywords_follow_the_callee():
    def new(x, cache=None):
        return cache

    def old(x, past_key_values=None):
        return past_key_values

    for fn in (new, old):
        for name in compat.CACHE_NAMES[:2]:
            assert fn(1, **compat.native_kwargs(fn, {name: "C"})) == "C"
    assert compat.get_cache({"past_key_values": None, "cache": "C"}) == "C"
    assert compat.native_kwargs(new, {"x": 1}) == {"x": 1}
    assert compat.canonical_kwargs({"past_key_values": "C", "x": 1}) == {"cache": "C", "x": 1}


def test_serving_features_restores_the_getters():
    model = tiny_llava(0)
    inner = model.model
    before = dict(inner.__dict__)
    with compat.serving_features(inner, {"image": "served"}):
        assert inner.get_image_features(torch.zeros(1)) == "served"
    assert inner.__dict__.keys() == before.keys()
    with pytest.raises(RuntimeError), compat.serving_features(inner, {"image": "served"}):
        raise RuntimeError("inside")
    assert "get_image_features" not in inner.__dict__


def _transformers_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
            names.add(node.module)
    return names


def test_adapters_reach_transformers_internals_only_through_compat():
    # Public, stable imports (output classes, the Cache base, patch-count helpers of the model
    # files) are allowed anywhere; the internals that change between releases live in compat.
    internal = {"transformers.masking_utils", "transformers.generation", "transformers.generation.utils"}
    for path in sorted(ADAPTERS.glob("*.py")):
        if path.name == "compat.py":
            continue
        assert not (_transformers_imports(path) & internal), path.name
        text = path.read_text()
        for needle in ("create_causal_mask(", ".compute_3d_position_ids(", "past_key_values="):
            assert needle not in text.replace("compat.compute_3d_position_ids(", ""), (path.name, needle)
