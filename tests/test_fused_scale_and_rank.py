"""The fused Triton forms of ``numerics.safe_scale`` (``tokenreduce.scale_kernels``) and of a stable
sort's ranks (``tokenreduce_plugins.kernels.rank``) against their torch forms.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (tests/triton_kernels.py);
with CUDA the same property tests run the compiled kernels, and the CUDA-only tests check the
dispatch (``TOKENREDUCE_NO_TRITON`` toggled: the same reductions from the video reducers), that
the wrappers never synchronise, and that a CUDA graph captures them. Skipped where Triton is not
installed (CI).

``safe_scale`` must be equal bit for bit (scales and quotients), subnormal and huge peaks, padded
and empty rows included; ranks and orders must equal a stable sort's, ties, NaN and infinities
included (``-0.0`` and ``+0.0`` compare equal, as in CPU's sort).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_kernels import CUDA, DEVICE, cuda_only, import_kernels, numpy_mark, skip_unless_interpreted, torch_loop

triton, scale_kernels, rank, dpc = import_kernels("tokenreduce.scale_kernels", "rank", "dpc")

import tokenreduce as tr  # noqa: E402
from tokenreduce import fused, graphs, numerics  # noqa: E402
from tokenreduce.sync import no_host_sync  # noqa: E402
from tokenreduce_plugins.holitom_ops import dpc_clusters  # noqa: E402
from tokenreduce_plugins.prunevid_cluster import dpc_knn  # noqa: E402

skip_unless_interpreted(
    triton, [scale_kernels._peak_kernel, scale_kernels._divide_kernel, rank.stable_rank_kernel, dpc.dpc_centres_kernel]
)
pytestmark = numpy_mark(triton)

PROPS = settings(max_examples=30 if not CUDA else 80, deadline=None, derandomize=True, database=None)


def torch_scale(tokens: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    with torch_loop():
        return numerics.safe_scale(tokens, valid)


@st.composite
def scaled_tokens(draw):
    """``(tokens, valid)``: rows of very different magnitudes (subnormal, huge, zero), maybe padded."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    b, n, d = draw(st.integers(1, 3)), draw(st.integers(1, 24)), draw(st.integers(1, 700))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(b, n, d, generator=gen)
    lo, hi = {torch.float16: (-14, 14), torch.float32: (-140, 120), torch.bfloat16: (-125, 120)}[dtype]
    powers = torch.tensor([float(draw(st.integers(lo, hi))) for _ in range(b)])
    x = (x.double() * torch.exp2(powers.double()).view(-1, 1, 1)).to(dtype)
    if draw(st.booleans()):
        x[draw(st.integers(0, b - 1))] = 0.0  # a zero row: scale 1
    if draw(st.booleans()):  # an exact power of two, and just below one, as a row's peak
        x[0, 0, 0] = 2.0 ** draw(st.integers(lo, hi))
    valid = None
    if draw(st.booleans()):
        valid = torch.rand(b, n, generator=gen) > draw(st.sampled_from([0.0, 0.3, 1.0]))
    return x.to(DEVICE), None if valid is None else valid.to(DEVICE)


@PROPS
@given(case=scaled_tokens())
def test_fused_safe_scale_equals_the_torch_form_bit_for_bit(case):
    tokens, valid = case
    got = scale_kernels.safe_scale(tokens, valid)
    assert got is not None
    want = torch_scale(tokens, valid)
    assert torch.equal(got[1], want[1])
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0])


def test_fused_safe_scale_declines_what_it_does_not_take():
    x = torch.randn(2, 3, 4, device=DEVICE)
    assert scale_kernels.safe_scale(x.double(), None) is None
    assert scale_kernels.safe_scale(x.transpose(1, 2), None) is None  # not contiguous
    assert scale_kernels.safe_scale(x[:, :0], None) is None
    assert scale_kernels.safe_scale(x, torch.ones(2, 4, dtype=torch.bool, device=DEVICE)) is None  # mask's shape


