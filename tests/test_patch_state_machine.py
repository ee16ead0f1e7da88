"""Patching is safe: one pipeline per model, a second patch refused, handles restore exactly.

A hypothesis state machine drives a tiny seeded LLaVA-1.5 and a tiny Qwen2-VL through
patch, refused second patches (also of a parent or a submodule), ``remove()`` of any
handle in any order (repeated), forward, short greedy ``generate`` and exceptions or
``KeyboardInterrupt`` raised inside ``apply`` (in its body, or inside a reducer call
during a forward or ``generate``). The models persist across steps and examples, so
whatever a step leaks shows up later.

Invariants:

* while a handle is live, the outputs equal those of an identical twin model freshly
  patched with the same pipeline (no stacking, no state carried over from earlier
  patches or interrupted forwards);
* whenever no handle is live, the logits equal the stock model's bit for bit and the
  module tree equals the stock one: modules, parameters and buffers (names, objects,
  values), every hook dict of every module, the instance ``__dict__`` keys (a stray
  ``forward``) and the functions stored there, the global module hooks, the config.
"""

from __future__ import annotations

import functools
import gc
import weakref
from dataclasses import dataclass
from itertools import chain

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from models import llava_prompt, one_thread, qwen_vl_inputs, seeded_pixels, tiny_llava, tiny_qwen2_vl  # noqa: F401
from torch import nn
from torch.nn.modules import module as torch_module

import tokenreduce
from tokenreduce import Pipeline, Step, create
from tokenreduce.adapter import live_handle
from tokenreduce.errors import AlreadyPatchedError, PluginError
from tokenreduce.reducer import observe

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TOKENS = 2


def step(stage: str, name: str, budget, layer: int | None = None, **params) -> Step:
    return Step(stage, create(name, budget, **params), layer=layer)


# -- the module tree --------------------------------------------------------------------------


@dataclass
class Snapshot:
    modules: list
    tensors: list
    values: dict[str, torch.Tensor]
    global_hooks: tuple
    config: dict


def _attrs(module: nn.Module) -> dict:
    """Instance attributes: every key, and the identity of the plain functions stored there."""
    out = {}
    for key, value in vars(module).items():
        plain_fn = callable(value) and not isinstance(value, (nn.Module, torch.Tensor, type))
        out[key] = id(value) if plain_fn else None
    return out


def _hooks(module: nn.Module) -> dict:
    return {k: {i: id(f) for i, f in v.items()} for k, v in vars(module).items() if "hook" in k and isinstance(v, dict)}


def snapshot(model: nn.Module) -> Snapshot:
    modules = [
        (name, id(m), type(m), m.training, _hooks(m), _attrs(m)) for name, m in model.named_modules(remove_duplicate=False)
    ]
    named = list(chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)))
    glob = tuple(
        len(getattr(torch_module, n, {}))
        for n in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs")
    )
    return Snapshot(
        modules=modules,
        tensors=[(n, id(t)) for n, t in named],
        values={n: t.detach().clone() for n, t in named},
        global_hooks=glob,
        config=model.config.to_dict(),
    )


def tree_differences(stock: Snapshot, now: Snapshot) -> list[str]:
    """What differs, readably (empty when the tree equals stock)."""
    out = []
    if [m[0] for m in now.modules] != [m[0] for m in stock.modules]:
        out.append("named_modules differ")
    for a, b in zip(stock.modules, now.modules):
        name = a[0] or "<root>"
        if a[1:4] != b[1:4]:
            out.append(f"{name}: module object, type or training flag changed")
        if a[4] != b[4]:
            changed = {k: (a[4].get(k), b[4].get(k)) for k in set(a[4]) | set(b[4]) if a[4].get(k) != b[4].get(k)}
            out.append(f"{name}: hooks (stock, now) {changed}")
        if a[5] != b[5]:
            extra = sorted(set(b[5]) - set(a[5]))
            gone = sorted(set(a[5]) - set(b[5]))
            changed = sorted(k for k in set(a[5]) & set(b[5]) if a[5][k] != b[5][k])
            out.append(f"{name}: __dict__ keys added {extra}, removed {gone}, functions replaced {changed}")
    if now.tensors != stock.tensors:
        out.append("parameter/buffer names or objects differ")
    for n, v in stock.values.items():
        if n in now.values and not torch.equal(now.values[n], v):
            out.append(f"{n}: values changed")
    if now.global_hooks != stock.global_hooks:
        out.append(f"global module hooks {stock.global_hooks} -> {now.global_hooks}")
    if now.config != stock.config:
        out.append("config changed")
    return out


