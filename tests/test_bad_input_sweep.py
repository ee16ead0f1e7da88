"""Bad-input sweep (issue #16): every registered reducer x bad budgets, tokens, masks and
parameters, and a set of bad YAML files.

The invariant, for every input: either a tokenreduce error (a ``TokenReduceError``) whose
message names the parameter or field at fault, or a result that passes the conformance
kit's structural checks (:func:`tokenreduce.testing.check_reduction`). Never a generic
Python exception (``TypeError``, ``KeyError``, ``IndexError``, ...) and never a silent
wrong result (a wrong count, a padded token kept, non-finite features).

The reducers are whatever the registry holds when the tests run; a plugin that failed to
load is not registered and so is not swept (``tokenreduce list`` reports it).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import tokenreduce as tr
from tokenreduce import ConfigError, ReductionContext, Stage, TokenReduceError
from tokenreduce.budget import check_budget
from tokenreduce.cli import app
from tokenreduce.config import validate_config
from tokenreduce.context import token_context
from tokenreduce.runner import run_default
from tokenreduce.testing import check_reduction

REGISTRY = tr.get_registry()
CASES = [
    pytest.param(name, stage, id=f"{name}@{stage.value}")
    for name in sorted(REGISTRY.reducers)
    for stage in sorted(REGISTRY.reducers[name].cls.stages, key=lambda s: s.value)
]
SETTINGS = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def context_for(tokens: torch.Tensor, stage: Stage) -> ReductionContext:
    """A full stand-in context (every field any reducer may require), made from the tokens.

    Token-level inputs are what the sweep varies; the context is kept well formed, so a
    reducer that requires one gets past the context check to the case under test.
    """
    x = tokens.float()
    n = x.shape[1]
    side = math.isqrt(n)
    attention = torch.softmax(x.mean(dim=-1), dim=-1)
    # A video of the most frames (of 1, 2, 4) that divide the tokens evenly, for the video methods.
    frames = next(t for t in (4, 2, 1) if n % t == 0)
    per = math.isqrt(n // frames)
    grid = (per * frames, per) if n and per * per * frames == n else None
    return token_context(x.to(tokens.dtype), attention, stage=stage, layer=2, grid=grid, frames=frames)


def good_tokens(b: int = 2, n: int = 16, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def outcome(call: Callable[[], Any], names: tuple[str, ...]) -> Any:
    """Run ``call``; return its result, or the tokenreduce error it raised.

    A tokenreduce error must name one of ``names``; any other exception fails the test.
    """
    try:
        return call()
    except TokenReduceError as err:
        assert any(n in str(err) for n in names), f"{type(err).__name__} does not name any of {names}: {err}"
        return err
    except Exception as err:  # the bug this sweep looks for: a traceback instead of a clear error
        pytest.fail(f"generic {type(err).__name__} instead of a tokenreduce error naming {names}: {err}")


def must_refuse(call: Callable[[], Any], names: tuple[str, ...], what: str) -> None:
    got = outcome(call, names)
    assert isinstance(got, TokenReduceError), f"{what} was accepted (returned {type(got).__name__}): a silent result"


def result_or_clear_error(reducer, tokens, valid, budget, names, mask=None) -> None:
    """A valid-but-odd input: a result that passes the kit's checks, or a clear error."""
    got = outcome(lambda: reducer(tokens, budget, mask=mask, context=context_for(tokens, reducer.stage)), names)
    if not isinstance(got, TokenReduceError):
        check_reduction(got, tokens, valid, budget, rounding=getattr(reducer, "ratio_rounding", "half_up"))


# -- budgets ----------------------------------------------------------------------------------

BAD_BUDGETS = [0, -1, -64, True, False, 1.5, 64.5, 64.0, 0.0, -0.25, math.nan, math.inf, -math.inf, "64", b"64", [64], 1j]
BAD_CALLABLES = [lambda n: 0, lambda n: -3, lambda n: True, lambda n: 2.5, lambda n: "4", lambda n: None]


