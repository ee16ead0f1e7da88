"""The context contract: what a reducer needs, what an adapter provides, and the one check between them.

A reducer declares ``requires``: a tuple of :class:`Requirement` objects (:data:`CLS_ATTENTION`,
:class:`AttentionRows` ``(query, layer)``, ...), or a :class:`RequiresByStage` when its needs
differ by stage. An adapter says what it gives at each stage with a :class:`Provision`, and
:func:`check_context` compares the two for every step of a pipeline, raising one
:class:`~tokenreduce.errors.MissingContextError` that names the reducer, the stage, the
missing fields, why the adapter cannot give them and what it does give there.

The older declarations keep working: ``required_context`` (a set of field names, or a
:class:`~tokenreduce.reducer.ContextByStage`) and ``attention_query`` / ``attention_layer``.
:func:`declare` (run for every :class:`~tokenreduce.reducer.Reducer` subclass) turns either
form into the other, so both read the same on classes and instances.

This module knows no model and no method: only the fields of
:class:`~tokenreduce.context.ReductionContext`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .context import ReductionContext
from .errors import MissingContextError, did_you_mean
from .stages import Stage

if TYPE_CHECKING:  # annotations only
    from .pipeline import Pipeline

#: The query rows an :class:`AttentionRows` may ask for: the last token of the sequence, or
#: every text token after the image.
QUERIES = ("last", "text")
#: Whose q/k an ``llm_layer`` step at layer K reads: layer K-1's (as FastV reads the attention
#: map of layer K-1) or layer K's own input.
LAYERS = ("previous", "current")
#: Context an ``llm_layer`` step can only get from a decoder layer's queries and keys.
DECODER_QK_FIELDS = frozenset({"attention", "keys", "text_keys"})

# Human words per field, for describe(), errors and the CLI.
_WORDS = {
    "stage": "the stage being run",
    "layer": "the decoder layer index (llm_layer)",
    "cls_token": "the vision tower's [CLS] output",
    "cls_attention": "the [CLS] token's head-averaged attention to the patch tokens",
    "keys": "the image tokens' keys",
    "text_embeds": "the text tokens' embeddings or hidden states",
    "text_mask": "which text_embeds rows are real",
    "attention": "attention rows to the image tokens",
    "grid": "the (h, w) patch grid of the tokens",
    "positions": "the tokens' position ids",
    "text_keys": "the text tokens' keys",
    "frames": "the frame count of a whole video per row",
    "frame_index": "the frame of each token of a whole video",
}
# Fields no reducer can require: never None, or set by the call itself.
_NOT_REQUIRABLE = {"extra": "a free-form dict, always present", "uniform_count": "set by the call itself"}
_FIELDS = tuple(f.name for f in dataclasses.fields(ReductionContext))
_LAYER_WORDS = {"previous": "decoder layer K-1", "current": "decoder layer K"}
_QUERY_WORDS = {"last": "the last token", "text": "every text token after the image"}


def _check_choice(what: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{what}={value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


class Requirement:
    """One thing a reducer needs: the :class:`ReductionContext` ``fields`` it fills.

    Subclasses are frozen dataclasses (equal when their arguments are equal).
    """

    fields: tuple[str, ...] = ()
    #: Which decoder layer's q/k it reads at ``llm_layer`` ("previous"/"current"), None
    #: when it reads none or follows the step's other requirements.
    decoder_layer: str | None = None

    @property
    def reads_decoder_qk(self) -> bool:
        """Whether an ``llm_layer`` step gets it from a decoder layer's queries and keys."""
        return bool(DECODER_QK_FIELDS & set(self.fields))

    def describe(self) -> str:
        """Human words: the fields and what they hold."""
        return "; ".join(f"{f} ({_WORDS.get(f, 'a context field')})" for f in self.fields)

    def unmet(self, provision: Provision) -> dict[str, str | None]:
        """The fields ``provision`` lacks, each with a reason (None: the provision's own, if any)."""
        return {f: None for f in self.fields if f not in provision.fields}


