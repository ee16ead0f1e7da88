"""The encoder-side engine (``plugins/adapters/units.py``) on its own: properties over random unit layouts.

Whatever the units (lengths, grids, per-unit budgets, whole videos), one step keeps exactly
``min(budget, n)`` tokens per unit (none for a budget of 0), every kept token comes from its
own unit, units stay in their flat order, an identity step hands back the very input tensor,
and a unit's grid survives only while it is intact. ``Units.from_grids`` lays items out as the
adapters need (frames or whole videos).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenreduce import Step, create
from tokenreduce.errors import ConfigError
from tokenreduce_plugins.adapters.engine import Family
from tokenreduce_plugins.adapters.units import ContextSource, Units, call_reducer, encoder_steps, keep_mask, run_step

unit_layouts = st.lists(
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.sampled_from([None, 0, 1, 2, 3, 5])), min_size=1, max_size=6
)


def layout(units_spec):
    """Units of h x w tokens each (grid while intact) with per-unit budgets (None: the step's)."""
    lens = [h * w for h, w, _ in units_spec]
    item = torch.arange(len(lens))
    return Units(lens, [(h, w) for h, w, _ in units_spec], item, item, budgets=[b for _, _, b in units_spec])


@settings(max_examples=60, deadline=None)
@given(spec=unit_layouts, reducer=st.sampled_from(["random", "pool"]), budget=st.integers(1, 6), seed=st.integers(0, 9))
def test_a_step_keeps_min_budget_n_per_unit_from_its_own_tokens(spec, reducer, budget, seed):
    units = layout(spec)
    flat = torch.randn(sum(units.lens), 5, generator=torch.Generator().manual_seed(seed))
    step = Step("projector", create(reducer, budget=budget, seed=seed) if reducer == "random" else create(reducer, budget=budget))
    offsets0 = units.offsets(flat.device)
    res = run_step(step, call_reducer, flat, units, ContextSource(), None, offsets0)
    expect = [0 if b == 0 else min(b if b is not None else budget, n) for n, b in zip(units.lens, units.budgets)]
    assert res.units.lens == expect and res.lens_in == units.lens
    unit_of_out = torch.repeat_interleave(torch.arange(units.count), torch.tensor(res.units.lens))
    unit_of_src = torch.repeat_interleave(torch.arange(units.count), torch.tensor(units.lens))[res.source]
    assert torch.equal(unit_of_out, unit_of_src)  # every kept token comes from its own unit, units in order
    assert res.units.grids == [g if a == n else None for g, a, n in zip(units.grids, res.units.lens, units.lens)]
    if res.identity:
        assert res.tokens is flat
    elif reducer == "random":  # a selection: the kept features are the source tokens
        assert torch.equal(res.tokens, flat[res.source])


@settings(max_examples=40, deadline=None)
@given(spec=unit_layouts, budget=st.integers(1, 6))
def test_two_stages_compose_their_sources_and_project_once(spec, budget):
    units = layout([(h, w, None) for h, w, _ in spec])
    flat = torch.randn(sum(units.lens), 4)
    calls = []

    def project(x, _units, reduced):
        calls.append(reduced)
        return x * 2

    steps = {s.stage: s for s in (Step("vision_encoder", create("random", budget=budget + 1, seed=1)),
                                  Step("projector", create("random", budget=budget, seed=2)))}
    seen = []
    out, out_units, original = encoder_steps(steps, call_reducer, flat, units, project, ContextSource(),
                                             lambda step, res, orig: seen.append(orig))
    assert len(calls) == 1 and len(seen) == 2
    assert out_units.lens == [min(budget, n) for n in units.lens]
    kept = original if original is not None else torch.arange(flat.shape[0])
    assert torch.equal(out, flat[kept] * 2)  # selections only: projected originals
    keep = keep_mask(original, flat.shape[0], flat.device)
    assert int(keep.sum()) == sum(out_units.lens)


@settings(max_examples=60, deadline=None)
@given(items=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.booleans()), min_size=1, max_size=4),
       per_video=st.booleans(), video=st.booleans())
def test_from_grids_lays_out_frames_or_whole_videos(items, per_video, video):
    specs = [((t * h * w) if good else t * h * w + 1, (t, h, w)) for t, h, w, good in items]
    units = Units.from_grids(specs, per_video, video, torch.zeros(sum(n for n, _ in specs), dtype=torch.long))
    for i, (n, (t, h, w)) in enumerate(specs):
        mine = [u for u in range(units.count) if int(units.item[u]) == i]
        assert sum(units.lens[u] for u in mine) == n
        if n != t * h * w:  # grid and tokens disagree: one unit, no grid
            assert len(mine) == 1 and units.grids[mine[0]] is None
        elif per_video or t == 1:
            assert len(mine) == 1 and units.grids[mine[0]] == (t * h, w)
            assert units.frames[mine[0]] == ((t, h * w) if per_video and video else None)
        else:
            assert len(mine) == t and all(units.grids[u] == (h, w) for u in mine)


def test_a_bad_family_row_names_the_field():
    with pytest.raises(ConfigError, match="positions='first'"):
        Family("x", ("X",), positions="first")
    with pytest.raises(ConfigError, match="placeholders"):
        Family("x", ("X",), placeholders=(("image",),))
