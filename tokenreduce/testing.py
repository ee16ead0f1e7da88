"""Conformance kit: the properties every reducer must satisfy, as hypothesis tests.

Third-party authors run it on their own reducer::

    from tokenreduce.testing import check_reducer

    def test_my_reducer_conforms():
        check_reducer(MyReducer)

Checked for random batches, lengths, widths, dtypes, padding masks and budgets:

* output shape ``(B, T, D)``, ``T`` the largest per-row count; dtype and device preserved;
* exactly ``min(budget, valid N)`` tokens kept per row;
* indices unique, ascending, in range, never a padded token; ``-1`` at padded slots;
* ``keep_mask`` consistent with the indices; ``valid`` marks the real slots;
* ``sizes`` (if given) >= 1 at real slots and 0 at padded ones; features finite;
* :class:`~tokenreduce.ScoringReducer` s: ``score()`` is ``(B, N)`` and finite at every valid token;
* finite float16 / bfloat16 input of large magnitude (up to 0.99 of the dtype's largest
  value, so that sums of a few tokens overflow the input dtype) gives finite output;
* deterministic (same call, same result);
* batch rows independent (reducing a batch = reducing each row alone);
* identity at budget >= N (every valid token kept, features unchanged).

On success it prints one line: what was checked, on how many examples at each stage.

Model adapters have their own kit, :func:`check_adapter` (in :mod:`tokenreduce.adapter_testing`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .adapter_testing import AdapterReport, PositionProbe, check_adapter
from .budget import resolve_budget
from .context import ReductionContext
from .reducer import Reducer, ScoringReducer
from .reduction import Reduction
from .stages import Stage

__all__ = [
    "AdapterReport",
    "PositionProbe",
    "check_adapter",
    "check_reducer",
    "check_reduction",
    "check_scores",
    "large_magnitude",
]

ContextFactory = Callable[[torch.Tensor, torch.Tensor, Stage], ReductionContext]

# Low precision inputs are reduced in float32 internally but rounded on output, and
# batched and unbatched kernels may differ in the last bits.
_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-9}

#: What one example checks, for the summary printed on success.
CHECKED = (
    "shapes/dtype/device, kept count = min(budget, valid N), indices unique ascending in range and never padding, "
    "keep_mask/valid/sizes consistent, finite features, finite scores, finite output for large-magnitude "
    "float16/bfloat16 input, determinism, row independence, identity at budget >= N"
)


def _case(draw: st.DrawFn, *, square: bool, min_budget: int, max_n: int, devices: tuple[str, ...]) -> dict[str, Any]:
    b = draw(st.integers(1, 3), label="B")
    if square:
        side = draw(st.integers(1, max(1, int(max_n**0.5))), label="side")
        n = side * side
    else:
        n = draw(st.integers(1, max_n), label="N")
    d = draw(st.integers(1, 12), label="D")
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="dtype")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    device = draw(st.sampled_from(devices), label="device")
    gen = torch.Generator().manual_seed(seed)
    # Mixed scales and exact duplicates make ties and degenerate geometry likely.
    tokens = torch.randn(b, n, d, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 50.0]), label="scale")
    if n > 1 and draw(st.booleans(), label="duplicates"):
        tokens[:, n // 2] = tokens[:, 0]
    if square:
        # A square grid needs every valid count to be a square: pad a suffix of whole rows.
        sides = [draw(st.integers(1, side), label="valid side") for _ in range(b)]
        counts = torch.tensor([s * s for s in sides])
        valid = torch.arange(n)[None] < counts[:, None]
    else:
        valid = torch.rand(b, n, generator=gen) < draw(st.sampled_from([1.0, 0.7]), label="keep prob")
        valid[:, 0] = True  # every row has at least one valid token
    if min_budget > 1 or draw(st.booleans(), label="int budget"):
        budget: int | float = draw(st.integers(min_budget, max(min_budget, n + 2)), label="budget")
    else:
        budget = draw(st.floats(0.05, 1.0), label="ratio")
    return {"tokens": tokens.to(device=device, dtype=dtype), "valid": valid.to(device), "budget": budget}


def _context(factory: ContextFactory | None, tokens: torch.Tensor, valid: torch.Tensor, stage: Stage) -> ReductionContext:
    ctx = factory(tokens, valid, stage) if factory else ReductionContext()
    ctx.stage = stage
    return ctx


def _call(reducer: Reducer, tokens, valid, budget, factory: ContextFactory | None, stage: Stage) -> Reduction:
    return reducer(tokens, budget, mask=valid, context=_context(factory, tokens, valid, stage))


def check_scores(
    reducer: Reducer, tokens: torch.Tensor, valid: torch.Tensor, context: ReductionContext, what: str = ""
) -> None:
    """For a :class:`ScoringReducer`: ``score()`` is ``(B, N)`` and finite at every valid token.

    NaN scores would be ranked silently (NaN sorts above every number in a descending
    sort), so a NaN from a broken context or formula would decide what is kept.
    """
    if not isinstance(reducer, ScoringReducer):
        return
    scores = reducer.score(tokens, valid, context)
    assert isinstance(scores, torch.Tensor), f"score() must return a tensor, got {type(scores).__name__}"
    assert tuple(scores.shape) == tuple(valid.shape), (
        f"score() must return (B, N)={tuple(valid.shape)}, got {tuple(scores.shape)}"
    )
    bad = (~torch.isfinite(scores.float()) & valid.to(scores.device)).cpu()
    if bool(bad.any()):
        row, tok = (int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"score() returned a non-finite score for a valid token{what} ({int(bad.sum())} in all; first at "
            f"row {row}, token {tok}: {float(scores[row, tok])}); scores must be finite"
        )


def large_magnitude(tokens: torch.Tensor, dtype: torch.dtype, fraction: float, positive: bool) -> torch.Tensor:
    """``tokens`` rescaled so that the largest magnitude is ``fraction`` of ``dtype``'s largest value.

    With ``positive`` every entry is made non-negative, so that sums of a few of the
    largest entries overflow ``dtype`` (float16: 65504; bfloat16: about 3.39e38, which
    overflows float32 too).
    """
    x = tokens.float().abs() if positive else tokens.float()
    peak = x.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    big = fraction * torch.finfo(dtype).max
    return (x / peak * big).clamp(-big, big).to(dtype)


def check_reduction(
    out: Reduction, tokens: torch.Tensor, valid: torch.Tensor, budget: Any, *, rounding: str = "half_up"
) -> None:
    """Assert the structural properties of one reduction (raises ``AssertionError``).

    ``rounding`` is the reducer's ``ratio_rounding`` (how a ratio budget becomes a count).
    """
    b, n, d = tokens.shape
    n_valid = valid.sum(dim=1).tolist()
    expected = [min(resolve_budget(budget, nv, rounding=rounding), nv) for nv in n_valid]
    t = max(expected)
    assert out.tokens.shape == (b, t, d), f"tokens shape {tuple(out.tokens.shape)} != {(b, t, d)}"
    assert out.tokens.dtype == tokens.dtype, f"dtype {out.tokens.dtype} != input {tokens.dtype}"
    assert out.tokens.device == tokens.device, "device changed"
    assert out.indices.shape == (b, t) and out.indices.dtype == torch.long, "indices must be (B, T) int64"
    assert out.valid.shape == (b, t) and out.valid.dtype == torch.bool, "valid must be (B, T) bool"
    assert out.keep_mask.shape == (b, n) and out.keep_mask.dtype == torch.bool, "keep_mask must be (B, N) bool"
    assert out.counts.tolist() == expected, f"kept {out.counts.tolist()} tokens, expected min(budget, N)={expected}"
    idx = out.indices.cpu()
    slots = out.valid.cpu()
    vmask = valid.cpu()
    for row in range(b):  # assertions only; the reducers themselves are vectorised
        real = idx[row][slots[row]]
        assert bool((idx[row][~slots[row]] == -1).all()), f"row {row}: padded slots must hold -1"
        assert bool(((real >= 0) & (real < n)).all()), f"row {row}: index out of range: {real.tolist()}"
        assert bool((real[1:] > real[:-1]).all()), f"row {row}: indices not strictly ascending: {real.tolist()}"
        assert bool(vmask[row][real].all()), f"row {row}: a padded token was kept"
        mask = torch.zeros(n, dtype=torch.bool)
        mask[real] = True
        assert torch.equal(mask, out.keep_mask[row].cpu()), f"row {row}: keep_mask disagrees with indices"
    first = torch.arange(t)[None] < torch.tensor(expected)[:, None]
    assert torch.equal(slots, first), "the real slots of each row must come first"
    assert bool(torch.isfinite(out.tokens.float()).all()), "non-finite output features"
    assert bool((out.tokens[~out.valid] == 0).all()), "padded output slots must be zero"
    if out.sizes is not None:
        sizes = out.sizes.cpu()
        assert sizes.shape == (b, t), "sizes must be (B, T)"
        assert bool((sizes[slots] >= 1 - 1e-6).all()), "a kept token must stand for at least itself"
        assert bool((sizes[~slots] == 0).all()), "padded slots must have size 0"
        assert bool((sizes.sum(dim=1) <= torch.tensor(n_valid, dtype=sizes.dtype) + 1e-3).all()), (
            "sizes sum to more than the valid tokens"
        )


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = _TOL.get(a.dtype, 1e-5)
    scale = max(1.0, float(b.float().abs().max()) if b.numel() else 1.0)
    return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * scale)


def check_reducer(
    cls: type[Reducer] | Callable[..., Reducer],
    *,
    stage: Stage | str | None = None,
    params: dict[str, Any] | None = None,
    context_factory: ContextFactory | None = None,
    max_examples: int = 30,
    min_budget: int = 1,
    max_n: int = 40,
    square_grid: bool = False,
    devices: tuple[str, ...] | None = None,
) -> None:
    """Run the conformance properties on a reducer class (at every stage it supports, or ``stage``).

    Args:
        cls: the reducer class (or a factory ``(budget, stage=..., **params) -> Reducer``).
        stage: restrict to one stage; default: every stage of ``cls.stages``.
        params: reducer parameters.
        context_factory: builds the context a reducer requires from ``(tokens, valid, stage)``.
        max_examples: hypothesis examples per stage.
        min_budget: smallest budget to draw (for methods with a floor, e.g. ApET's k < T).
        max_n: largest token count drawn.
        square_grid: draw square token grids whose valid counts are squares (grid reducers).
        devices: devices to test on; default CPU, plus CUDA when available.
    """
    params = params or {}
    stages = [Stage(stage)] if stage is not None else sorted(getattr(cls, "stages", Stage), key=lambda s: s.value)
    devices = devices or (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))

    name = getattr(cls, "name", "") or getattr(cls, "__name__", repr(cls))
    ran = {
        st_.value: _check_stage(cls, st_, params, context_factory, max_examples, min_budget, max_n, square_grid, devices)
        for st_ in stages
    }
    counts = ", ".join(f"{n} at {stage}" for stage, n in ran.items())
    print(
        f"check_reducer({name!r}{f', params={params!r}' if params else ''}): passed {sum(ran.values())} examples "
        f"({counts}) on {', '.join(devices)}, float32/float16/bfloat16 with padding and int and ratio budgets; "
        f"checked: {CHECKED}"
    )


def _check_stage(cls, st_, params, context_factory, max_examples, min_budget, max_n, square_grid, devices) -> int:
    ran = 0

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        report_multiple_bugs=False,  # one clear failure, not an ExceptionGroup
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def run(data: st.DataObject) -> None:
        nonlocal ran
        case = data.draw(
            st.composite(lambda draw: _case(draw, square=square_grid, min_budget=min_budget, max_n=max_n, devices=devices))()
        )
        tokens, valid, budget = case["tokens"], case["valid"], case["budget"]
        reducer = cls(budget, stage=st_, **params)
        check_scores(reducer, tokens, valid, _context(context_factory, tokens, valid, st_))
        rounding = getattr(reducer, "ratio_rounding", "half_up")
        out = _call(reducer, tokens, valid, budget, context_factory, st_)
        check_reduction(out, tokens, valid, budget, rounding=rounding)

        again = _call(cls(budget, stage=st_, **params), tokens, valid, budget, context_factory, st_)
        assert torch.equal(out.indices, again.indices), "not deterministic: indices differ between two calls"
        assert torch.equal(out.tokens, again.tokens), "not deterministic: features differ between two calls"

        for row in range(tokens.shape[0]):
            one = _call(reducer, tokens[row : row + 1], valid[row : row + 1], budget, _row_factory(context_factory, tokens, valid, row), st_)
            k = int(one.counts[0])
            assert torch.equal(one.indices[0, :k], out.indices[row, :k]), (
                f"row {row}: reducing the row alone keeps {one.indices[0, :k].tolist()}, "
                f"in the batch {out.indices[row, :k].tolist()}: rows are not independent"
            )
            assert _close(one.tokens[0, :k], out.tokens[row, :k]), f"row {row}: features differ alone vs in batch"

        n_max = int(valid.sum(dim=1).max())
        ident = _call(reducer, tokens, valid, n_max, context_factory, st_)
        check_reduction(ident, tokens, valid, n_max, rounding=rounding)
        for row in range(tokens.shape[0]):
            assert torch.equal(ident.tokens[row][ident.valid[row]], tokens[row][valid[row]]), (
                f"row {row}: budget >= N must keep every valid token unchanged"
            )

        # Large magnitude: the same tokens scaled towards the top of a low-precision range.
        # The context is made from the tokens at their usual scale: attention and keys come
        # from the model, not from the features' magnitude.
        low = tokens.dtype if tokens.dtype in (torch.float16, torch.bfloat16) else data.draw(
            st.sampled_from([torch.float16, torch.bfloat16]), label="large dtype"
        )
        fraction = data.draw(st.sampled_from([0.5, 0.99]), label="fraction of the dtype's range")
        positive = data.draw(st.booleans(), label="all positive")
        big = large_magnitude(tokens, low, fraction, positive)
        ctx = _context(context_factory, tokens.to(low), valid, st_)
        peak = float(big.float().abs().max())
        check_scores(reducer, big, valid, ctx, f" of {low} input of magnitude up to {peak:.4g}")
        large = reducer(big, budget, mask=valid, context=ctx)
        assert bool(torch.isfinite(large.tokens.float()).all()), (
            f"non-finite output for finite {low} input of magnitude up to {peak:.4g} "
            f"({fraction} of the dtype's range): compute in float32 (or rescale) and keep results in range"
        )
        check_reduction(large, big, valid, budget, rounding=rounding)
        ran += 1

    run()
    return ran


def _row_factory(factory: ContextFactory | None, tokens: torch.Tensor, valid: torch.Tensor, row: int) -> ContextFactory | None:
    """Context for one row: the batch context sliced, so context and tokens stay paired."""
    if factory is None:
        return None
    full = factory(tokens, valid, Stage.PROJECTOR)

    def one(t: torch.Tensor, v: torch.Tensor, stage: Stage) -> ReductionContext:
        ctx = full.select_rows(slice(row, row + 1))
        ctx.stage = stage
        return ctx

    return one