@dataclass(frozen=True, init=False)
class Need(Requirement):
    """Plain context fields, e.g. ``Need("grid")``: present (not None) is all it asks.

    The decoder-read fields have their own types, which say more: :class:`AttentionRows`
    (``attention``), :data:`KEYS` / :class:`Keys`, :data:`TEXT_KEYS` / :class:`TextKeys`.
    """

    fields: tuple[str, ...]

    def __init__(self, *fields: str):
        if not fields:
            raise ValueError("Need() names no field; e.g. Need('grid')")
        for f in fields:
            if not isinstance(f, str) or f not in _FIELDS:
                raise ValueError(
                    f"Need({f!r}): not a ReductionContext field.{did_you_mean(f, _FIELDS)} "
                    f"Fields: {', '.join(x for x in _FIELDS if x not in _NOT_REQUIRABLE)}"
                )
            if f in _NOT_REQUIRABLE:
                raise ValueError(f"Need({f!r}): {f} cannot be required ({_NOT_REQUIRABLE[f]})")
            if f in DECODER_QK_FIELDS:
                typed = {"attention": "AttentionRows(query=..., layer=...)", "keys": "KEYS", "text_keys": "TEXT_KEYS"}[f]
                raise ValueError(f"Need({f!r}): declare {typed} instead (it says which decoder rows and layer)")
        object.__setattr__(self, "fields", tuple(sorted(set(fields))))

    def __repr__(self) -> str:
        return f"Need({', '.join(repr(f) for f in self.fields)})"


@dataclass(frozen=True)
class AttentionRows(Requirement):
    """``attention``: ``(B, Q, N)`` head-averaged attention that query rows pay to the image tokens.

    ``query``: ``"last"`` (the last token of the sequence, Q = 1) or ``"text"`` (every text token
    after the image). ``layer``: at an ``llm_layer`` step at layer K, ``"previous"`` reads layer
    K-1's q/k (FastV's attention map), ``"current"`` layer K's own input. The adapter recomputes
    only these rows, so the model keeps SDPA / FlashAttention.
    """

    query: str = "last"
    layer: str = "previous"
    fields: ClassVar[tuple[str, ...]] = ("attention",)  # type: ignore[misc]

    def __post_init__(self) -> None:
        _check_choice("AttentionRows: query", self.query, QUERIES)
        _check_choice("AttentionRows: layer", self.layer, LAYERS)

    @property
    def decoder_layer(self) -> str:  # type: ignore[override]
        return self.layer

    def describe(self) -> str:
        return (
            f"attention (the head-averaged attention {_QUERY_WORDS[self.query]} pays the image tokens, "
            f"recomputed from {_LAYER_WORDS[self.layer]}'s q/k)"
        )

    def unmet(self, provision: Provision) -> dict[str, str | None]:
        if "attention" not in provision.fields:
            return {"attention": None}
        if self.query not in provision.queries or self.layer not in provision.layers:
            can = ", ".join(f"{q}/{lay}" for q in provision.queries for lay in provision.layers) or "none"
            why = f"query={self.query!r}, layer={self.layer!r} cannot be recomputed here (query/layer given: {can})"
            return {"attention": why}
        return {}


@dataclass(frozen=True)
class Keys(Requirement):
    """``keys``: ``(B, N, D_k)`` the image tokens' keys: encoder side, the selected vision layer's;
    at an ``llm_layer`` step, a decoder layer's (post-RoPE, heads concatenated).

    ``layer`` (``llm_layer`` only): ``"previous"`` / ``"current"`` as for :class:`AttentionRows`;
    ``None`` follows the step's attention rows, else ``"previous"``. One step reads one
    layer's q/k, so explicit layers must agree.
    """

    layer: str | None = None
    fields: ClassVar[tuple[str, ...]] = ("keys",)  # type: ignore[misc]

    def __post_init__(self) -> None:
        if self.layer is not None:
            _check_choice(f"{type(self).__name__}: layer", self.layer, LAYERS)

    @property
    def decoder_layer(self) -> str | None:  # type: ignore[override]
        return self.layer

    def describe(self) -> str:
        where = f"{_LAYER_WORDS[self.layer]}'s" if self.layer else "decoder layer K-1's (or the attention rows' layer)"
        return f"{self.fields[0]} ({_WORDS[self.fields[0]]}: the selected vision layer's; at llm_layer, {where})"


@dataclass(frozen=True)
class TextKeys(Keys):
    """``text_keys``: ``(B, L, D_k)`` keys of the text tokens of ``text_embeds``, from the same
    layer as :class:`Keys` (``layer`` as there)."""

    fields: ClassVar[tuple[str, ...]] = ("text_keys",)  # type: ignore[misc]


