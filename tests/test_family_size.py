"""Models as data: each family's own code stays small, and everything else is shared by several families.

A family's own code is the lines of its modules that are not docstrings, comments, blank
lines or its :class:`~tokenreduce_plugins.adapters.engine.Family` row. Every other module of
the adapters package must be shared: listed below with the families (or the whole
package) that use it, so family code cannot hide in a "shared" file.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

import tokenreduce_plugins.adapters as adapters_pkg
from tokenreduce_plugins.adapters import tokenreduce_register_adapters as builtin_adapters

ROOT = Path(adapters_pkg.__file__).parent
LIMIT = 150  # lines of a family's own code (issue 15)

FAMILY_MODULES = {
    "llava": ["llava"],
    "llava_next": ["llava_next"],
    "llava_onevision": ["llava_onevision"],
    "qwen-vl": ["qwen_vl", "qwen_vision"],
    "internvl": ["internvl"],
    "gemma3": ["gemma3"],
}
# Shared modules and who uses them (every adapter, or the families named).
SHARED = {
    "__init__": "the package: registration",
    "engine": "every family: the Family row, patching, steps, the context contract, the decoder stage",
    "units": "every family: the encoder-side engine",
    "sequence": "every family: shortening the prompt, continuing its cache",
    "patches": "every family: restoring the model",
    "serving": "the per-forward path (Qwen-VL; any family whose generate() pre-encodes with tags)",
    "llava_base": "the generate()-first path: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, InternVL, Gemma 3",
    "anyres": "anyres layouts: LLaVA-NeXT and LLaVA-OneVision",
    "vision": "ViT [CLS] context: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, InternVL, Gemma 3",
    "features": "tokenreduce show --model for LLaVA-style checkpoints",
    "tiny": "the embedded default model",
    "compat": "every family: the transformers window",
    "decoder": "every family: llm_layer steps",
    "decoder_attention": "every family: llm_layer steps",
    "decoder_context": "every family: llm_layer steps",
    "decoder_kv": "every family: decode-time llm_layer steps",
    "decoder_start": "every family: llm_layer steps",
    "decoder_state": "every family: llm_layer steps",
    "fast_prefill": "the fast path",
    "fast_layers": "the fast path (llm_layer steps inside its captured prefill)",
    "graphed_tower": "the fast path",
    "varlen_attention": "the fast path: packed-window towers",
}


def own_lines(path: Path) -> int:
    """Code lines of a module, less docstrings, comments, blank lines and ``family = Family(...)`` rows."""
    src = path.read_text()
    tree = ast.parse(src)
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                skip.update(range(first.lineno, first.end_lineno + 1))
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "family" for t in node.targets):
            skip.update(range(node.lineno, node.end_lineno + 1))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        lines.update(line for line in range(tok.start[0], tok.end[0] + 1) if line not in skip)
    return len(lines)


def test_every_builtin_family_is_listed_with_its_modules():
    names = {cls.name for cls in builtin_adapters()}
    assert names == set(FAMILY_MODULES)
    for cls in builtin_adapters():
        assert cls.__module__.rsplit(".", 1)[1] in FAMILY_MODULES[cls.name]
        assert cls.family.name == cls.name  # the row names the adapter


def test_every_module_is_a_familys_or_shared():
    modules = {p.stem for p in ROOT.glob("*.py")}
    family = {m for ms in FAMILY_MODULES.values() for m in ms}
    assert modules == family | set(SHARED), modules ^ (family | set(SHARED))
    assert not family & set(SHARED)


@pytest.mark.parametrize("name", sorted(FAMILY_MODULES))
def test_a_familys_own_code_is_small(name):
    total = sum(own_lines(ROOT / f"{m}.py") for m in FAMILY_MODULES[name])
    assert total <= LIMIT, f"{name}: {total} lines of its own code (limit {LIMIT})"