@pytest.mark.parametrize(("name", "stage"), CASES)
def test_bad_budgets_are_refused_naming_the_budget(name, stage):
    cls = REGISTRY.reducer_class(name)
    tokens = good_tokens()
    reducer = cls(4, stage=stage)
    valid = torch.ones(tokens.shape[:2], dtype=torch.bool)
    for budget in BAD_BUDGETS:
        must_refuse(lambda: cls(budget, stage=stage), ("budget",), f"{name}(budget={budget!r})")
        must_refuse(lambda: reducer(tokens, budget, context=context_for(tokens, stage)), ("budget",), f"call budget={budget!r}")
        # With a mask the per-row path resolves the budget: the same refusal.
        must_refuse(
            lambda: reducer(tokens, budget, mask=valid, context=context_for(tokens, stage)), ("budget",), f"budget={budget!r}"
        )
    for fn in BAD_CALLABLES:
        must_refuse(lambda: reducer(tokens, fn, context=context_for(tokens, stage)), ("budget",), "a callable budget")
    # No budget at all: refused at the call, naming it.
    must_refuse(lambda: cls(stage=stage)(tokens, context=context_for(tokens, stage)), ("budget",), "no budget")
    # Valid but odd: a budget far above N, a callable above N, the smallest ratio and 1.0.
    for budget in (10**12, lambda n: n + 10, 1.0, 1e-9, 1):
        result_or_clear_error(reducer, tokens, valid, budget, ("budget", "basis_tokens"))


# -- tokens -----------------------------------------------------------------------------------


def _with(value: float) -> torch.Tensor:
    x = good_tokens()
    x[1, 5, 3] = value
    return x


BAD_TOKENS = {
    "2-D": torch.randn(16, 8),
    "4-D": torch.randn(2, 16, 8, 1),
    "0-D": torch.tensor(1.0),
    "int64": torch.randint(0, 5, (2, 16, 8)),
    "bool": torch.ones(2, 16, 8, dtype=torch.bool),
    "complex": torch.randn(2, 16, 8, dtype=torch.complex64),
    "empty batch": torch.randn(0, 16, 8),
    "empty width": torch.randn(2, 16, 0),
    "NaN": _with(math.nan),
    "+inf": _with(math.inf),
    "-inf": _with(-math.inf),
    "list": good_tokens().tolist(),
    "numpy": good_tokens().numpy(),
    "None": None,
}


@pytest.mark.parametrize(("name", "stage"), CASES)
def test_bad_tokens_are_refused_naming_the_tokens(name, stage):
    reducer = REGISTRY.reducer_class(name)(4, stage=stage)
    for label, tokens in BAD_TOKENS.items():
        # The context cannot be built from bad tokens; a well-formed one for good tokens stands in.
        must_refuse(lambda: reducer(tokens, context=context_for(good_tokens(), stage)), ("tokens",), f"{label} tokens")


@pytest.mark.parametrize(("name", "stage"), CASES)
def test_odd_but_valid_tokens_give_a_checked_result(name, stage):
    reducer = REGISTRY.reducer_class(name)(4, stage=stage)
    names = ("budget", "basis_tokens", "tokens", "grid")
    x = good_tokens(n=16)
    odd = {
        "no tokens (N = 0)": torch.randn(2, 0, 8),
        "one token": torch.randn(2, 1, 8),
        "float64": x.double(),
        "non-contiguous": good_tokens(d=16)[:, :, ::2],
        "all zeros": torch.zeros(2, 16, 8),
        "all equal": torch.full((2, 16, 8), 3.0),
        "requires grad": x.clone().requires_grad_(True),
    }
    for label, tokens in odd.items():
        valid = torch.ones(tokens.shape[:2], dtype=torch.bool)
        try:
            result_or_clear_error(reducer, tokens, valid, 4, names)
        except AssertionError as err:
            raise AssertionError(f"{label}: {err}") from None


# -- masks ------------------------------------------------------------------------------------