CLS_TOKEN = Need("cls_token")
CLS_ATTENTION = Need("cls_attention")
KEYS = Keys()
TEXT_KEYS = TextKeys()
#: ``text_embeds`` only: ``text_mask`` comes with it where an adapter has text (a direct call
#: may leave it out; reducers then treat every row as real).
TEXT = Need("text_embeds")
TEXT_MASK = Need("text_mask")
GRID = Need("grid")
POSITIONS = Need("positions")
FRAMES = Need("frames")
FRAME_INDEX = Need("frame_index")


def decoder_reads(requires: Iterable[Requirement], default: tuple[str, str] = ("last", "previous")) -> tuple[str, str]:
    """``(query, layer)`` an ``llm_layer`` step with these requirements reads.

    Each is ``default``'s where no requirement names one; raises ValueError when two disagree.
    """
    reqs = list(requires)
    queries = sorted({r.query for r in reqs if isinstance(r, AttentionRows)})
    layers = sorted({r.decoder_layer for r in reqs if r.decoder_layer is not None})
    if len(queries) > 1:
        raise ValueError(f"attention rows of two queries ({', '.join(queries)}); one step reads one")
    if len(layers) > 1:
        raise ValueError(f"decoder q/k of two layers ({', '.join(layers)}); one step reads one layer's")
    return (queries or [default[0]])[0], (layers or [default[1]])[0]


# -- what an adapter provides --------------------------------------------------------------------


@dataclass(frozen=True)
class Provision:
    """What an adapter gives at one stage.

    Attributes:
        fields: the :class:`ReductionContext` fields it fills there.
        reasons: ``field -> why not`` for fields it cannot give (e.g. ``"the Qwen-VL vision
            tower has no [CLS] token"``); shown in the error.
        queries / layers: the :class:`AttentionRows` queries and layers it can recompute
            (decoder stages: usually :data:`QUERIES` / :data:`LAYERS`; none by default).
        advice: appended to the error (e.g. which reducers would run instead).
    """

    fields: frozenset[str] = frozenset()
    reasons: Mapping[str, str] = field(default_factory=dict)
    queries: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    advice: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", frozenset(self.fields))
        object.__setattr__(self, "reasons", dict(self.reasons))
        object.__setattr__(self, "queries", tuple(self.queries))
        object.__setattr__(self, "layers", tuple(self.layers))
        for q in self.queries:
            _check_choice("Provision: queries item", q, QUERIES)
        for lay in self.layers:
            _check_choice("Provision: layers item", lay, LAYERS)

    def available(self) -> str:
        """The fields given, in words for errors (attention with its query/layer pairs)."""
        if not self.fields:
            return "none"
        words = []
        for f in sorted(self.fields):
            if f == "attention":
                words.append(f"attention (query {'/'.join(self.queries) or '-'}, layer {'/'.join(self.layers) or '-'})")
            else:
                words.append(f)
        return ", ".join(words)


def check_context(
    pipeline: Pipeline | Iterable[Any], provides: Callable[[Stage], Provision | None], *, model: str, adapter: str
) -> None:
    """Raise :class:`MissingContextError` for the first step whose reducer needs context the adapter lacks.

    ``provides(stage)`` says what the adapter gives at ``stage`` (``None``: it declares nothing
    there, nothing is checked). The message names the reducer, the stage, the missing fields
    with the reason for each when one is known, and what the stage does provide.
    """
    for step in pipeline:
        provision = provides(step.stage)
        if provision is None:
            continue
        missing: dict[str, str | None] = {}
        for req in step.reducer.requires:
            for f, why in req.unmet(provision).items():
                missing[f] = why or missing.get(f) or provision.reasons.get(f)
        if not missing:
            continue
        names = sorted(missing)
        reasons = "; ".join(f"{f}: {missing[f]}" for f in names if missing[f])
        raise MissingContextError(
            f"reducer {step.reducer.name!r} at stage {Stage(step.stage).value} needs context {', '.join(names)}, "
            f"which the {adapter} adapter cannot provide for {model}"
            + (f" ({reasons})" if reasons else "")
            + f" (available there: {provision.available()})"
            + (f"; {provision.advice}" if provision.advice else "")
        )


# -- reducers' declarations ----------------------------------------------------------------------