@st.composite
def keys(draw):
    """Rows of keys with ties: few distinct values, NaN, infinities, signed zeros; any integer or float dtype."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool]))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    length = draw(st.sampled_from([1, 2, 15, 16, 17, 33, 130, 577]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    distinct = draw(st.sampled_from([2, 5, 1000]))
    x = torch.randint(-distinct, distinct, (*lead, length), generator=gen)
    if dtype == torch.bool:
        return (x > 0).to(DEVICE)
    if dtype == torch.uint8:
        return x.abs().to(torch.uint8).to(DEVICE)
    if dtype.is_floating_point:
        x = x.to(dtype) / 3
        flat = x.view(-1)
        for value in draw(st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 0.0]), max_size=8)):
            flat[torch.randint(0, flat.numel(), (1,), generator=gen)] = value
    return x.to(dtype).to(DEVICE)


@PROPS
@given(key=keys(), descending=st.booleans())
def test_fused_rank_and_order_equal_a_stable_sorts(key, descending):
    got = rank.stable_rank_order(key, descending)
    assert got is not None
    cpu = key.cpu()
    order = torch.sort(cpu, dim=-1, descending=descending, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1]).expand_as(order))
    assert torch.equal(got[1].cpu(), order)
    assert torch.equal(got[0].cpu(), ranks)


def test_fused_rank_declines_long_rows_and_empty_tensors():
    assert rank.stable_rank_order(torch.zeros(1, rank.MAX_L + 1, device=DEVICE), False) is None
    assert rank.stable_rank_order(torch.zeros(2, 0, device=DEVICE), False) is None
    assert rank.stable_rank_order(torch.zeros(3, dtype=torch.complex64, device=DEVICE), False) is None


@st.composite
def clustering(draw):
    """``(dist, mask, clusters, k)``: distances of tied points (rounded coordinates, duplicates), made a
    little asymmetric (as Gram forms can be), a mask or none, centres per set (a tensor or an int)."""
    p, n = draw(st.integers(1, 4)), draw(st.sampled_from([1, 2, 5, 16, 36, 50, 128]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(p, n, 3, generator=gen)
    if draw(st.booleans()):
        x = x.round()  # equal distances, equal densities
    dist = torch.cdist(x, x)
    if draw(st.booleans()):
        dist = dist + 1e-3 * torch.rand(p, n, n, generator=gen) * (dist > 0)
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(p, n, generator=gen) > draw(st.sampled_from([0.0, 0.3, 0.8]))
    members = mask.sum(dim=1) if mask is not None else torch.full((p,), n)
    if draw(st.booleans()):
        clusters = (torch.rand(p, generator=gen) * (members + 1)).long().clamp(max=members)
    else:
        clusters = draw(st.integers(0, int(members.min())))
    return dist.to(DEVICE), None if mask is None else mask.to(DEVICE), clusters, draw(st.integers(1, 7))


def _forced(function, *args, **kwargs):
    """``function`` with the fusion gate open (the interpreted kernels on CPU), and the kernel's calls."""
    calls = []
    real = dpc.dpc_centres
    with (
        mock.patch.object(fused, "triton_wanted", lambda v: True),
        mock.patch.object(dpc, "dpc_centres", lambda *a, **k: calls.append(1) or real(*a, **k)),
    ):
        return function(*args, **kwargs), calls


@PROPS
@given(case=clustering())
def test_fused_dpc_centres_equal_prunevids_torch_ops(case):
    dist, mask, clusters, k = case
    clusters = clusters.to(DEVICE) if isinstance(clusters, torch.Tensor) else clusters
    with torch_loop():
        want = dpc_knn(None, mask, clusters, k, dist=dist)
    got, calls = _forced(dpc_knn, None, mask, clusters, k, dist=dist)
    assert calls
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@PROPS
@given(case=clustering())
def test_fused_dpc_centres_equal_holitoms_torch_ops(case):
    dist, mask, clusters, k = case
    p, n, _ = dist.shape
    member = mask if mask is not None else torch.ones(p, n, dtype=torch.bool, device=DEVICE)
    clusters = torch.as_tensor(clusters).expand(p).clamp(max=member.sum(dim=1).cpu()).to(DEVICE)
    neighbours = clusters.clamp(min=1)
    with torch_loop():
        want = dpc_clusters(None, member, clusters, neighbours, dist=dist, max_neighbours=k)
    got, calls = _forced(dpc_clusters, None, member, clusters, neighbours, dist=dist, max_neighbours=k)
    assert calls
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fused_dpc_centres_decline_large_sets():
    dist = torch.zeros(1, dpc.MAX_N + 1, dpc.MAX_N + 1, device=DEVICE)
    assert dpc.dpc_centres(dist, dist[:, 0], None, 1, by_rank=True) is None