# -- the two model families ---------------------------------------------------------------------


def _logits(model: nn.Module, kw: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw).logits


def _generate(model: nn.Module, kw: dict) -> torch.Tensor:
    return model.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False)


def _resolve(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


@dataclass
class Family:
    """One model, the modules an adapter can patch (``targets``), one no adapter handles
    (``foreign``), a few pipelines and the reference outputs of a twin model."""

    model: nn.Module
    inputs: dict
    targets: list[str]
    foreign: str
    pipelines: list[Pipeline]
    stock: Snapshot
    stock_logits: torch.Tensor
    stock_tokens: torch.Tensor
    expected: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]

    def check_outputs(self, live: Live | None, *, generate: bool = False) -> None:
        want = (self.stock_logits, self.stock_tokens) if live is None else self.expected[live.target, live.pipeline]
        if generate:
            assert torch.equal(_generate(self.model, self.inputs), want[1])
        else:
            got = _logits(self.model, self.inputs)
            assert got.shape == want[0].shape and torch.equal(got, want[0])


def _family(build, inputs: dict, targets: list[str], foreign: str, pipelines: list[Pipeline]) -> Family:
    model, twin = build(0), build(0)
    # Stock runs first, so that whatever transformers sets up lazily is in the stock snapshot.
    stock_logits, stock_tokens = _logits(model, inputs), _generate(model, inputs)
    assert torch.equal(_logits(twin, inputs), stock_logits)
    expected = {}
    for t, path in enumerate(targets):
        for p, pipe in enumerate(pipelines):
            with tokenreduce.apply(_resolve(twin, path), pipe):
                expected[t, p] = (_logits(twin, inputs), _generate(twin, inputs))
            assert expected[t, p][0].shape[1] < stock_logits.shape[1]  # really reduced
    return Family(model, inputs, targets, foreign, pipelines, snapshot(model), stock_logits, stock_tokens, expected)


def _llava() -> Family:
    images = [1, 2]
    ids, mask = llava_prompt(images)
    pixels = torch.stack([seeded_pixels((3, 24, 24), r, i) for r, n in enumerate(images) for i in range(n)])
    pipelines = [
        Pipeline([step("vision_encoder", "pool", 16), step("projector", "random", 9, seed=3)]),
        Pipeline([step("llm_layer", "fastv", 0.5, layer=2)]),
        Pipeline(
            [step("projector", "random", 12, seed=1), step("llm_layer", "random", 3, layer=3, seed=4)],
            positions="original",
        ),
    ]
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    return _family(tiny_llava, inputs, [""], "model.language_model", pipelines)


def _qwen() -> Family:
    pipelines = [
        Pipeline([step("vision_encoder", "pool", 5), step("projector", "random", 3, seed=2)]),
        Pipeline([step("llm_layer", "fastv", 0.5, layer=1)]),
        Pipeline(
            [step("projector", "random", 4, seed=5), step("llm_layer", "random", 2, layer=2, seed=6)],
            positions="compact",
        ),
    ]
    inputs = qwen_vl_inputs([[(8, 12), (4, 4)], [(6, 6)]])
    # The ForConditionalGeneration and its inner Qwen2VLModel both have an adapter.
    return _family(tiny_qwen2_vl, inputs, ["", "model"], "model.visual", pipelines)


@functools.cache
def families() -> dict[str, Family]:
    with torch.no_grad():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return {"llava": _llava(), "qwen2-vl": _qwen()}
        finally:
            torch.set_num_threads(before)


# -- the state machine ----------------------------------------------------------------------------

NAMES = st.sampled_from(["llava", "qwen2-vl"])
EXCEPTIONS = st.sampled_from([RuntimeError, KeyboardInterrupt])


@dataclass
class Live:
    handle: tokenreduce.Handle
    target: int
    pipeline: int


class PatchMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.fams = families()
        self.handles: list[tokenreduce.Handle] = []
        self.live: dict[str, Live | None] = dict.fromkeys(self.fams)

    def _target(self, name: str, t: int) -> tuple[int, nn.Module]:
        fam = self.fams[name]
        t %= len(fam.targets)
        return t, _resolve(fam.model, fam.targets[t])

    def _refused(self, name: str, err: AlreadyPatchedError) -> None:
        live = self.live[name]
        msg = str(err)
        assert "already patched by" in msg or "patched by handle" in msg, msg
        assert f"handle #{live.handle.number} " in msg and live.handle.where in msg, msg
        assert "test_patch_state_machine.py" in live.handle.where

    @rule(name=NAMES, t=st.integers(0, 1), p=st.integers(0, 2))
    def patch(self, name, t, p):
        fam = self.fams[name]
        t, module = self._target(name, t)
        if self.live[name] is not None:
            with pytest.raises(AlreadyPatchedError) as err:
                tokenreduce.patch(module, fam.pipelines[p])
            self._refused(name, err.value)
            event("patch: refused")
            return
        event("patch: applied")
        handle = tokenreduce.patch(module, fam.pipelines[p])
        assert handle.live and live_handle(module) is handle
        self.handles.append(handle)
        self.live[name] = Live(handle, t, p)

    @rule(name=NAMES, p=st.integers(0, 2))
    def patch_a_part_no_adapter_handles(self, name, p):
        fam = self.fams[name]
        part = fam.model.get_submodule(fam.foreign)
        # A patched parent is named first; otherwise the registry says no adapter fits.
        with pytest.raises(AlreadyPatchedError if self.live[name] else PluginError) as err:
            tokenreduce.patch(part, fam.pipelines[p])
        if self.live[name]:
            self._refused(name, err.value)

    @rule(i=st.integers(0, 1000), twice=st.booleans())
    def remove(self, i, twice):
        if not self.handles:  # (a precondition instead makes hypothesis discard examples)
            return
        handle = self.handles[i % len(self.handles)]
        event("remove: live handle" if handle.live else "remove: removed handle")
        handle.remove()
        if twice:
            handle.remove()
        assert not handle.live
        for name, live in self.live.items():
            if live is not None and live.handle is handle:
                self.live[name] = None

    @rule(name=NAMES, twice=st.booleans())
    def remove_the_live_handle(self, name, twice):
        live = self.live[name]
        if live is None:
            return
        event("remove: live handle")
        live.handle.remove()
        if twice:
            live.handle.remove()
        self.live[name] = None

    @rule(name=NAMES)
    def forward(self, name):
        self.fams[name].check_outputs(self.live[name])

    @rule(name=NAMES)
    def generate(self, name):
        self.fams[name].check_outputs(self.live[name], generate=True)

    @rule(name=NAMES, exc=EXCEPTIONS, call=st.integers(1, 2), in_generate=st.booleans())
    def interrupt_a_patched_forward(self, name, exc, call, in_generate):
        """An exception from the ``call``-th reducer call of a forward or ``generate``."""
        fam = self.fams[name]
        raised = _interrupted(fam, exc, call, in_generate)
        event(f"interrupted forward: {'raised' if raised else 'no reducer call ' + str(call)}")
        if self.live[name] is None:
            assert not raised  # the stock model calls no reducer

    @rule(name=NAMES, t=st.integers(0, 1), p=st.integers(0, 2), exc=EXCEPTIONS, where=st.sampled_from(["body", "forward", "generate"]))
    def raise_inside_apply(self, name, t, p, exc, where):
        fam = self.fams[name]
        t, module = self._target(name, t)
        if self.live[name] is not None:
            with pytest.raises(AlreadyPatchedError) as err:
                with tokenreduce.apply(module, fam.pipelines[p]):
                    pytest.fail("the body of a refused apply() ran")
            self._refused(name, err.value)
            event("apply: refused")
            return
        event(f"apply: raised in {where}")
        with pytest.raises(exc):
            with tokenreduce.apply(module, fam.pipelines[p]) as handle:
                assert live_handle(module) is handle
                if where == "body":
                    fam.check_outputs(Live(handle, t, p))
                else:  # the patched model calls at least one reducer: this raises
                    _run_raising(fam, exc, 1, where == "generate")
                raise exc("raised inside apply")
        assert not handle.live and live_handle(module) is None

    @invariant()
    def stock_whenever_no_handle_is_live(self):
        for name, fam in self.fams.items():
            live = self.live[name]
            if live is None:
                assert all(live_handle(_resolve(fam.model, p)) is None for p in fam.targets)
                assert tree_differences(fam.stock, snapshot(fam.model)) == []
                fam.check_outputs(None)
            else:
                assert live_handle(_resolve(fam.model, fam.targets[live.target])) is live.handle

    def teardown(self):
        for handle in self.handles:
            handle.remove()
        dirty = {name: tree_differences(fam.stock, snapshot(fam.model)) for name, fam in self.fams.items()}
        if any(dirty.values()):
            # Fresh models for the next example, so that hypothesis can replay this one.
            families.cache_clear()
        assert dirty == dict.fromkeys(self.fams, [])
        for fam in self.fams.values():
            fam.check_outputs(None)


