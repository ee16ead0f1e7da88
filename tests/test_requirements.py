"""The typed context contract (tokenreduce.requirements): reducers' ``requires``, adapters'
``Provision`` s, the one ``check_context``, and the older declarations read both ways."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce import (
    CLS_ATTENTION,
    CLS_TOKEN,
    FRAME_INDEX,
    FRAMES,
    GRID,
    KEYS,
    POSITIONS,
    TEXT,
    TEXT_KEYS,
    TEXT_MASK,
    Adapter,
    AttentionRows,
    ConfigError,
    ContextByStage,
    Keys,
    MissingContextError,
    Need,
    Pipeline,
    Provision,
    Reducer,
    ReductionContext,
    RequiresByStage,
    ScoringReducer,
    Stage,
    Step,
    TextKeys,
    check_context,
)
from tokenreduce.pipeline import check_decoder_step, reads_decoder_qk
from tokenreduce.requirements import LAYERS, QUERIES, describe_requires
from tokenreduce_plugins.dart import DART
from tokenreduce_plugins.fastv import FastV
from tokenreduce_plugins.mustdrop import MustDrop
from tokenreduce_plugins.vscan import VScan

PROPS = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# The plain requirements and what they fill (decoder keys count as plain fields for a provision).
PLAIN = {
    "cls_token": CLS_TOKEN,
    "cls_attention": CLS_ATTENTION,
    "keys": KEYS,
    "text_keys": TEXT_KEYS,
    "text_embeds": TEXT,
    "text_mask": TEXT_MASK,
    "grid": GRID,
    "positions": POSITIONS,
    "frames": FRAMES,
    "frame_index": FRAME_INDEX,
}


def reducer_class(requires=None, **attrs):
    """A scoring reducer at every stage declaring ``requires`` (or the older attributes in ``attrs``)."""
    body = {"name": "probe", "score": lambda self, tokens, valid, context: tokens.float().sum(-1), **attrs}
    if requires is not None:
        body["requires"] = requires
    return type("Probe", (ScoringReducer,), body)


def pipeline_of(cls, stage=Stage.PROJECTOR, layer=None):
    return Pipeline([Step(stage, cls(4), layer=layer)])


# -- check_context ------------------------------------------------------------------------------------


@PROPS
@given(
    required=st.sets(st.sampled_from(sorted(PLAIN))),
    given_fields=st.sets(st.sampled_from(sorted(PLAIN))),
    with_reasons=st.booleans(),
    stage=st.sampled_from(list(Stage)),
)
def test_check_context_raises_iff_a_required_field_is_missing(required, given_fields, with_reasons, stage):
    cls = reducer_class(tuple(PLAIN[f] for f in sorted(required)))
    reasons = {f: f"no {f} on this model" for f in PLAIN} if with_reasons else {}
    provision = Provision(fields=given_fields, reasons=reasons)
    pipeline = pipeline_of(cls, stage, layer=1 if stage is Stage.LLM_LAYER else None)
    missing = sorted(required - given_fields)
    if not missing:
        check_context(pipeline, lambda s: provision, model="ToyModel", adapter="toy")
        return
    with pytest.raises(MissingContextError) as err:
        check_context(pipeline, lambda s: provision, model="ToyModel", adapter="toy")
    msg = str(err.value)
    assert f"reducer 'probe' at stage {stage.value} needs context {', '.join(missing)}," in msg
    assert "the toy adapter cannot provide for ToyModel" in msg
    assert f"(available there: {', '.join(sorted(given_fields)) or 'none'})" in msg
    for f in PLAIN:  # the reasons of the missing fields, and only those
        assert (f"{f}: no {f} on this model" in msg) == (with_reasons and f in missing)


@PROPS
@given(
    query=st.sampled_from(QUERIES),
    layer=st.sampled_from(LAYERS),
    queries=st.sets(st.sampled_from(QUERIES)),
    layers=st.sets(st.sampled_from(LAYERS)),
    has_attention=st.booleans(),
)
def test_attention_rows_need_their_query_and_layer(query, layer, queries, layers, has_attention):
    cls = reducer_class((AttentionRows(query, layer),))
    provision = Provision(
        fields={"attention"} if has_attention else set(), queries=sorted(queries), layers=sorted(layers)
    )
    pipeline = pipeline_of(cls, Stage.LLM_LAYER, layer=3)
    if has_attention and query in queries and layer in layers:
        check_context(pipeline, lambda s: provision, model="M", adapter="a")
        return
    with pytest.raises(MissingContextError, match="needs context attention,") as err:
        check_context(pipeline, lambda s: provision, model="M", adapter="a")
    if has_attention:  # the field is there, the rows are not: say which
        assert f"query={query!r}, layer={layer!r} cannot be recomputed here" in str(err.value)


def test_check_context_per_stage_none_checks_nothing_and_advice_is_appended():
    pipeline = Pipeline([Step("vision_encoder", tr.create("cls_attn", 8)), Step("llm_layer", tr.create("fastv", 8), layer=2)])
    encoder = Provision(fields={"grid"}, reasons={"cls_attention": "this tower has no [CLS] token"}, advice="try 'pool'")
    with pytest.raises(MissingContextError) as err:
        check_context(pipeline, lambda s: encoder if s.is_encoder_side else None, model="M", adapter="a")
    assert str(err.value) == (
        "reducer 'cls_attn' at stage vision_encoder needs context cls_attention, which the a adapter cannot provide "
        "for M (cls_attention: this tower has no [CLS] token) (available there: grid); try 'pool'"
    )
    decoder = Provision(fields={"attention"}, queries=QUERIES, layers=LAYERS)
    check_context(pipeline, lambda s: None if s.is_encoder_side else decoder, model="M", adapter="a")


class ToyAdapter(Adapter):
    name = "toy"

    def attach(self):
        pass

    def detach(self):
        pass


class ProvidingAdapter(ToyAdapter):
    def provides(self, stage):
        if stage is Stage.LLM_LAYER:
            return Provision(fields={"attention", "text_embeds"}, queries=("last",), layers=LAYERS)
        return Provision(fields={"grid"}, reasons={"cls_attention": "the toy tower has no [CLS] token"})


def test_adapter_validate_checks_what_provides_declares():
    model = torch.nn.Linear(2, 2)
    ToyAdapter(model, pipeline_of(reducer_class((CLS_ATTENTION,)))).validate()  # declares nothing: no check
    ProvidingAdapter(model, pipeline_of(reducer_class((GRID,)))).validate()
    ProvidingAdapter(model, Pipeline([Step("llm_layer", tr.create("fastv", 4), layer=2)])).check_context()
    with pytest.raises(MissingContextError, match=r"'probe' at stage projector .* the toy adapter cannot provide for Linear "
                       r"\(cls_attention: the toy tower has no \[CLS\] token\)"):
        ProvidingAdapter(model, pipeline_of(reducer_class((CLS_ATTENTION,)))).validate()
    sparse = Pipeline([Step("llm_layer", tr.create("sparsevlm", 4), layer=2)])  # text queries: not recomputed here
    with pytest.raises(MissingContextError, match=r"needs context attention, .*query='text', layer='previous'"):
        ProvidingAdapter(model, sparse).validate()


# -- reducers' declarations ------------------------------------------------------------------------------


def test_builtins_declare_typed_requirements_and_the_views_agree():
    for name, entry in tr.get_registry().reducers.items():
        cls = entry.cls
        assert "requires" in {k for c in cls.__mro__ for k in vars(c)}
        assert cls.required_context == frozenset(f for r in cls.requires for f in r.fields), name
        for stage in cls.stages:
            r = cls(4, stage=stage)
            assert all(isinstance(q, tr.Requirement) for q in r.requires), name
            assert r.required_context == frozenset(f for q in r.requires for f in q.fields), (name, stage)
            rows = [q for q in r.requires if isinstance(q, AttentionRows)]
            if rows:
                assert (r.attention_query, r.attention_layer) == (rows[0].query, rows[0].layer), name
    assert FastV.requires == (AttentionRows("last", "previous"),)
    assert tr.create("pdrop", 4).requires == (AttentionRows("last", "current"),)
    assert tr.create("visionzip", 4).requires == (CLS_ATTENTION, KEYS)
    assert tr.create("fastvid", 4).requires == (FRAMES, FRAME_INDEX)


def test_third_party_string_declarations_still_work_both_ways():
    old = reducer_class(required_context=frozenset({"attention", "cls_token"}), attention_query="text")
    assert set(old.requires) == {CLS_TOKEN, AttentionRows("text", "previous")}
    assert old.required_context == {"attention", "cls_token"}
    assert (old.attention_query, old.attention_layer) == ("text", "previous")
    inst = old(4, stage="llm_layer")
    assert set(inst.requires) == set(old.requires) and inst.attention_query == "text"
    assert reads_decoder_qk(inst)
    # A subclass that changes one attribute of a typed built-in changes its requirement.
    current = type("FastVCurrent", (FastV,), {"attention_layer": "current"})
    assert current.requires == (AttentionRows("last", "current"),) and current(4).attention_layer == "current"
    assert FastV.attention_layer == "previous"
    check_decoder_step(current(4), 0)  # layer K's own q/k: layer 0 is allowed
    # Keys alone keep their layer.
    keys_only = reducer_class(required_context=frozenset({"keys"}), attention_layer="current")
    assert keys_only.requires == (Keys("current"),) and keys_only.attention_layer == "current"
    # A call without the context names the field, as before.
    with pytest.raises(MissingContextError, match=r"needs context cls_token; pass context=ReductionContext\(cls_token="):
        reducer_class(required_context=frozenset({"cls_token"}))(2)(torch.randn(1, 6, 4))


def test_per_instance_declarations():
    assert DART.requires == (KEYS, TEXT, TEXT_KEYS)
    assert DART(8).requires == (KEYS, TEXT, TEXT_KEYS)
    assert DART(8, pivot_by="token_norm").requires == (TEXT,)
    assert DART(8, pivot_by="token_norm", pivot_text_tokens=0).requires == ()
    assert DART(8, pivot_by="token_norm").required_context == {"text_embeds"}
    assert DART(8).attention_layer == "previous"
    with pytest.raises(ConfigError, match="reads the attention of the previous layer"):
        Step("llm_layer", DART(8), layer=0)  # keys of layer K-1
    Step("llm_layer", DART(8, pivot_by="token_norm", pivot_text_tokens=0), layer=0)  # reads no q/k

    class OldPerInstance(ScoringReducer):  # the older form: an instance sets required_context
        name = "old-per-instance"
        attention_query = "text"

        def __init__(self, budget=None, *, stage=None, use_attention=True, **params):
            super().__init__(budget, stage=stage, **params)
            self.required_context = frozenset({"attention"} if use_attention else {"grid"})

        def score(self, tokens, valid, context):
            return tokens.float().sum(-1)

    assert OldPerInstance(4).requires == (AttentionRows("text", "previous"),)
    assert OldPerInstance(4, use_attention=False).requires == (GRID,)
    bogus = OldPerInstance(4)
    bogus.attention_query = "first"
    with pytest.raises(ConfigError, match=r"reducer 'old-per-instance': attention_query='first'; allowed: 'last', 'text'"):
        Step("llm_layer", bogus, layer=2)


def test_by_stage_requirements():
    assert MustDrop.requires == (AttentionRows("text", "previous"),)
    assert MustDrop(8).requires == () and MustDrop(8, stage="vision_encoder").required_context == frozenset()
    assert Step("llm_layer", MustDrop(8), layer=3).reducer.requires == (AttentionRows("text", "previous"),)
    assert set(VScan.requires) == {CLS_ATTENTION, AttentionRows("last", "current")}
    assert VScan(8).requires == (CLS_ATTENTION,)  # unset: projector
    assert VScan(8, stage="llm_layer").requires == (AttentionRows("last", "current"),)
    assert (VScan.attention_query, VScan.attention_layer) == ("last", "current")
    assert "at llm_layer: attention (the head-averaged attention every text token" in "\n".join(describe_requires(MustDrop))

    # The older ContextByStage still works, and reads as RequiresByStage.
    old = reducer_class(
        required_context=ContextByStage({Stage.LLM_LAYER: frozenset({"attention"}), Stage.PROJECTOR: {"grid"}}, unset="projector"),
        attention_layer="current",
    )
    assert set(old.requires) == {GRID, AttentionRows("last", "current")}
    assert old(4).requires == (GRID,) and old(4).required_context == {"grid"}
    assert old(4, stage="llm_layer").requires == (AttentionRows("last", "current"),)
    assert ContextByStage({Stage.LLM_LAYER: {"attention"}}, unset="projector").__get__(None) == {"attention"}


def test_direct_calls_follow_the_instance_stage():
    r = VScan(4, stage="llm_layer")
    with pytest.raises(MissingContextError, match="needs context attention;"):
        r(torch.randn(1, 9, 4))
    out = r(torch.randn(1, 9, 4), context=ReductionContext(attention=torch.rand(1, 1, 9)))
    assert out.indices.shape == (1, 4)


# -- bad declarations -------------------------------------------------------------------------------------


def test_bad_requirement_arguments_name_the_parameter_and_the_choices():
    with pytest.raises(ValueError, match=r"AttentionRows: query='first'; allowed: 'last', 'text'"):
        AttentionRows(query="first")
    with pytest.raises(ValueError, match=r"AttentionRows: layer='next'; allowed: 'previous', 'current'"):
        AttentionRows(layer="next")
    with pytest.raises(ValueError, match=r"TextKeys: layer='K'; allowed: 'previous', 'current'"):
        TextKeys(layer="K")
    with pytest.raises(ValueError, match=r"Need\('cls_attn'\): not a ReductionContext field\. Did you mean 'cls_attention'"):
        Need("cls_attn")
    with pytest.raises(ValueError, match=r"Need\('attention'\): declare AttentionRows\(query=..., layer=...\)"):
        Need("attention")
    with pytest.raises(ValueError, match=r"Need\('keys'\): declare KEYS"):
        Need("keys")
    with pytest.raises(ValueError, match="uniform_count cannot be required"):
        Need("uniform_count")
    with pytest.raises(ValueError, match="names no field"):
        Need()
    with pytest.raises(ValueError, match=r"Provision: queries item='all'"):
        Provision(fields={"attention"}, queries=("all",))


def test_bad_class_declarations_fail_when_the_class_is_made():
    with pytest.raises(TypeError, match=r"requires holds Requirement objects, not 'cls_attention' \(e.g. Need\('cls_attention'\)"):
        reducer_class(("cls_attention",))
    with pytest.raises(TypeError, match=re.escape("requires must be a tuple of requirements; write (Need('grid'),)")):
        reducer_class(GRID)
    with pytest.raises(TypeError, match="sets requires and required_context: set requires only"):
        reducer_class((GRID,), required_context=frozenset({"grid"}))
    with pytest.raises(TypeError, match=r"decoder q/k of two layers \(current, previous\)"):
        reducer_class((AttentionRows(layer="current"), Keys("previous")))
    with pytest.raises(TypeError, match=r"reducer class Probe: attention_query='first'; allowed: 'last', 'text'"):
        reducer_class(required_context=frozenset({"attention"}), attention_query="first")
    with pytest.raises(TypeError, match=r"Need\('cls_attn'\): not a ReductionContext field"):
        reducer_class(required_context=frozenset({"cls_attn"}))
    # Keys follow the attention rows' layer unless they name another.
    follows = reducer_class((AttentionRows(layer="current"), KEYS))
    assert follows.attention_layer == "current"


def test_descriptions_name_the_fields():
    for req in [*PLAIN.values(), AttentionRows("text", "current"), Keys("current"), Need("layer")]:
        text = req.describe()
        assert all(f in text for f in req.fields) and len(text) > len(" ".join(req.fields)) + 10
    assert "every text token after the image" in AttentionRows("text").describe()
    assert "decoder layer K's q/k" in AttentionRows("last", "current").describe()
    assert isinstance(Reducer.requires, tuple) and Reducer.required_context == frozenset()
