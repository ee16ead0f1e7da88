"""The properties :func:`tokenreduce.adapter_testing.check_adapter` checks, one function each.

Each takes an :class:`AdapterEnv` (the model, the caller's inputs and the options) and
raises ``AssertionError`` naming what failed. They compare the patched model with the
same model unpatched, using :class:`PositionProbe`, a reducer that keeps tokens by
position only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .adapter import apply, patch
from .model_state import differences, snapshot
from .pipeline import Pipeline, Step
from .reducer import ScoringReducer
from .stages import Stage

#: A budget no unit reaches: the identity.
EVERYTHING = 10**9
ORDER = (Stage.VISION_ENCODER, Stage.PROJECTOR, Stage.LLM_LAYER)
_NO_CACHE_NOTE = (
    "the prefill must be reduced the same way with and without a cache, and a cached decoding step must "
    "see the positions and mask of the reduced sequence"
)


class PositionProbe(ScoringReducer):
    """The kit's reducer: keeps tokens by position only, spread over the unit.

    Scores are a fixed function of the index (fractional parts of multiples of the golden
    ratio), so the kept set depends only on how many tokens a unit has: the same in a
    batch and alone, with and without a cache, whatever the features.
    """

    name = "adapter-kit-probe"
    stages = frozenset(Stage)

    def score(self, tokens, valid, context):
        idx = torch.arange(tokens.shape[1], device=tokens.device, dtype=torch.float64)
        return torch.frac(idx * 0.6180339887498949).float().expand(tokens.shape[0], -1)


@dataclass
class AdapterEnv:
    model: torch.nn.Module
    make_inputs: Callable[[list[int]], dict[str, Any]]
    placeholders: tuple[int, ...]
    rows: int
    stages: tuple[Stage, ...]
    layer: int
    new_tokens: int
    positions: str | None
    video_budget: str
    atol: float
    rtol: float

    def inputs(self, rows: list[int] | None = None) -> dict[str, Any]:
        kw = self.make_inputs(list(range(self.rows)) if rows is None else rows)
        p = next(self.model.parameters())
        return {k: _move(v, p.device, p.dtype) for k, v in kw.items()}

    def pipeline(self, steps: Mapping[Stage, Any], **options: Any) -> Pipeline:
        return Pipeline(
            [Step(st, PositionProbe(b), layer=self.layer if st is Stage.LLM_LAYER else None) for st, b in steps.items()],
            positions=options.get("positions", self.positions),
            video_budget=self.video_budget,
        )

    def step(self, reducer: Any, stage: Stage) -> Pipeline:
        layer = self.layer if stage is Stage.LLM_LAYER else None
        return Pipeline([Step(stage, reducer, layer=layer)], positions=self.positions, video_budget=self.video_budget)


def _move(v: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if not isinstance(v, torch.Tensor):
        return v
    return v.to(device, dtype) if v.is_floating_point() else v.to(device)


def logits_of(model: torch.nn.Module, kw: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw).logits


def _generate(env: AdapterEnv, kw: dict[str, Any], **extra: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy new tokens ``(B, new)`` and their raw logits ``(B, new, V)``; never stops early at EOS."""
    n = env.new_tokens
    with torch.no_grad():
        out = env.model.generate(
            **kw, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            output_logits=True, return_dict_in_generate=True, **extra,
        )
    return out.sequences[:, kw["input_ids"].shape[1] :], torch.stack(out.logits, 1)


