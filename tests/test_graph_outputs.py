"""How a replayed graph hands back its outputs (tokenreduce.graphs._pack/_unpack), on CPU tensors:
every output tensor packed into one byte buffer, unpacked as views of one fresh copy of it.
The replays themselves need CUDA (tests/test_gpu_graphs.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenreduce import Reduction, graphs

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool, torch.float64]


@st.composite
def reductions(draw):
    def tensor(shape):
        dtype = draw(st.sampled_from(DTYPES))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
        out = x > 0 if dtype == torch.bool else x.to(dtype)
        if draw(st.booleans()) and out.dim() >= 2:  # a non-contiguous output (a slice, a transpose)
            out = out.transpose(0, 1)
        return out

    b, t = draw(st.integers(0, 3)), draw(st.integers(0, 5))
    info = {f"f{i}": tensor(draw(st.sampled_from([(), (b,), (b, t), (t, b, 2)]))) for i in range(draw(st.integers(0, 4)))}
    info["note"] = draw(st.sampled_from([1.5, "text", None]))
    info["pair"] = (tensor((b, 2)), 3)
    return Reduction(
        tokens=tensor((b, t, 3)),
        indices=tensor((b, t)),
        keep_mask=tensor((b, 7)),
        valid=tensor((b, t)),
        sizes=draw(st.sampled_from([None, "tensor"])) and tensor((b, t)),
        info=info,
    )


@settings(max_examples=60, deadline=None)
@given(out=reductions())
def test_unpacked_outputs_equal_the_graphs_outputs_and_share_one_fresh_buffer(out):
    arena, plan = graphs._pack(out)
    entry = SimpleNamespace(arena=arena, plan=plan, output=out)
    got = graphs._unpack(entry)
    assert graphs._same(got, out)
    leaves: list[torch.Tensor] = []
    graphs._map_tensors(got, leaves.append)
    storages = {v.untyped_storage().data_ptr() for v in leaves}
    assert len(storages) <= 1
    if arena.numel():  # (empty buffers have no memory to tell apart)
        assert arena.untyped_storage().data_ptr() not in storages
    for v in leaves:  # views of their own bytes: writing one changes no other output
        assert v.is_contiguous()
    if leaves:
        before = graphs._clone(got)
        leaves[0].zero_()
        for v, w in zip(leaves[1:], _leaves(before)[1:]):
            assert torch.equal(v, w)
    # A second unpack is a new copy: the first result stays as it was.
    again = graphs._unpack(entry)
    assert graphs._same(again, out)


def _leaves(value) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    graphs._map_tensors(value, found.append)
    return found