def _run_raising(fam: Family, exc: type[BaseException], call: int, in_generate: bool) -> None:
    """Run a forward (or ``generate``) whose ``call``-th reducer call raises ``exc``."""
    calls = []

    def boom(*_):
        calls.append(1)
        if len(calls) == call:
            raise exc("raised inside a reducer call")

    with observe(boom):
        if in_generate:
            _generate(fam.model, fam.inputs)
        else:
            _logits(fam.model, fam.inputs)


def _interrupted(fam: Family, exc: type[BaseException], call: int, in_generate: bool) -> bool:
    """:func:`_run_raising`; whether the exception came."""
    try:
        _run_raising(fam, exc, call, in_generate)
    except exc:
        return True
    return False


PatchMachine.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_patch_state_machine = PatchMachine.TestCase


# -- the reported cases, one by one ---------------------------------------------------------------


def test_nested_apply_is_refused_and_the_outer_pipeline_kept():
    fam = families()["llava"]
    a, b = fam.pipelines[0], fam.pipelines[2]
    for inner in (a, b):  # same pipeline or another one
        with tokenreduce.apply(fam.model, a) as outer:
            with pytest.raises(AlreadyPatchedError, match=r"already patched by handle #\d+ .*projector: random"):
                with tokenreduce.apply(fam.model, inner):
                    pytest.fail("the inner body ran")
            assert outer.live
            fam.check_outputs(Live(outer, 0, 0))
        fam.check_outputs(None)


def test_second_patch_refused_and_removal_in_any_order_restores():
    fam = families()["llava"]
    h1 = tokenreduce.patch(fam.model, fam.pipelines[0])
    with pytest.raises(AlreadyPatchedError):
        tokenreduce.patch(fam.model, fam.pipelines[1])
    h1.remove()
    h1.remove()
    assert "forward" not in vars(fam.model) and "generate" not in vars(fam.model)
    assert tree_differences(fam.stock, snapshot(fam.model)) == []
    fam.check_outputs(None)
    with tokenreduce.apply(fam.model, fam.pipelines[1]) as h2:  # a new patch works
        fam.check_outputs(Live(h2, 0, 1))
    fam.check_outputs(None)


def test_parent_and_submodule_of_a_patched_model_are_refused():
    fam = families()["qwen2-vl"]
    top, inner = fam.model, fam.model.model
    for first, second, words in ((inner, top, "its submodule 'model'"), (top, inner, "it is the submodule 'model'")):
        with tokenreduce.apply(first, fam.pipelines[0]):
            with pytest.raises(AlreadyPatchedError, match=words):
                tokenreduce.patch(second, fam.pipelines[1])
        fam.check_outputs(None)


def test_a_dropped_handle_is_found_again_and_a_dropped_model_freed():
    model = tiny_llava(0)
    tokenreduce.patch(model, step("projector", "random", 4))  # handle not kept
    gc.collect()
    handle = live_handle(model)
    assert handle is not None and handle.live
    with pytest.raises(AlreadyPatchedError, match="test_patch_state_machine.py"):
        tokenreduce.patch(model, step("projector", "random", 4))
    handle.remove()
    assert live_handle(model) is None
    # The registry holds no strong reference: a patched model that is dropped is freed.
    tokenreduce.patch(model, step("projector", "random", 4))
    ref = weakref.ref(model)
    del model, handle
    gc.collect()
    assert ref() is None


def test_interrupted_attach_is_rolled_back(monkeypatch):
    from tokenreduce_plugins.adapters.decoder import DecoderReduction

    fam = families()["llava"]

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(DecoderReduction, "attach", interrupted)
    with pytest.raises(KeyboardInterrupt):  # the forward wrapper was installed before this
        tokenreduce.patch(fam.model, fam.pipelines[2])
    monkeypatch.undo()
    assert live_handle(fam.model) is None
    assert tree_differences(fam.stock, snapshot(fam.model)) == []
    fam.check_outputs(None)