# -- the reducers through the kernels --------------------------------------------------------------


#: Reducers whose calls run the kernels, at their published stage.
REDUCERS = {
    "prunevid": tr.Stage.PROJECTOR,
    "holitom": tr.Stage.PROJECTOR,
    "fastvid": tr.Stage.PROJECTOR,
    "tome": tr.Stage.PROJECTOR,
    "dart": tr.Stage.LLM_LAYER,
    "apet-llava": tr.Stage.PROJECTOR,
}


def _case(name: str, dtype: torch.dtype, device: str):
    from test_graph_safe import make_case

    stage = REDUCERS[name]
    x, context, budget, params = make_case(
        name, stage, b=2, side=8, frames=4, d=24, dtype=dtype, seed=1, duplicate=False, budget=0.25, device=device
    )
    return tr.create(name, budget, stage=stage, **params), x, context


@pytest.mark.skipif(CUDA, reason="CUDA runs the compiled kernels: the test below")
@pytest.mark.parametrize("name", [n for n in REDUCERS if not n.startswith("apet")])  # ApET scales so on CUDA only
def test_reducers_dispatch_to_the_interpreted_kernels_and_keep_the_same_results(name):
    """On CPU, with the gate forced open, ``numerics.safe_scale``, the ranks and the DPC centres run the
    interpreted kernels; every output equals the torch form's (CPU's sort: signed zeros equal)."""
    from test_video_reducer_cost import outputs, same

    reducer, x, context = _case(name, torch.bfloat16, "cpu")
    want = reducer(x, context=context)
    calls = []
    real = (scale_kernels.safe_scale, rank.stable_rank_order, dpc.dpc_centres)
    with (
        mock.patch.object(fused, "triton_wanted", lambda v: True),
        mock.patch.object(scale_kernels, "safe_scale", lambda *a: calls.append("scale") or real[0](*a)),
        mock.patch.object(rank, "stable_rank_order", lambda *a: calls.append("rank") or real[1](*a)),
        mock.patch.object(dpc, "dpc_centres", lambda *a, **k: calls.append("dpc") or real[2](*a, **k)),
    ):
        got = reducer(x, context=context)
    assert "scale" in calls
    assert ("rank" in calls) == (name != "tome")
    assert ("dpc" in calls) == (name in ("prunevid", "holitom"))
    same(outputs(got), outputs(want), name)


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(REDUCERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reducers_keep_the_same_tokens_with_and_without_the_kernels(name, dtype):
    reducer, x, context = _case(name, dtype, "cuda")
    with graphs.eager():
        got = reducer(x, context=context)
        with torch_loop():
            want = reducer(x, context=context)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.tokens, want.tokens)


@cuda_only
@pytest.mark.gpu
def test_the_kernels_read_nothing_back_and_are_captured():
    x = torch.randn(2, 40, 64, device="cuda").bfloat16()
    key = torch.randn(3, 50, device="cuda")
    with no_host_sync():
        scale_kernels.safe_scale(x, None)
        rank.stable_rank_order(key, True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scaled, _ = scale_kernels.safe_scale(x, None)
        ranks, _ = rank.stable_rank_order(key, True)
    x.mul_(2.0**50)
    key.neg_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(scaled, torch_scale(x, None)[0])
    assert torch.equal(ranks, rank.stable_rank_order(key, True)[0])