BAD_MASKS = {
    "shape (B, N-1)": torch.ones(2, 15, dtype=torch.bool),
    "shape (B,)": torch.ones(2, dtype=torch.bool),
    "shape (B, N, 1)": torch.ones(2, 16, 1, dtype=torch.bool),
    "shape (B+1, N)": torch.ones(3, 16, dtype=torch.bool),
    "float": torch.ones(2, 16),
    "complex": torch.ones(2, 16, dtype=torch.complex64),
    "list": [[True] * 16] * 2,
    "numpy": np.ones((2, 16), dtype=bool),
}


@pytest.mark.parametrize(("name", "stage"), CASES)
def test_bad_masks_are_refused_and_odd_masks_give_a_checked_result(name, stage):
    reducer = REGISTRY.reducer_class(name)(4, stage=stage)
    tokens = good_tokens()
    ctx = context_for(tokens, stage)
    for label, mask in BAD_MASKS.items():
        must_refuse(lambda: reducer(tokens, mask=mask, context=ctx), ("mask",), f"{label} mask")
    one_row_empty = torch.ones(2, 16, dtype=torch.bool)
    one_row_empty[0] = False
    sparse = torch.zeros(2, 16, dtype=torch.bool)
    sparse[:, 0] = True
    sparse[1, 9] = True
    odd = {
        "all-false row": one_row_empty,
        "all false": torch.zeros(2, 16, dtype=torch.bool),
        "one or two valid": sparse,
        "int 0/1": one_row_empty.long(),
        "int 0/2": one_row_empty.int() * 2,
        "suffix padding": torch.arange(16)[None].expand(2, 16) < torch.tensor([[16], [9]]),
    }
    for label, mask in odd.items():
        valid = mask != 0
        for budget in (4, 0.5):
            try:
                result_or_clear_error(reducer, tokens, valid, budget, ("budget", "basis_tokens", "mask", "grid"), mask=mask)
            except AssertionError as err:
                raise AssertionError(f"{label}, budget {budget}: {err}") from None


# -- parameters ---------------------------------------------------------------------------------

WRONG_VALUES = ["not-a-value", {}, [1, 2], True, math.nan, math.inf, -1, -(10**9), 10**12, None]


@pytest.mark.parametrize(("name", "stage"), CASES)
def test_bad_params_are_refused_naming_the_field(name, stage):
    cls = REGISTRY.reducer_class(name)
    tokens = good_tokens()
    valid = torch.ones(tokens.shape[:2], dtype=torch.bool)
    fields = cls.Params.model_fields
    must_refuse(lambda: cls(4, stage=stage, bogus_param=1), ("bogus_param",), "an unknown parameter")
    for field, info in fields.items():
        # A misspelling (a letter short) is refused with the right name suggested.
        typo = field[:-1]
        if len(field) > 3 and typo not in fields:
            err = outcome(lambda: cls(4, stage=stage, **{typo: 1}), (typo,))
            assert isinstance(err, ConfigError), f"{name}: misspelt {typo!r} was accepted"
            assert repr(field) in str(err).partition("Did you mean")[2], f"{typo!r} does not suggest {field!r}: {err}"
        for value in WRONG_VALUES:
            got = outcome(lambda: cls(4, stage=stage, **{field: value}), (field,))
            if isinstance(got, TokenReduceError):
                continue
            if isinstance(value, bool):
                # Only a boolean field may take True: elsewhere pydantic would read it as 1.
                assert "bool" in str(info.annotation), f"{name}.{field}=True accepted for {info.annotation}"
            # Accepted (in range for this field): the reducer still gives a checked result or
            # a clear error naming something it was given.
            result_or_clear_error(got, tokens, valid, 4, (field, "budget", "basis_tokens", "context", "grid"))


# -- a random mix, drawn by hypothesis -----------------------------------------------------------


