"""The reducer interface and the two bases most methods build on.

A reducer maps ``(B, N, D)`` tokens (+ validity mask + context) to a
:class:`~tokenreduce.reduction.Reduction`. Most methods only score tokens
(:class:`ScoringReducer`: keep the top-T) or score and then merge the rest into
what they kept (:class:`MergingReducer`).
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, ClassVar

import torch

from . import graphs, ops, precision
from .budget import Budget, RatioRounding, check_budget, resolve_budget, resolve_budgets
from .context import ReductionContext
from .errors import InvalidInputError, MissingContextError, StageError
from .numerics import safe_scale, unscale
from .params import ReducerParams, build_params
from .reduction import Reduction
from .requirements import Requirement, RequiresByStage, declare
from .stages import ALL_STAGES, Stage
from .sync import host_reads_free
from .validation import check_finite, check_mask, check_tokens, pending_sum

#: Context fields that hold tensors (a reducer requiring one gets a clear error for anything else).
_TENSOR_FIELDS = frozenset(
    {"cls_token", "cls_attention", "keys", "text_embeds", "text_mask", "attention", "positions", "text_keys", "frame_index"}
)


Observer = Callable[["Reducer", torch.Tensor, torch.Tensor, ReductionContext, Reduction], None]
_observers: list[Observer] = []


@contextmanager
def observe(callback: Observer) -> Iterator[None]:
    """Call ``callback(reducer, tokens, valid, context, reduction)`` after every reducer call.

    For diagnostics (``tokenreduce run`` measures reconstruction error this way, whatever
    adapter made the call). Costs nothing when no observer is registered.
    """
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


class ContextByStage:
    """A ``required_context`` that depends on the stage a reducer instance runs at (the older
    form of :class:`~tokenreduce.requirements.RequiresByStage`, which built-ins use; kept for
    third-party reducers, whose ``requires`` is read from it).

    For methods whose rule differs by stage (an encoder-side scan and a decoder-layer
    filter in one class): the class itself (docs, CLI, schema) reports every stage's
    needs together; an instance reports those of its own stage (``unset`` when it was
    created without one), so an adapter prepares only the signal a step actually reads.
    """

    def __init__(self, needs: dict[Stage, frozenset[str]], unset: Stage):
        self.needs = {Stage(k): frozenset(v) for k, v in needs.items()}
        self.unset = Stage(unset)

    def __get__(self, obj: Any, owner: type | None = None) -> frozenset[str]:
        if obj is None:
            return frozenset().union(*self.needs.values())
        return self.needs.get(obj.stage or self.unset, frozenset())


class Reducer(abc.ABC):
    """Base class of all reducers.

    Subclasses declare:

    * ``name``: the registry name (lower case, ``[a-z0-9_-]``).
    * ``stages``: the :class:`Stage` s it supports.
    * ``Params``: a :class:`ReducerParams` subclass (validated, documented fields).
    * ``requires``: the context it needs, as :mod:`~tokenreduce.requirements` objects
      (``(CLS_ATTENTION, KEYS)``, ``(AttentionRows("text", "previous"),)``), or a
      :class:`~tokenreduce.requirements.RequiresByStage`; an instance may set its own in
      ``__init__`` when its parameters decide. ``required_context`` (the field names) and
      ``attention_query`` / ``attention_layer`` (what an ``llm_layer`` step reads) are read
      from it; a class may still set those instead (the older form), and ``requires`` is
      then read from them.
    * ``paper``: the citation shown by ``tokenreduce list`` and the docs.
    * ``graph_safe`` (optional): ``True`` when :meth:`reduce` never reads a device value on
      the host given ``context.uniform_count`` (no mask, one count for all rows): such calls
      on CUDA are then replayed from captured CUDA graphs (:mod:`tokenreduce.graphs`). Its
      behaviour must depend only on the parameters, the stage and the context (an instance
      may set the attribute per its parameters). ``tests/test_graph_safe.py`` checks every
      built-in that declares it under :func:`tokenreduce.sync.no_host_sync`.

    and implement :meth:`reduce`. Construct with ``Reducer(budget, stage=..., **params)``
    or ``tokenreduce.create(name, budget=..., **params)``; call with tokens.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[frozenset[Stage]] = ALL_STAGES
    Params: ClassVar[type[ReducerParams]] = ReducerParams
    requires: ClassVar[tuple[Requirement, ...] | RequiresByStage] = ()
    # Views of ``requires`` (installed by requirements.declare): the field names, and at an
    # llm_layer step which query rows ("last" | "text") and whose q/k ("previous" = layer
    # K-1 | "current" = layer K) the adapter recomputes attention rows and keys from.
    required_context: ClassVar[frozenset[str]]
    attention_query: ClassVar[str]
    attention_layer: ClassVar[str]
    paper: ClassVar[str] = ""
    # How a ratio budget r becomes a count out of n tokens (tokenreduce.budget.RATIO_ROUNDINGS):
    # "half_up" by default; a method whose official code rounds otherwise declares its rule
    # here, so ratio budgets keep the official counts.
    ratio_rounding: ClassVar[RatioRounding] = "half_up"
    # When an ``llm_layer`` step acts: "prefill" (the prompt's tokens, once) or "decode"
    # (at every decoding step, on the cache: DyCoke's dynamic KV pruning). Adapters that
    # cannot run decode-time steps refuse them at patch time.
    acts_at: ClassVar[str] = "prefill"
    graph_safe: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declare(cls)  # requires <-> required_context / attention_query / attention_layer

    def __init__(self, budget: Budget | None = None, *, stage: Stage | str | None = None, **params: Any):
        self.budget = None if budget is None else check_budget(budget)
        self.stage = None if stage is None else self._check_stage(stage)
        self.params = build_params(self.Params, params, self.name)

    # -- description -------------------------------------------------------------------

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    @classmethod
    def supports(cls, stage: Stage | str) -> bool:
        return Stage(stage) in cls.stages

    @classmethod
    def _check_stage(cls, stage: Stage | str) -> Stage:
        try:
            st = Stage(stage)
        except ValueError:
            allowed = ", ".join(s.value for s in Stage)
            raise StageError(f"stage={stage!r} is not a stage; allowed: {allowed}") from None
        if st not in cls.stages:
            allowed = ", ".join(sorted(s.value for s in cls.stages))
            raise StageError(f"reducer {cls.name!r} does not support stage {st.value!r}; it supports: {allowed}")
        return st

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        stage = f", stage={self.stage.value!r}" if self.stage else ""
        return f"{type(self).__name__}(budget={self.budget!r}{stage}{', ' if params else ''}{params})"

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and self.budget == other.budget  # type: ignore[attr-defined]
            and self.stage == other.stage  # type: ignore[attr-defined]
            and self.params == other.params  # type: ignore[attr-defined]
        )

    __hash__ = None  # type: ignore[assignment]  # mutable budget/stage: not hashable

    # -- calling -----------------------------------------------------------------------

    def __call__(
        self,
        tokens: torch.Tensor,
        budget: Budget | None = None,
        *,
        mask: torch.Tensor | None = None,
        context: ReductionContext | None = None,
    ) -> Reduction:
        """Reduce ``tokens (B, N, D)`` to at most ``budget`` tokens per row.

        Args:
            tokens: features to reduce; float32, float16 or bfloat16, finite.
            budget: overrides the budget given at construction.
            mask: optional ``(B, N)`` validity mask; invalid (padded) tokens are never
                kept nor merged into others.
            context: extra inputs listed in ``requires`` (``required_context``).
        """
        tokens = check_tokens(tokens, finite=False)
        # Finiteness: checked now off CUDA; on CUDA the sum is queued here and read only once the
        # reduction is queued too where it replays a graph (tokenreduce.graphs), so the host's
        # work for the call overlaps the GPU's instead of waiting for it, else before it runs.
        total = pending_sum(tokens)
        # Without a mask every token is valid: the all-true mask is made only where it is read
        # (the identity, observers), not on the common path (a device allocation and fill less).
        valid = None if mask is None else check_mask(mask, tokens)
        budget = self.budget if budget is None else check_budget(budget)
        if budget is None:
            raise InvalidInputError(f"reducer {self.name!r} has no budget: pass budget= to the constructor or the call")
        # A copy: the caller's context is not modified.
        context = replace(
            context if context is not None else ReductionContext(),
            stage=(context.stage if context is not None else None) or self.stage or self._default_stage(),
            uniform_count=None,
        )
        missing = sorted(f for f in self.required_context if getattr(context, f, None) is None)
        if missing:
            raise MissingContextError(
                f"reducer {self.name!r} needs context {', '.join(missing)}; pass "
                f"context=ReductionContext({', '.join(f'{m}=...' for m in missing)}) or run it through an adapter"
            )
        wrong = sorted(
            f for f in self.required_context & _TENSOR_FIELDS if not isinstance(getattr(context, f), torch.Tensor)
        )
        if wrong:
            raise InvalidInputError(
                f"reducer {self.name!r}: context.{wrong[0]} must be a torch.Tensor, "
                f"got {type(getattr(context, wrong[0])).__name__}"
            )
        if mask is None:
            out = self._uniform(tokens, budget, context, total)
        else:
            if total is not None:
                check_finite(tokens, total=total)
            valid_counts = valid.sum(dim=1)
            counts = resolve_budgets(budget, valid_counts, rounding=self.ratio_rounding)
            if bool((counts == valid_counts).all()):
                out = identity_reduction(tokens, valid)
            else:
                # Float32 products on CUDA in TF32 unless configured otherwise (tokenreduce.precision).
                with precision.reducer_matmul(tokens.device):
                    out = self.reduce(tokens, counts, valid, context)
        if _observers and valid is None:
            valid = check_mask(None, tokens)
        for callback in _observers:
            callback(self, tokens, valid, context, out)
        return out

    def call_unchecked(self, tokens: torch.Tensor, context: ReductionContext) -> Reduction:
        """What ``self(tokens, context=context)`` returns, without its input checks and observers.

        For callers that cannot read device values, the capture of a CUDA graph that holds this
        call (the fast path's split prefill), and that made the same call checked before (its
        warm-up): the finiteness of ``tokens`` and the context's presence are not checked here.
        Every row keeps the count the budget gives ``N`` (no mask).
        """
        if self.budget is None:
            raise InvalidInputError(f"reducer {self.name!r} has no budget: pass budget= to the constructor")
        context = replace(context, stage=context.stage or self.stage or self._default_stage(), uniform_count=None)
        return self._uniform(tokens, self.budget, context)

    def _uniform(
        self, tokens: torch.Tensor, budget: Budget, context: ReductionContext, total: torch.Tensor | None = None
    ) -> Reduction:
        """Every row holds all N tokens, so every row keeps the same count, worked out on the host: no
        device read here, and reducers may skip theirs (``uniform_count``). ``total``: the pending
        finiteness check (:func:`~tokenreduce.validation.pending_sum`), or ``None``."""
        b, n, _ = tokens.shape
        t = resolve_budget(budget, n, rounding=self.ratio_rounding)
        if t == n:
            if total is not None:  # nothing runs on the tokens here: the read may wait (deferred_checks)
                check_finite(tokens, total=total, deferrable=True)
            return identity_reduction(tokens, check_mask(None, tokens), n)
        context.uniform_count = t
        # Float32 products on CUDA in TF32 unless configured otherwise (tokenreduce.precision);
        # eager, or replayed from a CUDA graph for graph_safe reducers on CUDA.
        with precision.reducer_matmul(tokens.device):
            return graphs.reduce_uniform(self, tokens, t, context, total)

    def _default_stage(self) -> Stage:
        # The encoder-side default is the common case for direct tensor calls.
        for st in (Stage.PROJECTOR, Stage.VISION_ENCODER, Stage.LLM_LAYER):
            if st in self.stages:
                return st
        raise StageError(f"reducer {self.name!r} declares no stages")

    @abc.abstractmethod
    def reduce(
        self, tokens: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor, context: ReductionContext
    ) -> Reduction:
        """Keep ``counts[b]`` of the valid tokens of each row.

        Called with checked inputs: ``tokens (B, N, D)`` finite, ``valid (B, N)`` bool,
        ``counts (B,)`` int64 with ``1 <= counts[b] <= valid[b].sum()`` (or 0 for an
        all-padding row), at least one row actually reduced, and the required context present.
        """