class RequiresByStage:
    """A reducer's ``requires`` that depends on the stage it runs at (replaces ``ContextByStage``).

    For methods whose rule differs by stage: the class (docs, CLI, schema) reports every stage's
    requirements together; an instance those of its own stage (``unset`` when it was created
    without one), so an adapter prepares only the signal a step reads.
    """

    def __init__(self, needs: Mapping[Stage | str, Iterable[Requirement]], unset: Stage | str):
        self.needs = {Stage(k): _check_requires(v, f"RequiresByStage[{Stage(k).value}]") for k, v in needs.items()}
        self.unset = Stage(unset)

    def at(self, stage: Stage | None) -> tuple[Requirement, ...]:
        return self.needs.get(stage or self.unset, ())

    def union(self) -> tuple[Requirement, ...]:
        return tuple(dict.fromkeys(r for reqs in self.needs.values() for r in reqs))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k.value!r}: {v!r}" for k, v in self.needs.items())
        return f"RequiresByStage({{{inner}}}, unset={self.unset.value!r})"


_LEGACY = ("required_context", "attention_query", "attention_layer")


def _check_requires(value: object, where: str) -> tuple[Requirement, ...]:
    if isinstance(value, Requirement):
        raise TypeError(f"{where}: requires must be a tuple of requirements; write ({value!r},)")
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{where}: requires must be a tuple of Requirement objects, got {value!r}")
    items = tuple(value)
    for r in items:
        if not isinstance(r, Requirement):
            hint = f" (e.g. Need({r!r}) or a constant such as CLS_ATTENTION)" if isinstance(r, str) else ""
            raise TypeError(f"{where}: requires holds Requirement objects, not {r!r}{hint}")
    try:
        decoder_reads(items)
    except ValueError as err:
        raise TypeError(f"{where}: {err}") from None
    return tuple(dict.fromkeys(items))


def from_names(names: Iterable[str], query: str = "last", layer: str = "previous") -> tuple[Requirement, ...]:
    """Typed requirements for ``required_context`` names and ``attention_query`` / ``attention_layer``."""
    names = set(names)
    reqs: list[Requirement] = [Need(f) for f in sorted(names - DECODER_QK_FIELDS)]
    if "attention" in names:
        _check_choice("attention_query", query, QUERIES)
        _check_choice("attention_layer", layer, LAYERS)
        reqs.append(AttentionRows(query, layer))
    if names & {"keys", "text_keys"}:
        _check_choice("attention_layer", layer, LAYERS)
        # With attention rows the layer is theirs; alone, keys carry a layer other than the default.
        own = None if "attention" in names or layer == "previous" else layer
        reqs += [cls(own) for f, cls in (("keys", Keys), ("text_keys", TextKeys)) if f in names]
    return tuple(reqs)


def _fields_of(reqs: Iterable[Requirement]) -> frozenset[str]:
    return frozenset(f for r in reqs for f in r.fields)


class _RequiresView:
    """``requires`` of a class (its spec) and of its instances (their stage's; or derived from
    ``required_context`` / ``attention_*`` an instance set on itself, the older per-instance form).

    ``reads``: the ``(attention_query, attention_layer)`` the older attributes set, kept for
    the views (and an instance's own ``required_context``) when no requirement names them.
    """

    def __init__(self, spec: tuple[Requirement, ...] | RequiresByStage, reads: tuple[str, str] = ("last", "previous")):
        self.spec = spec
        self.reads = reads

    def of(self, obj: Any) -> tuple[Requirement, ...]:
        if obj is None:
            return self.spec.union() if isinstance(self.spec, RequiresByStage) else self.spec
        base = self.spec.at(getattr(obj, "stage", None)) if isinstance(self.spec, RequiresByStage) else self.spec
        own = {k: obj.__dict__[k] for k in _LEGACY if k in getattr(obj, "__dict__", {})}
        if not own:
            return base
        query, layer = decoder_reads(base, self.reads)
        return from_names(
            own.get("required_context", _fields_of(base)),
            own.get("attention_query", query),
            own.get("attention_layer", layer),
        )

    def __get__(self, obj: Any, owner: type | None = None) -> tuple[Requirement, ...]:
        return self.of(obj)


class _FieldsView:
    """``required_context``: the field names of ``requires`` (what adapters, CLI and docs read)."""

    def __get__(self, obj: Any, owner: type | None = None) -> frozenset[str]:
        return _fields_of((owner if obj is None else obj).requires)


class _DecoderView:
    """``attention_query`` / ``attention_layer``: what ``requires`` reads at a decoder layer."""

    def __init__(self, index: int):
        self.index = index

    def __get__(self, obj: Any, owner: type | None = None) -> str:
        owner = type(obj) if owner is None else owner
        view = _parent_view(owner, include_self=True)
        reads = view.reads if view is not None else ("last", "previous")
        return decoder_reads((owner if obj is None else obj).requires, reads)[self.index]