@st.composite
def mixed_inputs(draw):
    """Tokens, a mask and a budget, each valid, odd or bad, with what a refusal must name."""
    b = draw(st.integers(1, 3), label="B")
    n = draw(st.integers(0, 20), label="N")
    d = draw(st.integers(1, 6), label="D")
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]), label="dtype")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="seed"))
    tokens = torch.randn(b, n, d, generator=gen).to(dtype)
    names: set[str] = set()
    if n and draw(st.booleans(), label="poison a token"):
        tokens[draw(st.integers(0, b - 1)), draw(st.integers(0, n - 1)), 0] = draw(st.sampled_from([math.nan, math.inf]))
        names.add("tokens")
    mask = None
    kind = draw(st.sampled_from(["none", "random", "empty rows", "wrong shape", "float"]), label="mask")
    if kind == "random":
        mask = torch.rand(b, n, generator=gen) < 0.6
    elif kind == "empty rows":
        mask = torch.rand(b, n, generator=gen) < 0.6
        mask[0] = False
    elif kind == "wrong shape":
        mask = torch.ones(b, n + 1, dtype=torch.bool)
        names.add("mask")
    elif kind == "float":
        mask = torch.ones(b, n)
        names.add("mask")
    budget = draw(
        st.one_of(
            st.integers(-3, 30),
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from([True, "8", 0.5, 1.0]),
        ),
        label="budget",
    )
    try:
        check_budget(budget)
    except TokenReduceError:
        names.add("budget")
    return tokens, mask, budget, names


@pytest.mark.parametrize(("name", "stage"), CASES)
@SETTINGS
@given(case=mixed_inputs())
def test_mixed_inputs_never_give_a_traceback_or_a_wrong_result(name, stage, case):
    tokens, mask, budget, bad = case
    reducer = REGISTRY.reducer_class(name)(stage=stage)
    names = tuple(bad) if bad else ("budget", "basis_tokens", "grid", "mask")
    got = outcome(lambda: reducer(tokens, budget, mask=mask, context=context_for(tokens, stage)), names)
    if bad:
        assert isinstance(got, TokenReduceError), f"bad {sorted(bad)} accepted"
    elif not isinstance(got, TokenReduceError):
        valid = torch.ones(tokens.shape[:2], dtype=torch.bool) if mask is None else mask
        check_reduction(got, tokens, valid, budget, rounding=getattr(reducer, "ratio_rounding", "half_up"))


# -- YAML files ---------------------------------------------------------------------------------

