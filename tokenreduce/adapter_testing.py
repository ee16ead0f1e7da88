"""Conformance kit for model adapters: :func:`check_adapter` (re-exported by :mod:`tokenreduce.testing`).

A third-party adapter author runs it on a tiny seeded model of their family::

    from tokenreduce.testing import check_adapter

    def test_my_adapter_conforms():
        check_adapter(build_tiny_model, make_inputs, placeholder_tokens=[IMAGE_TOKEN_ID])

It checks, against the same model unpatched (outputs and a snapshot taken before any
patch), with :class:`~tokenreduce.adapter_properties.PositionProbe`, a reducer that keeps
tokens by position only (so a row's choice cannot depend on the other rows, on the
features' last bits or on the tokens generated so far):

* **identity**: budgets >= tokens at every stage, under the adapter's default positions:
  logits, and greedy ``generate()``'s tokens and logits, bit-identical to the stock model,
  with a record per stage that removed nothing;
* **restore**: after ``remove()`` (twice), and after an exception inside ``with apply(...)``,
  the module tree, every module's ``__dict__`` (hooks included), the classes and modeling
  modules the model comes from and torch's global hooks are as before
  (:mod:`tokenreduce.model_state`), and logits and generation equal the stock model's bit for
  bit; checked again after all the other checks;
* **counts**: a step at each stage keeps ``min(budget, n)`` tokens per unit
  (``handle.records``); a row alone shrinks by exactly the tokens its records removed (plus
  at most its placeholders that are no unit's content: layout markers such as LLaVA-NeXT's
  row newlines); a batch's units are its rows' units;
* **cache**: under a reduction at each stage, and at all stages together, greedy ``generate()``
  with the KV cache equals ``generate(use_cache=False)`` (tokens exactly, logits within tolerance);
* **batch**: a left-padded batch, reduced at every stage, equals each row run alone (prefill
  logits and generation);
* **reducers**: every registered reducer, at every stage it and the adapter share, either runs
  (exact per-unit counts, finite logits, a shorter sequence) or is refused at patch time with
  :class:`~tokenreduce.errors.MissingContextError`; any other error fails the check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapter import patch
from .adapter_properties import (
    ORDER,
    AdapterEnv,
    PositionProbe,
    Stock,
    assert_as_stock,
    budgets_for,
    check_batch,
    check_cache,
    check_counts,
    check_identity,
    check_restore,
    logits_of,
    stage_records,
)
from .budget import resolve_budget
from .errors import InvalidInputError, MissingContextError
from .registry import get_registry
from .stages import Stage

__all__ = ["AdapterReport", "PositionProbe", "check_adapter"]


@dataclass
class AdapterReport:
    """What :func:`check_adapter` did.

    ``checks`` names the checks passed; ``ran`` lists the ``(reducer, stage)`` steps that ran;
    ``refused`` the ``(reducer, stage, message)`` refused at patch time with
    :class:`MissingContextError`; ``declined`` those whose reducer raised
    :class:`InvalidInputError` on the inputs where the caller allowed it (``input_errors``).
    """

    adapter: str = ""
    checks: list[str] = field(default_factory=list)
    ran: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    declined: list[tuple[str, str, str]] = field(default_factory=list)


def check_reducers(
    env: AdapterEnv,
    report: AdapterReport,
    names: Iterable[str],
    params: Mapping[str, Mapping[str, Any]],
    budget: int | float,
    input_errors: Mapping[str, Iterable[Stage | str]],
) -> None:
    """Every reducer at every stage it shares with the adapter: runs with exact counts, or MissingContextError at patch time."""
    kw = env.inputs()
    stock_len = logits_of(env.model, kw).shape[1]
    registry = get_registry()
    for name in names:
        cls = registry.reducer_class(name)
        may_decline = {Stage(s) for s in input_errors.get(name, ())}
        for st in (s for s in env.stages if s in cls.stages):
            where = f"reducer {name!r} at {st.value}"
            reducer = cls(budget, stage=st, **{**params.get(name, {}), **params.get(f"{name}@{st.value}", {})})
            try:
                handle = patch(env.model, env.step(reducer, st))
            except MissingContextError as err:
                report.refused.append((name, st.value, str(err)))
                continue
            except Exception as err:
                raise AssertionError(
                    f"{where}: patch() raised {type(err).__name__}: {err}; an adapter refuses a step it cannot "
                    "run with MissingContextError (and only for context it cannot provide)"
                ) from err
            decode = reducer.acts_at == "decode"
            try:
                if decode:  # it acts on decoding steps: generate, and look at the scores of each step
                    with torch.no_grad():
                        gen = env.model.generate(
                            **kw, max_new_tokens=env.new_tokens, do_sample=False, output_scores=True,
                            return_dict_in_generate=True,
                        )
                    recs = stage_records(handle.records, st)
                    out = torch.stack(gen.scores, dim=1)
                else:
                    out = logits_of(env.model, kw)
                    recs = stage_records(handle.records, st)
            except InvalidInputError as err:
                if st not in may_decline:
                    raise AssertionError(
                        f"{where}: accepted at patch time but the forward raised InvalidInputError: {err}; if the "
                        "adapter cannot give the reducer what it needs, refuse it in validate() with "
                        "MissingContextError; if these inputs are outside the method's domain, say so with "
                        f"input_errors={{{name!r}: [{st.value!r}]}}"
                    ) from err
                report.declined.append((name, st.value, str(err)))
                continue
            except Exception as err:
                raise AssertionError(
                    f"{where}: accepted at patch time but the forward raised {type(err).__name__}: {err}"
                ) from err
            finally:
                handle.remove()
            assert recs and all(r.reducer == name for r in recs), f"{where}: no record of the step"
            for rec in recs:
                want = [min(resolve_budget(budget, n, rounding=reducer.ratio_rounding), n) for n in rec.tokens_before]
                if decode:  # a decoding step that kept its previous selection reports every token
                    want = [w if info.get("refresh", True) else n for w, n, info in zip(want, rec.tokens_before, rec.info)]
                assert rec.tokens_after == want, f"{where}: kept {rec.tokens_after} of {rec.tokens_before}, expected {want}"
            assert bool(torch.isfinite(out).all()), f"{where}: non-finite logits"
            if not decode:  # a decoding step masks cache entries; the prompt keeps its length
                assert out.shape[1] < stock_len, f"{where}: the sequence was not shortened ({out.shape[1]} >= {stock_len})"
            report.ran.append((name, st.value))
    ran = {n for n, _ in report.ran}
    never = [n for n in names if n not in ran and not any(r[0] == n for r in report.refused)]
    assert not never, f"reducers {never} ran at no stage (each raised InvalidInputError on these inputs at every stage)"


# -- the entry point -------------------------------------------------------------------------------------


def check_adapter(
    build_model: Callable[[], torch.nn.Module],
    make_inputs: Callable[[list[int]], dict[str, Any]],
    placeholder_tokens: Iterable[int],
    *,
    rows: int = 2,
    stages: Iterable[Stage | str] = ORDER,
    layer: int = 1,
    new_tokens: int = 3,
    positions: str | None = None,
    video_budget: str = "per_frame",
    reducers: Iterable[str] | None = None,
    reducer_params: Mapping[str, Mapping[str, Any]] | None = None,
    reducer_budget: int | float = 0.5,
    input_errors: Mapping[str, Iterable[Stage | str]] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> AdapterReport:
    """Run the adapter conformance checks (see the module docs) on a model from ``build_model``.

    Args:
        build_model: ``() -> model``: a small seeded model of the family, in eval mode (called once).
        make_inputs: ``rows -> forward kwargs`` for a subset of a fixed batch of ``rows`` prompts
            (``input_ids``, ``attention_mask``, pixel inputs...), left-padded; a row's content must
            not depend on which other rows are present. Give the rows different lengths and media.
        placeholder_tokens: the ids of the tokens that stand for media features in ``input_ids``.
        rows: size of the fixed batch.
        stages: the stages the adapter supports (default: all three).
        layer: the decoder layer of ``llm_layer`` steps.
        new_tokens: greedy tokens generated per comparison.
        positions: pipeline option (default: the adapter's ``default_positions``).
        video_budget: pipeline option (``per_frame`` or ``per_video``).
        reducers: registered reducer names to run through the adapter (default: every registered one).
        reducer_params: parameters for the run, by reducer name or ``"name@stage"`` (the latter
            override the former), e.g. a smaller basis for tiny units.
        reducer_budget: their budget (a ratio by default, so it reduces units of any size).
        input_errors: per reducer name, the stages where the reducer may raise
            :class:`~tokenreduce.errors.InvalidInputError` on these inputs because they are outside
            its method's domain (e.g. ``{"pool": ["llm_layer"]}``: a grid pooling of a row holding
            several images); reported in ``declined``, not failed. Every reducer must still run
            (or be refused) at some stage.
        atol: absolute tolerance where two computations legitimately round differently (batch
            vs row, cache vs none); identity and restoration are compared bit for bit.
        rtol: relative tolerance there.

    Returns an :class:`AdapterReport`; raises ``AssertionError`` naming the first failed property.
    """
    model = build_model()
    env = AdapterEnv(
        model=model,
        make_inputs=make_inputs,
        placeholders=tuple(int(t) for t in placeholder_tokens),
        rows=rows,
        stages=tuple(sorted({Stage(s) for s in stages}, key=ORDER.index)),
        layer=layer,
        new_tokens=new_tokens,
        positions=positions,
        video_budget=video_budget,
        atol=atol,
        rtol=rtol,
    )
    report = AdapterReport(adapter=get_registry().adapter_for(model).name)
    stock = Stock.of(env)
    counts = check_identity(env, stock)
    report.checks.append("identity")
    # What that patch left behind would tangle with every later patch: look before going on.
    assert_as_stock(env, stock, "remove()")
    budgets = budgets_for(counts)
    # Restoration early: every later check assumes a model that each patch leaves as it found it.
    check_restore(env, stock, budgets)
    report.checks.append("restore")
    check_counts(env, budgets)
    report.checks.append("counts")
    check_cache(env, budgets)
    report.checks.append("cache")
    if rows > 1:
        check_batch(env, budgets)
        report.checks.append("batch")
    names = sorted(get_registry().reducers) if reducers is None else list(reducers)
    check_reducers(env, report, names, reducer_params or {}, reducer_budget, input_errors or {})
    report.checks.append("reducers")
    assert_as_stock(env, stock, "the checks' patches and removals")
    refused = sorted({f"{n}@{s}" for n, s, _ in report.refused})
    print(
        f"check_adapter({report.adapter!r}, {type(model).__name__}): passed {', '.join(report.checks)} at "
        f"{', '.join(s.value for s in env.stages)}; {len(report.ran)} reducer steps ran"
        + (f", {len(refused)} refused for missing context ({', '.join(refused)})" if refused else "")
        + (f", {len(report.declined)} declined these inputs ({', '.join(f'{n}@{s}' for n, s, _ in report.declined)})" if report.declined else "")
    )
    return report