def _parent_view(cls: type, include_self: bool = False) -> _RequiresView | None:
    for klass in cls.__mro__[0 if include_self else 1 :]:
        view = vars(klass).get("requires")
        if isinstance(view, _RequiresView):
            return view
    return None


def _from_legacy(cls: type, legacy: dict[str, Any]) -> tuple[tuple[Requirement, ...] | RequiresByStage, tuple[str, str]]:
    """The spec of the older attributes ``cls`` sets (the rest inherited), and its (query, layer)."""
    parent = _parent_view(cls)
    spec = parent.spec if parent is not None else ()
    query, layer = decoder_reads(parent.of(None), parent.reads) if parent is not None else ("last", "previous")
    query, layer = legacy.get("attention_query", query), legacy.get("attention_layer", layer)
    names = legacy.get("required_context")
    if names is None:  # inherits the parent's fields (per stage, if it has stages)
        names = (
            {st: _fields_of(r) for st, r in spec.needs.items()} if isinstance(spec, RequiresByStage) else _fields_of(spec)
        )
        unset = spec.unset if isinstance(spec, RequiresByStage) else None
    elif hasattr(names, "needs") and hasattr(names, "unset"):  # a ContextByStage
        names, unset = names.needs, names.unset
    else:
        unset = None
    try:
        if isinstance(names, dict):
            return RequiresByStage({st: from_names(n, query, layer) for st, n in names.items()}, unset=unset), (query, layer)
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise ValueError(f"required_context must be a set of context field names, got {names!r}")
        return from_names(names, query, layer), (query, layer)
    except (ValueError, TypeError) as err:
        raise TypeError(f"reducer class {cls.__name__}: {err}") from None


def declare(cls: type) -> None:
    """Make ``requires``, ``required_context``, ``attention_query`` and ``attention_layer`` of
    ``cls`` views of one declaration: its own ``requires``, or the older attributes it sets
    (or, setting neither, its parent's). Run by ``Reducer.__init_subclass__``."""
    own = vars(cls)
    legacy = {k: own[k] for k in _LEGACY if k in own and not isinstance(own[k], (_FieldsView, _DecoderView))}
    new = own.get("requires")
    if isinstance(new, _RequiresView):
        new = None
    if new is not None:
        if legacy:
            raise TypeError(
                f"reducer class {cls.__name__} sets requires and {', '.join(legacy)}: set requires only "
                "(the others are read from it)"
            )
        spec = new if isinstance(new, RequiresByStage) else _check_requires(new, f"{cls.__name__}.requires")
        reads = ("last", "previous")
    elif legacy:
        spec, reads = _from_legacy(cls, legacy)
    else:
        return
    if isinstance(spec, RequiresByStage):
        try:
            decoder_reads(spec.union())
        except ValueError as err:
            raise TypeError(f"{cls.__name__}.requires: {err}") from None
    cls.requires = _RequiresView(spec, reads)  # type: ignore[attr-defined]
    cls.required_context = _FieldsView()  # type: ignore[attr-defined]
    cls.attention_query = _DecoderView(0)  # type: ignore[attr-defined]
    cls.attention_layer = _DecoderView(1)  # type: ignore[attr-defined]


def describe_requires(cls: type) -> list[str]:
    """One line per requirement of a reducer class, prefixed by its stage when it has stages."""
    view = next((vars(k)["requires"] for k in cls.__mro__ if isinstance(vars(k).get("requires"), _RequiresView)), None)
    if view is None:
        return [r.describe() for r in getattr(cls, "requires", ())]
    if isinstance(view.spec, RequiresByStage):
        return [f"at {st.value}: {r.describe()}" for st, reqs in view.spec.needs.items() for r in reqs]
    return [r.describe() for r in view.spec]


__all__ = [
    "CLS_ATTENTION",
    "CLS_TOKEN",
    "DECODER_QK_FIELDS",
    "FRAMES",
    "FRAME_INDEX",
    "GRID",
    "KEYS",
    "LAYERS",
    "POSITIONS",
    "QUERIES",
    "TEXT",
    "TEXT_KEYS",
    "TEXT_MASK",
    "AttentionRows",
    "Keys",
    "Need",
    "Provision",
    "Requirement",
    "RequiresByStage",
    "TextKeys",
    "check_context",
    "decoder_reads",
    "declare",
    "describe_requires",
    "from_names",
]