# (file text, a regex the error must match). Every regex names the line and column and the
# field path, as `file:line:col: field.path: message`.
STEP = "  - {stage: projector, reducer: random, budget: 64}\n"
BAD_YAML = {
    "budget true": ("pipeline:\n  - {stage: projector, reducer: random, budget: true}\n", r"p\.yaml:2:49: pipeline\.0\.budget: budget=True is not a budget"),
    "budget yes": ("pipeline:\n  - stage: projector\n    reducer: random\n    budget: yes\n", r"p\.yaml:4:13: pipeline\.0\.budget: budget=True"),
    "budget quoted": ("pipeline:\n  - {stage: projector, reducer: random, budget: '64'}\n", r"p\.yaml:2:49: pipeline\.0\.budget: budget='64' has type str"),
    "budget 64.5": ("pipeline:\n  - {stage: projector, reducer: random, budget: 64.5}\n", r"p\.yaml:2:49: pipeline\.0\.budget: .*must be an int"),
    "budget 0": ("pipeline:\n  - {stage: projector, reducer: random, budget: 0}\n", r"p\.yaml:2:49: pipeline\.0\.budget: .*budget must be a positive int \(tokens to keep\) or a ratio in \(0, 1\]"),
    "budget 0.0": ("pipeline:\n  - {stage: projector, reducer: random, budget: 0.0}\n", r"pipeline\.0\.budget: .*budget must be a positive int"),
    "budget negative": ("pipeline:\n  - {stage: projector, reducer: random, budget: -3}\n", r"p\.yaml:2:49: pipeline\.0\.budget: budget=-3"),
    "budget nan": ("pipeline:\n  - {stage: projector, reducer: random, budget: .nan}\n", r"p\.yaml:2:49: pipeline\.0\.budget: budget=nan"),
    "budget null": ("pipeline:\n  - {stage: projector, reducer: random, budget: null}\n", r"p\.yaml:2:49: pipeline\.0\.budget: budget=None"),
    "budget list": ("pipeline:\n  - {stage: projector, reducer: random, budget: [64]}\n", r"p\.yaml:2:49: pipeline\.0\.budget: .*has type list"),
    "budget missing": ("pipeline:\n  - {stage: projector, reducer: random}\n", r"p\.yaml:2:5: pipeline\.0\.budget: Field required"),
    "layer true": ("pipeline:\n  - {stage: llm_layer, layer: true, reducer: random, budget: 4}\n", r"p\.yaml:2:31: pipeline\.0\.layer: Input should be a valid integer \(got True\)"),
    "layer negative": ("pipeline:\n  - {stage: llm_layer, layer: -1, reducer: random, budget: 4}\n", r"p\.yaml:2:31: pipeline\.0\.layer: Input should be greater than or equal to 0"),
    "layer float": ("pipeline:\n  - {stage: llm_layer, layer: 2.0, reducer: random, budget: 4}\n", r"p\.yaml:2:31: pipeline\.0\.layer: Input should be a valid integer"),
    "layer quoted": ("pipeline:\n  - {stage: llm_layer, layer: '2', reducer: random, budget: 4}\n", r"p\.yaml:2:31: pipeline\.0\.layer: Input should be a valid integer"),
    "layer missing": ("pipeline:\n  - {stage: llm_layer, reducer: random, budget: 4}\n", r"p\.yaml:2:5: pipeline\.0\.layer: an llm_layer step needs layer >= 0"),
    "layer off the decoder": ("pipeline:\n  - {stage: projector, layer: 3, reducer: random, budget: 4}\n", r"p\.yaml:2:31: pipeline\.0\.layer: layer=3 is only allowed at stage llm_layer"),
    "previous-layer attention at 0": ("pipeline:\n  - {stage: llm_layer, layer: 0, reducer: fastv, budget: 4}\n", r"p\.yaml:2:31: pipeline\.0\.layer: reducer 'fastv' reads the attention of the previous layer, so its layer must be >= 1"),
    "duplicate step key": ("pipeline:\n  - stage: projector\n    reducer: random\n    budget: 64\n    budget: 32\n", r"p\.yaml:5:5: pipeline\.0\.budget: duplicate key 'budget' \(first given on line 4\)"),
    "duplicate top key": ("pipeline:\n" + STEP + "pipeline:\n" + STEP, r"p\.yaml:3:1: pipeline: duplicate key 'pipeline'"),
    "duplicate param": ("pipeline:\n  - {stage: projector, reducer: random, budget: 4, params: {seed: 1, seed: 2}}\n", r"p\.yaml:2:70: pipeline\.0\.params\.seed: duplicate key 'seed' \(first given on line 2\)"),
    "unknown stage": ("pipeline:\n  - {stage: projecter, reducer: random, budget: 4}\n", r"p\.yaml:2:13: pipeline\.0\.stage: Input should be 'vision_encoder', 'projector' or 'llm_layer'"),
    "unsupported stage": ("pipeline:\n  - {stage: projector, reducer: fastv, budget: 4}\n", r"p\.yaml:2:13: pipeline\.0\.stage: reducer 'fastv' does not support stage 'projector'"),
    "unknown reducer": ("pipeline:\n  - {stage: projector, reducer: nosuch, budget: 4}\n", r"p\.yaml:2:33: pipeline\.0\.reducer: unknown reducer 'nosuch'"),
    "upper-case reducer": ("pipeline:\n  - {stage: projector, reducer: TOME, budget: 4}\n", r"p\.yaml:2:33: pipeline\.0\.reducer: unknown reducer 'TOME'\. Did you mean 'tome'\?"),
    "reducer not a string": ("pipeline:\n  - {stage: projector, reducer: 5, budget: 4}\n", r"p\.yaml:2:33: pipeline\.0\.reducer: Input should be a valid string"),
    "misspelt step key": ("pipeline:\n  - {stage: projector, reducer: random, bugdet: 4}\n", r"p\.yaml:2:41: pipeline\.0\.bugdet: Extra inputs are not permitted \(got 4\)\. Did you mean 'budget'\?"),
    "misspelt top key": ("pipeline:\n" + STEP + "positon: original\n", r"p\.yaml:3:1: positon: Extra inputs are not permitted .*Did you mean 'positions'\?"),
    "misspelt param": ("pipeline:\n  - {stage: projector, reducer: apet, budget: 64, params: {basis_token: 3}}\n", r"(?s)p\.yaml:2:60: pipeline\.0\.params\.basis_token: .*Did you mean 'basis_tokens'\?"),
    "boolean param": ("pipeline:\n  - {stage: projector, reducer: apet, budget: 64, params: {basis_tokens: yes}}\n", r"(?s)p\.yaml:2:60: pipeline\.0\.params\.basis_tokens: .*basis_tokens: a boolean is not allowed here"),
    "param out of range": ("pipeline:\n  - {stage: projector, reducer: random, budget: 4, params: {seed: -1}}\n", r"(?s)p\.yaml:2:61: pipeline\.0\.params\.seed: .*greater than or equal to 0"),
    "params not a mapping": ("pipeline:\n  - {stage: projector, reducer: random, budget: 4, params: 3}\n", r"p\.yaml:2:60: pipeline\.0\.params: Input should be a valid dictionary"),
    "params null": ("pipeline:\n  - {stage: projector, reducer: random, budget: 4, params: null}\n", r"p\.yaml:2:60: pipeline\.0\.params: Input should be a valid dictionary"),
    "top level a list": ("- {stage: projector, reducer: random, budget: 4}\n", r"p\.yaml:1:1: \(root\): the top level must be a mapping .* got a list"),
    "top level a scalar": ("pipeline\n", r"p\.yaml:1:1: \(root\): the top level must be a mapping .* got a str"),
    "empty file": ("", r"p\.yaml: \(root\): the top level must be a mapping .* got an empty file"),
    "comments only": ("# nothing here\n", r"p\.yaml: \(root\): the top level must be a mapping"),
    "no pipeline key": ("positions: compact\n", r"p\.yaml:1:1: pipeline: Field required"),
    "empty pipeline": ("pipeline: []\n", r"p\.yaml:1:11: pipeline: List should have at least 1 item"),
    "pipeline a mapping": ("pipeline: {stage: projector}\n", r"p\.yaml:1:11: pipeline: Input should be a valid list"),
    "step a scalar": ("pipeline:\n  - random\n", r"p\.yaml:2:5: pipeline\.0: Input should be a valid dictionary"),
    "tabs": ("pipeline:\n\t- {stage: projector, reducer: random, budget: 4}\n", r"p\.yaml:2:1: not valid YAML: .*tabs"),
    "unclosed flow": ("pipeline:\n  - {stage: projector, reducer: random\n", r"p\.yaml:3:1: not valid YAML"),
    "python tag": ("pipeline: !!python/object/apply:os.getcwd []\n", r"p\.yaml:1:11: not valid YAML: .*python/object/apply"),
    "two projector steps": ("pipeline:\n" + STEP + STEP, r"p\.yaml:2:3: pipeline: stage 'projector' appears twice"),
    "decreasing layers": (
        "pipeline:\n  - {stage: llm_layer, layer: 8, reducer: random, budget: 9}\n  - {stage: llm_layer, layer: 4, reducer: random, budget: 9}\n",
        r"p\.yaml:2:3: pipeline: llm_layer steps must have increasing layers",
    ),
    "bad positions": ("pipeline:\n" + STEP + "positions: shifted\n", r"p\.yaml:3:12: positions: Input should be 'compact' or 'original'"),
    "bad video_budget": ("pipeline:\n" + STEP + "video_budget: 3\n", r"p\.yaml:3:15: video_budget: Input should be 'per_frame' or 'per_video'"),
}
BAD_BYTES = {
    "latin-1": ("pipeline:\n  # caf\xe9\n".encode("latin-1") + STEP.encode(), r"p\.yaml:2:8: the file is not UTF-8 text \(byte e9\)"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00", r"p\.yaml:1:1: the file is not UTF-8 text"),
}
# Valid, if unusual: each loads and validates.
ODD_YAML = {
    "merge key override": (
        "pipeline:\n  - &s {stage: projector, reducer: random, budget: 64}\n  - {<<: *s, stage: vision_encoder, budget: 32}\n"
    ),
    "CRLF line ends": "pipeline:\r\n  - {stage: projector, reducer: random, budget: 64}\r\n",
    "UTF-8 byte-order mark": "\ufeffpipeline:\n" + STEP,
    "budget above any N": "pipeline:\n  - {stage: projector, reducer: random, budget: 1000000000000}\n",
    "ratio 1.0": "pipeline:\n  - {stage: projector, reducer: random, budget: 1.0}\n",
    "block style": "pipeline:\n  - stage: vision_encoder\n    reducer: pool\n    budget: 144\n  - stage: llm_layer\n    layer: 2\n    reducer: fastv\n    budget: 0.5\n",
}


@pytest.mark.parametrize("label", sorted(BAD_YAML) + sorted(BAD_BYTES))
def test_bad_yaml_names_line_and_field_in_load_validate_and_cli(tmp_path, label):
    path = tmp_path / "p.yaml"
    if label in BAD_YAML:
        text, expected = BAD_YAML[label]
        path.write_text(text)
    else:
        raw, expected = BAD_BYTES[label]
        path.write_bytes(raw)
    for load in (tr.load_config, validate_config):
        with pytest.raises(ConfigError, match=expected):
            load(path)
    res = CliRunner().invoke(app, ["validate", str(path)], env={"COLUMNS": "400"})
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), f"traceback from the CLI: {res.exception!r}"
    assert "p.yaml" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("label", sorted(ODD_YAML))