def _close(env: AdapterEnv, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.allclose(got.float(), want.float(), atol=env.atol, rtol=env.rtol):
        err = float((got.float() - want.float()).abs().max())
        raise AssertionError(f"{what}: differ by up to {err:.3g} (atol={env.atol}, rtol={env.rtol})")


def _describe(pipe: Pipeline) -> str:
    return " + ".join(f"{s.stage.value}{'' if s.layer is None else f'@{s.layer}'}" for s in pipe)


def stage_records(records, stage: Stage):
    return [r for r in records if r.stage is stage]


# -- the checks ------------------------------------------------------------------------------------------


def check_identity(env: AdapterEnv, stock: Stock) -> dict[Stage, list[int]]:
    """Budgets >= tokens everywhere == stock; returns the units' token counts per stage."""
    kw = env.inputs()
    # Under the adapter's default positions: ``compact`` may renumber even an unreduced
    # prompt (Qwen's M-RoPE ids become a plain count), so only the default must be the stock model.
    pipe = env.pipeline({st: EVERYTHING for st in env.stages}, positions=None)
    with apply(env.model, pipe) as handle:
        got = logits_of(env.model, kw)
        records = list(handle.records)
        got_gen, got_gen_logits = _generate(env, kw)
    counts: dict[Stage, list[int]] = {}
    for st in env.stages:
        recs = stage_records(records, st)
        assert recs, f"identity pipeline ({_describe(pipe)}): no record at stage {st.value}; the adapter must record every step"
        for r in recs:
            assert r.tokens_after == r.tokens_before, (
                f"identity pipeline: stage {st.value} kept {r.tokens_after} of {r.tokens_before} tokens at budget {EVERYTHING}"
            )
        counts[st] = [n for r in recs for n in r.tokens_before]
        assert counts[st] and min(counts[st]) > 0, f"stage {st.value}: records hold no tokens ({counts[st]})"
    want = stock.logits
    assert torch.equal(got, want), (
        f"identity pipeline ({_describe(pipe)}): logits are not bit-identical to the stock model "
        f"(max difference {float((got.float() - want.float()).abs().max()) if got.shape == want.shape else got.shape})"
    )
    assert torch.equal(got_gen, stock.tokens), (
        f"identity pipeline: greedy generate() gives {got_gen.tolist()}, the stock model {stock.tokens.tolist()}"
    )
    assert torch.equal(got_gen_logits, stock.token_logits), (
        "identity pipeline: generate()'s logits are not bit-identical to the stock model's"
    )
    return counts


def budgets_for(counts: dict[Stage, list[int]]) -> dict[Stage, int]:
    """Per stage, a budget that reduces every unit (half the smallest unit, at least 1)."""
    return {st: max(1, min(ns) // 2) for st, ns in counts.items()}


def _placeholders(env: AdapterEnv, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for tok in env.placeholders:
        mask |= ids == tok
    return mask


def check_counts(env: AdapterEnv, budgets: dict[Stage, int]) -> None:
    """Each stage alone keeps min(budget, n) per unit, and each row shrinks by what was removed.

    A row alone must lose exactly the tokens its records say were removed, plus at most
    its placeholders that are no unit's content (layout markers, such as LLaVA-NeXT's row
    newlines, which may go with their row). The batch's units are the rows' units.
    """
    kw = env.inputs()
    stock_len = logits_of(env.model, kw).shape[1]
    for st in env.stages:
        pipe = env.pipeline({st: budgets[st]})
        with apply(env.model, pipe) as handle:
            got = logits_of(env.model, kw)
            recs = stage_records(handle.records, st)
            lengths, removed_per_row, units = [], [], []
            for r in range(env.rows):
                one = env.inputs([r])
                length = logits_of(env.model, one).shape[1]
                mine = stage_records(handle.records, st)
                before = sum(n for rec in mine for n in rec.tokens_before)
                removed = before - sum(n for rec in mine for n in rec.tokens_after)
                placeholders = int(_placeholders(env, one["input_ids"]).sum())
                assert before <= placeholders, (
                    f"stage {st.value}, row {r}: records count {before} tokens before the step, but the row has only "
                    f"{placeholders} placeholder tokens"
                )
                markers = placeholders - before
                full = int(one["input_ids"].shape[1])
                assert full - removed - markers <= length <= full - removed, (
                    f"stage {st.value}, row {r} alone: the sequence (logits) has {length} positions; the prompt has "
                    f"{full}, the records say {removed} tokens were removed"
                    + (f" (and {markers} placeholders are no unit's content)" if markers else "")
                    + f", so it must have {full - removed if not markers else f'{full - removed - markers} to {full - removed}'}"
                )
                lengths.append(length)
                removed_per_row.append(removed)
                units += [(b, a) for rec in mine for b, a in zip(rec.tokens_before, rec.tokens_after)]
        assert recs, f"stage {st.value}: no record"
        batch_units = [(b, a) for rec in recs for b, a in zip(rec.tokens_before, rec.tokens_after)]
        # As multisets: an adapter may record a batch by modality (all images, then all videos).
        assert sorted(batch_units) == sorted(units), (
            f"stage {st.value}: the batch's units (tokens before, after) are {batch_units}; the rows' alone {units}"
        )
        for rec in recs:
            want = [min(budgets[st], n) for n in rec.tokens_before]
            assert rec.tokens_after == want, (
                f"stage {st.value}, budget {budgets[st]}: kept {rec.tokens_after} of {rec.tokens_before} tokens "
                f"per unit; expected {want}"
            )
            assert len(rec.indices) == len(rec.tokens_before), (
                f"stage {st.value}: {len(rec.indices)} index tensors for {len(rec.tokens_before)} units"
            )
            for idx, a in zip(rec.indices, rec.tokens_after):
                assert idx.numel() == a, f"stage {st.value}: a unit records {idx.numel()} kept indices but keeps {a}"
        # In the batch, padding may be trimmed to the longest row, or kept (then every row
        # shrinks by at least the fewest tokens removed from a row).
        most = stock_len - min(removed_per_row)
        assert max(lengths) <= got.shape[1] <= most, (
            f"stage {st.value}: the batch's sequence has {got.shape[1]} positions (stock {stock_len}); expected "
            f"between the longest reduced row alone ({max(lengths)}) and the stock length less the fewest tokens "
            f"removed from a row ({most})"
        )


def check_cache(env: AdapterEnv, budgets: dict[Stage, int]) -> None:
    """generate() with the KV cache == generate(use_cache=False), each stage alone and all together."""
    kw = env.inputs()
    pipes = [env.pipeline({st: budgets[st]}) for st in env.stages]
    if len(env.stages) > 1:
        pipes.append(env.pipeline(budgets))
    for pipe in pipes:
        with apply(env.model, pipe):
            toks, lg = _generate(env, kw)
            ref_toks, ref_lg = _generate(env, kw, use_cache=False)
        assert torch.equal(toks, ref_toks), (
            f"pipeline {_describe(pipe)}: generate() with the cache gives {toks.tolist()}, without it "
            f"{ref_toks.tolist()}; {_NO_CACHE_NOTE}"
        )
        _close(env, lg, ref_lg, f"pipeline {_describe(pipe)}: generate() logits with vs without the cache")


def check_batch(env: AdapterEnv, budgets: dict[Stage, int]) -> None:
    """A left-padded batch, reduced at every stage, == each row alone."""
    kw = env.inputs()
    mask = kw.get("attention_mask")
    if mask is not None and env.rows > 1:
        assert bool(mask[:, -1].all()), "make_inputs must pad on the left (the last column of attention_mask is 0)"
    pipe = env.pipeline(budgets)
    with apply(env.model, pipe):
        batch = logits_of(env.model, kw)
        toks, lg = _generate(env, kw)
        for r in range(env.rows):
            one = env.inputs([r])
            alone = logits_of(env.model, one)[0]
            n = alone.shape[0]
            _close(env, batch[r, -n:], alone, f"pipeline {_describe(pipe)}: row {r} in the batch vs alone, prefill logits")
            t1, l1 = _generate(env, one)
            assert torch.equal(t1[0], toks[r]), (
                f"pipeline {_describe(pipe)}: row {r} alone generates {t1[0].tolist()}, in the batch {toks[r].tolist()}"
            )
            _close(env, l1[0], lg[r], f"pipeline {_describe(pipe)}: row {r} in the batch vs alone, generate() logits")


@dataclass
class Stock:
    """The unpatched model's outputs on the batch, and a snapshot of it, taken before any patch."""

    logits: torch.Tensor
    tokens: torch.Tensor
    token_logits: torch.Tensor
    state: Any

    @classmethod
    def of(cls, env: AdapterEnv) -> Stock:
        logits, (tokens, token_logits) = _stock_run(env)
        return cls(logits, tokens, token_logits, snapshot(env.model))


def _stock_run(env: AdapterEnv) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    kw = env.inputs()
    return logits_of(env.model, kw), _generate(env, kw)


def assert_as_stock(env: AdapterEnv, stock: Stock, after: str) -> None:
    """The model equals the unpatched one: state (see :mod:`tokenreduce.model_state`), logits, generation."""
    # The stock calls again first, so that state the stock forward itself keeps (e.g. a cached
    # rope_deltas) is comparable.
    try:
        logits, (tokens, _) = _stock_run(env)
    except Exception as err:  # leftovers of the patch can break the stock call itself: name them
        diff = differences(stock.state, snapshot(env.model))
        lines = [*diff[:20], f"and the stock model's forward / generate() then raised {type(err).__name__}: {err}"]
        raise AssertionError(f"{after} did not restore the model:\n  " + "\n  ".join(lines)) from err
    diff = differences(stock.state, snapshot(env.model))
    assert not diff, f"{after} did not restore the model:\n  " + "\n  ".join(diff[:20])
    assert torch.equal(logits, stock.logits), f"after {after}, logits differ from the stock model's"
    assert torch.equal(tokens, stock.tokens), f"after {after}, generate() differs from the stock model's"


def check_restore(env: AdapterEnv, stock: Stock, budgets: dict[Stage, int]) -> None:
    """patch, run, remove (twice), and after an error inside apply: the model is as never patched."""
    kw = env.inputs()
    pipe = env.pipeline(budgets)
    handle = patch(env.model, pipe)
    try:
        reduced = logits_of(env.model, kw)
        _generate(env, kw)
        _generate(env, kw, use_cache=False)
    finally:
        handle.remove()
    handle.remove()  # idempotent
    assert reduced.shape[1] < stock.logits.shape[1], f"pipeline {_describe(pipe)} did not shorten the sequence"
    assert_as_stock(env, stock, "remove()")
    try:
        with apply(env.model, pipe):
            logits_of(env.model, kw)
            raise _Boom
    except _Boom:
        pass
    assert_as_stock(env, stock, "leaving `with apply(...)` by an exception")


class _Boom(Exception):
    pass