declare(Reducer)


def make_reduction(
    tokens: torch.Tensor,
    indices: torch.Tensor,
    slots: torch.Tensor,
    *,
    features: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
    info: dict[str, Any] | None = None,
) -> Reduction:
    """Assemble a :class:`Reduction` from ascending kept ``indices`` and their ``slots``.

    ``features`` defaults to the gathered input tokens; it is cast to the input dtype
    and zeroed at padded slots.
    """
    if features is None:
        features = ops.gather_rows(tokens, indices)
    features = features.to(tokens.dtype).masked_fill(~slots.unsqueeze(-1), 0)
    if sizes is not None:
        sizes = sizes.float().masked_fill(~slots, 0)
    return Reduction(
        tokens=features,
        indices=indices,
        keep_mask=ops.keep_mask_from(indices, slots, tokens.shape[1]),
        valid=slots,
        sizes=sizes,
        info=info or {},
    )


def identity_reduction(tokens: torch.Tensor, valid: torch.Tensor, t: int | None = None) -> Reduction:
    """Every valid token kept, features unchanged (budget >= valid count).

    ``t``: the largest valid count when known on the host (no device read then)."""
    counts = valid.sum(dim=1)
    n = tokens.shape[1]
    pos = torch.arange(n, device=tokens.device).expand_as(valid)
    order = torch.where(valid, pos, torch.full_like(pos, n))
    if t is None:
        t = int(counts.max()) if counts.numel() else 0
    indices = torch.sort(order, dim=1).values[:, :t]
    slots = ops.slot_mask(counts, indices.shape[1])
    indices = indices.masked_fill(~slots, -1)
    return make_reduction(tokens, indices, slots, sizes=slots.float(), info={"identity": True})