def test_odd_but_valid_yaml_loads_and_validates(tmp_path, label):
    path = tmp_path / "p.yaml"
    path.write_bytes(ODD_YAML[label].encode("utf-8"))
    pipe = validate_config(path)
    assert len(pipe) >= 1
    if label == "merge key override":
        # The merged step takes the anchor's reducer and its own stage and budget.
        second = pipe.steps[1]
        assert (second.stage, second.reducer.name, second.reducer.budget) == (Stage.VISION_ENCODER, "random", 32)


def test_validate_runs_the_reducers_own_rules_as_run_does(tmp_path):
    """ApET with budget 5 under basis_tokens 10 loads (the file is well formed) but cannot
    run: validate says so, at the step's line, naming the parameter."""
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""\
        pipeline:
          - {stage: vision_encoder, reducer: pool, budget: 144}
          - {stage: projector, reducer: apet, budget: 5, params: {basis_tokens: 10}}
        """))
    assert len(tr.load_config(path)) == 2
    with pytest.raises(ConfigError, match=r"p\.yaml:3:5: pipeline\.1: step 1 \(apet at projector\) .*basis_tokens=10"):
        validate_config(path)
    with pytest.raises(TokenReduceError, match="basis_tokens=10"):
        run_default(tr.load_config(path), synthetic=True)


def test_a_layer_beyond_the_model_is_refused_by_run_naming_the_layer(tmp_path):
    """The layer count needs the model: validate accepts layer 1000, run refuses it clearly."""
    path = tmp_path / "p.yaml"
    path.write_text("pipeline:\n  - {stage: llm_layer, layer: 1000, reducer: random, budget: 8}\n")
    validate_config(path)
    res = CliRunner().invoke(app, ["run", str(path)], env={"COLUMNS": "400"})
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "layer=1000 is out of range" in res.output