class ScoringReducer(Reducer):
    """Keep the ``T`` highest-scoring tokens of each row. Implement :meth:`score`.

    Ties are broken towards the lower index. Scores are reported in ``info["scores"]``.
    """

    @abc.abstractmethod
    def score(self, tokens: torch.Tensor, valid: torch.Tensor, context: ReductionContext) -> torch.Tensor:
        """``(B, N)`` importance of each token; higher is kept first. Padded entries are ignored."""

    def select(
        self, tokens: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor, context: ReductionContext
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Ascending kept indices ``(B, T)``, their slot mask and diagnostics."""
        scores = self.score(tokens, valid, context).float()
        if host_reads_free(scores):
            _check_finite_scores(self.name, scores, valid)
        order, slots = ops.topk_per_row(scores, counts, valid, context.uniform_count)
        return ops.ascending(order, slots), slots, {"scores": scores}

    def reduce(self, tokens, counts, valid, context):  # noqa: D102 - documented on Reducer
        indices, slots, info = self.select(tokens, counts, valid, context)
        return make_reduction(tokens, indices, slots, sizes=slots.float(), info=info)


def _check_finite_scores(name: str, scores: torch.Tensor, valid: torch.Tensor) -> None:
    """Raise if a valid token's score is NaN or infinite: a descending sort ranks NaN first,
    so a NaN (a broken context, or an overflow in ``score()``) would silently decide what is
    kept. Checked on CPU only, where reading the result costs no device synchronisation;
    on accelerators the conformance kit (:func:`tokenreduce.testing.check_reducer`) checks
    ``score()`` instead, keeping the hot path free of host reads."""
    if scores.shape != valid.shape:
        return  # a shape error is for the selection to report
    bad = ~torch.isfinite(scores) & valid
    if bool(bad.any()):
        row, tok = (int(i) for i in bad.nonzero()[0])
        raise InvalidInputError(
            f"reducer {name!r}: score() gave {float(scores[row, tok])} for valid token {tok} of row {row} "
            f"({int(bad.sum())} non-finite scores in all); scores must be finite. Check the context the "
            "scores come from (e.g. attention computed in float16) or the reducer's score()"
        )


class MergingReducer(ScoringReducer):
    """Keep the top-T by :meth:`score`, then merge every dropped token into its most
    cosine-similar kept token (size-weighted average). Kept features are averaged with
    the tokens merged into them; ``sizes`` count them.
    """

    def reduce(self, tokens, counts, valid, context):  # noqa: D102
        indices, slots, info = self.select(tokens, counts, valid, context)
        features, sizes, assign = merge_nearest(tokens, indices, slots, valid)
        info["assignment"] = assign
        return make_reduction(tokens, indices, slots, features=features, sizes=sizes, info=info)


def merge_nearest(
    tokens: torch.Tensor,
    indices: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    *,
    targets: torch.Tensor | None = None,
    kept_features: torch.Tensor | None = None,
    kept_weight: float = 1.0,
    prescaled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average each dropped valid token into its most cosine-similar target slot.

    Args:
        tokens: ``(B, N, D)`` input.
        indices: ``(B, T)`` ascending kept indices.
        slots: ``(B, T)`` bool, the real (not padded) entries of ``indices``.
        valid: ``(B, N)`` input validity; invalid tokens are never merged.
        targets: ``(B, T)`` bool, slots allowed to receive merges (default: all real slots).
        kept_features: ``(B, T, D)`` features of the kept slots before merging
            (default: the gathered input). Similarities use these.
        kept_weight: weight of the kept token itself in its average.
        prescaled: ``tokens`` are float32, every row's largest magnitude is within
            ``[2^-40, 2^40]`` (or zero) and padded tokens are zero, as
            :func:`~tokenreduce.numerics.safe_scale` returns them: the rescaling pass (which
            would then change nothing) is skipped. On the CUDA formulations such tokens may
            also be float16 or bfloat16: they are then never widened (the products take them
            as they are, :func:`~tokenreduce.ops.wide_bmm`).

    Returns:
        ``(features (B, T, D) float32, sizes (B, T) float32, assignment (B, N))`` where
        ``assignment`` is the slot each token went to (its own slot for kept tokens, -1
        for padding). Similarity uses a ``(B, N, T)`` matrix: memory grows with N·T, not N·T·D.
    """
    # Rows of extreme magnitude are divided by a power of two (exact; cosine similarities and
    # weighted means do not change), so the float32 sums cannot overflow.
    if prescaled:
        half = ops.cuda_formulas(tokens) and tokens.dtype in (torch.float16, torch.bfloat16)
        x, scale = (tokens if half else tokens.float()), tokens.new_ones(tokens.shape[0], 1, 1, dtype=torch.float32)
    else:
        x, scale = safe_scale(tokens, valid)
    kept = ops.gather_rows(x, indices).float() if kept_features is None else kept_features.float() / scale
    targets = slots if targets is None else (targets & slots)
    n, t = x.shape[1], indices.shape[1]
    keep_mask = ops.keep_mask_from(indices, slots, n)
    dropped = valid & ~keep_mask
    sim = ops.cosine_similarity(x, kept).masked_fill(~targets.unsqueeze(1), float("-inf"))
    nearest = sim.argmax(dim=2)
    has_target = targets.any(dim=1, keepdim=True)
    assign = torch.where(dropped & has_target, nearest, torch.full_like(nearest, -1))
    sums, counts = ops.merge_into(x, assign, t)
    w = torch.where(targets, torch.full_like(counts, kept_weight), torch.ones_like(counts))
    merged = (kept * w.unsqueeze(-1) + sums) / (w + counts).clamp_min(1e-12).unsqueeze(-1)
    features = unscale(torch.where((counts > 0).unsqueeze(-1), merged, kept), scale, tokens.dtype)
    sizes = (1.0 + counts) * slots
    # Kept tokens point at their own slot so the assignment covers every valid token;
    # padded slots write to a spare column n that is cut off.
    own = torch.full((x.shape[0], n + 1), -1, dtype=torch.long, device=x.device)
    slot_ids = torch.arange(t, device=x.device).expand_as(indices)
    own.scatter_(1, torch.where(slots, indices, torch.full_like(indices, n)), slot_ids)
    assignment = torch.where(keep_mask, own[:, :n], assign)
    return features, sizes, assignment
