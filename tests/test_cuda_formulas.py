"""The CUDA formulations of reducer steps (issue 19, reducer cost at batch 8), checked on CPU.

On CUDA some steps compute the same quantity from fewer passes over ``(B, N, D)`` or from a
GEMM instead of ``torch.cdist``'s direct kernel (:func:`tokenreduce.ops.cuda_formulas`):
cosine similarities from one product divided by the norms, Euclidean distances through a
product, ApET's FPS distances and reconstruction errors from products at large inputs,
ToMe's fused merge, DART's batched pivot similarities. CPU keeps the exact forms (the
faithfulness fixtures). :func:`tokenreduce.ops.emulate_cuda_formulas` makes CPU tensors take
the CUDA forms, so here they are checked without a GPU: exact where the arithmetic is exact
(integer-grid inputs), equal kept sets on random inputs, the conformance kit, and no host
read (CUDA-graph safe). The GPU tests at the end compare the CUDA run with the CPU one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce import ReductionContext, graphs, ops
from tokenreduce.numerics import SAFE_PEAK, safe_scale
from tokenreduce.sync import no_host_sync
from tokenreduce.testing import check_reducer
from tokenreduce_plugins import apet as apet_module
from tokenreduce_plugins.apet import ApET, reconstruction_errors
from tokenreduce_plugins.apet_basis import farthest_point_sampling
from tokenreduce_plugins.dart import DART
from tokenreduce_plugins.holov import HoloV
from tokenreduce_plugins.sparsevlm import SparseVLM
from tokenreduce_plugins.tome import ToMe
from tokenreduce_plugins.visionzip import VisionZip
from tokenreduce_plugins.vscan import VScan

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- the switch ------------------------------------------------------------------------------------


def test_emulation_is_scoped_and_cuda_tensors_always_take_the_cuda_forms():
    x = torch.zeros(1, 2, 3)
    assert not ops.cuda_formulas(x)
    with pytest.raises(RuntimeError), ops.emulate_cuda_formulas():
        assert ops.cuda_formulas(x)
        raise RuntimeError("left by an error")
    assert not ops.cuda_formulas(x)


def test_full_float32_turns_tf32_off_on_cuda_only_and_restores_it():
    backend = torch.backends.cuda.matmul
    before = backend.allow_tf32
    try:
        backend.allow_tf32 = True
        with ops.full_float32(torch.device("cpu")):
            assert backend.allow_tf32  # nothing to do on CPU
        with ops.full_float32(torch.device("cuda")):
            assert not backend.allow_tf32
        assert backend.allow_tf32
    finally:
        backend.allow_tf32 = before


# -- shared ops ------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    m=st.integers(1, 20),
    k=st.integers(1, 20),
    d=st.integers(1, 48),
    zero=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cosine_similarity_from_one_product_equals_the_normalised_product(b, m, k, d, zero, seed):
    gen = torch.Generator().manual_seed(seed)
    a, c = torch.randn(b, m, d, generator=gen) * 3, torch.randn(b, k, d, generator=gen)
    if zero:
        a[:, 0] = 0.0  # a zero vector has similarity 0, not NaN
    exact = ops.cosine_similarity(a, c)
    with ops.emulate_cuda_formulas():
        product = ops.cosine_similarity(a, c)
    assert product.shape == (b, m, k) and product.dtype == torch.float32
    torch.testing.assert_close(product, exact, rtol=1e-5, atol=1e-6)
    if zero:
        assert bool((product[:, 0] == 0).all())


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    log_m=st.integers(0, 5),
    d=st.integers(1, 32),
    dup=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_euclidean_distances_through_a_product_are_exact_where_the_arithmetic_is(b, log_m, d, dup, seed):
    # Small integers and a power-of-two count: the mean, the centred tokens and every product
    # are exact in float32, so both forms are the exact distances but for the square root's
    # last bit (each form's sqrt rounds its own way), and duplicates are exactly 0.
    m = 2**log_m
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 9, (b, m, d), generator=gen).float()
    if dup and m > 1:
        x[:, -1] = x[:, 0]
    exact = ops.euclidean_distances(x)
    with ops.emulate_cuda_formulas():
        product = ops.euclidean_distances(x)
    truth = (x.double().unsqueeze(2) - x.double().unsqueeze(1)).square().sum(-1).sqrt().float()
    torch.testing.assert_close(product, truth, rtol=2.5e-7, atol=0)
    torch.testing.assert_close(exact, truth, rtol=2.5e-7, atol=0)
    assert bool((product.diagonal(dim1=1, dim2=2) == 0).all())
    if dup and m > 1:
        assert bool((product[:, 0, -1] == 0).all())


def test_euclidean_distances_through_a_product_keep_small_distances_of_large_shared_components():
    # A component every token shares (a decoder's massive activations) would swamp |x|^2 and
    # the rounding of the expansion; centring removes it.
    gen = torch.Generator().manual_seed(5)
    spread = torch.randn(2, 40, 256, generator=gen)
    x = spread + 1e3 * torch.randn(2, 1, 256, generator=gen)
    with ops.emulate_cuda_formulas():
        product = ops.euclidean_distances(x)
    truth = torch.cdist(spread.double(), spread.double())
    torch.testing.assert_close(product.double(), truth, rtol=1e-3, atol=1e-2)


def _safe_scale_reference(tokens, valid):
    # The previous form: widen, two reductions for the peak, divide, mask.
    x = tokens.float()
    peak = torch.maximum(x.amax(dim=-1), x.amin(dim=-1).neg())
    if valid is not None:
        peak = peak.masked_fill(~valid, 0.0)
    peak = peak.amax(dim=1)
    out = (peak > SAFE_PEAK) | ((peak < 1.0 / SAFE_PEAK) & (peak > 0))
    scale = torch.exp2(torch.where(out, torch.floor(torch.log2(peak)), torch.zeros_like(peak))).view(-1, 1, 1)
    x = x / scale
    if valid is not None:
        x = x.masked_fill(~valid.unsqueeze(-1), 0.0)
    return x, scale


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    magnitude=st.sampled_from([1.0, 1e-30, 1e-39, 1e20, 3e37]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_safe_scale_in_one_pass_gives_the_bits_of_widening_dividing_and_masking(dtype, magnitude, masked, seed):
    if dtype == torch.float16:
        magnitude = min(magnitude, 1e4) if magnitude >= 1 else 1e-3
    gen = torch.Generator().manual_seed(seed)
    tokens = (torch.randn(3, 17, 9, generator=gen, dtype=torch.float64) * magnitude).to(dtype)
    tokens[1] = 0.0
    valid = (torch.rand(3, 17, generator=gen) < 0.7) if masked else None
    x, scale = safe_scale(tokens, valid)
    want_x, want_scale = _safe_scale_reference(tokens, valid)
    assert x.dtype == torch.float32 and torch.equal(scale, want_scale)
    assert torch.equal(x, want_x) and torch.equal(x.signbit(), want_x.signbit())


@pytest.mark.parametrize("peak", [2.0**41 * (1 - 2**-24), 2.0**40 * (1 + 2**-23), 2.0**-40 * (1 - 2**-24), 2.0**-149,
                                  3e38, 2.0**40, 2.0**-40, 1.0])
def test_safe_scale_brings_out_of_range_peaks_into_one_to_two_exactly(peak):
    # Just below a power of two, float32's log2 rounds up to the integer (floor(log2) would
    # then leave the peak in [0.5, 1)); frexp's exponent is exact. In range: scale 1.
    tokens = torch.tensor([[[peak, -peak / 2], [0.0, peak / 4]]])
    x, scale = safe_scale(tokens)
    top = float(x.abs().max())
    if 2.0**-40 <= peak <= 2.0**40:
        assert float(scale) == 1.0 and top == peak
    else:
        assert 1.0 <= top < 2.0 and torch.equal(x * scale, tokens)


# -- ApET's product forms --------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    n=st.integers(2, 60),
    d=st.integers(1, 24),
    k=st.integers(1, 12),
    pad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fps_by_products_picks_as_the_reference_where_the_arithmetic_is_exact(b, n, d, k, pad, seed):
    # Integer tokens: |x|^2 + |c|^2 - 2 x.c is exact, so the picks (ties too) are the reference's.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-20, 21, (b, n, d), generator=gen).float()
    valid = torch.ones(b, n, dtype=torch.bool)
    if pad:
        valid[:, n // 2 :] = torch.rand(b, n - n // 2, generator=gen) < 0.5
    # Distinct tokens: with duplicates the product form ranks them at rounding level (documented).
    distinct = min(int(torch.unique(x[r][valid[r]], dim=0).shape[0]) for r in range(b))
    k = min(k, distinct)
    if k < 1:
        return
    sq = x.square().sum(-1)
    ref = farthest_point_sampling(x, valid, k, fused=False)
    assert torch.equal(farthest_point_sampling(x, valid, k, fused=True, sq_norms=sq), ref)


@pytest.mark.parametrize("ridge", [1e-5, 1e-1])
@pytest.mark.parametrize("case", ["random", "shared_component", "duplicated_basis", "wide_basis"])
def test_projection_errors_equal_the_residual_norms(ridge, case):
    gen = torch.Generator().manual_seed(11)
    b, n, d, k = 2, 300, 64, 6
    x = torch.randn(b, n, d, generator=gen)
    if case == "shared_component":
        x = x * 0.3 + 5.0 * torch.randn(b, 1, d, generator=gen)
    if case == "wide_basis":  # the basis spans every token: all errors are (near) zero
        d = k
        x = torch.randn(b, n, d, generator=gen)
    basis = x[:, :k].clone()
    if case == "duplicated_basis":  # a singular Gram matrix: the fallback ridge
        basis[:, 1] = basis[:, 0]
    r = torch.full((b,), ridge)
    exact = reconstruction_errors(x, basis, r)
    product = reconstruction_errors(x, basis, r, sq_norms=x.square().sum(-1))
    scale = torch.linalg.vector_norm(x, dim=-1)
    # Errors agree to the product form's rounding, ~2^-7 |x| at worst (errors below that are 0).
    assert bool(((product - exact).abs() <= 2**-7 * scale + 1e-4 * exact).all())
    if case in ("random", "shared_component"):
        torch.testing.assert_close(product[exact > 0.1 * scale], exact[exact > 0.1 * scale], rtol=1e-4, atol=0)
    # Tokens the basis spans (the basis tokens themselves) count as exactly 0 in both forms.
    spanned = torch.arange(n) < (k if case != "duplicated_basis" else 1)
    if case != "duplicated_basis" and ridge < 1e-3:
        assert bool((product[:, spanned] == 0).all()) and bool((exact[:, spanned] == 0).all())


@pytest.fixture
def product_forms(monkeypatch):
    """ApET's product forms at any size on the CUDA formulations (they start at 2^23 elements)."""
    monkeypatch.setattr(apet_module, "_PRODUCT_FORM_MIN", 0)


def _clustered(b, n, d, seed, dtype=torch.float32):
    # Tokens like a model's: a shared component, a few directions, noise.
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(b, n, 8, generator=gen) @ torch.randn(b, 8, d, generator=gen)
    x = torch.randn(b, 1, d, generator=gen) * 2 + directions
    return (x + 0.3 * torch.randn(b, n, d, generator=gen)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stage", ["projector", "llm_layer"])
@pytest.mark.parametrize("seed", [0, 1])
def test_apet_product_forms_keep_the_exact_forms_tokens(product_forms, dtype, stage, seed):
    x = _clustered(3, 200, 96, seed, dtype)
    reducer = ApET(40, stage=stage, basis_tokens=8)
    exact = reducer(x)
    with ops.emulate_cuda_formulas():
        got = reducer(x)
    assert torch.equal(got.info["basis_indices"], exact.info["basis_indices"])
    assert torch.equal(got.indices, exact.indices)
    # Errors agree to rounding; under 2^-7 |x| (the basis tokens' own, with a ridge) the
    # product form counts them as 0.
    floor = 2**-7 * torch.linalg.vector_norm(x.float(), dim=-1)
    e_got, e_exact = got.info["errors"], exact.info["errors"]
    assert bool(((e_got - e_exact).abs() <= torch.where(e_exact > 2 * floor, 1e-4 * e_exact, floor)).all())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.tokens.float(), exact.tokens.float(), rtol=tol, atol=tol)


@pytest.mark.usefixtures("product_forms")
def test_apet_product_forms_read_no_device_value():
    # The branches CUDA takes (sync-free, product forms) with every host read refused: the
    # capturable path, the same bits as without the guard.
    x = _clustered(2, 120, 64, 3, torch.bfloat16)
    reducer = ApET(30, basis_tokens=6)
    with ops.emulate_cuda_formulas():
        plain = reducer(x)
        inner = reducer.reduce

        def guarded(*args, **kwargs):
            with no_host_sync():
                return inner(*args, **kwargs)

        reducer.reduce = guarded  # type: ignore[method-assign]
        got = reducer(x)
    assert torch.equal(got.indices, plain.indices) and torch.equal(got.tokens, plain.tokens)


def test_apet_product_forms_conform(product_forms):
    with ops.emulate_cuda_formulas():
        check_reducer(ApET, params={"basis_tokens": 2}, min_budget=3, max_examples=10)


# -- the other reducers under the CUDA formulations ---------------------------------------------------


def _score(tokens):
    return torch.softmax(tokens.float().sum(dim=-1) + tokens.float()[..., 0] * 0.5, dim=1)


def cls_context(tokens, valid, stage):
    return ReductionContext(cls_attention=_score(tokens), keys=torch.tanh(tokens.float() * 0.7 + 0.1))


def text_context(tokens, valid, stage):
    x = tokens.float()
    text = torch.tanh(-x[:, : min(3, x.shape[1])].flip(1) * 0.5 + 0.1)
    mask = torch.ones(text.shape[:2], dtype=torch.bool, device=tokens.device)
    if text.shape[1] > 1:
        mask[1:, -1] = False
    attention = torch.softmax(text @ x.transpose(1, 2) / x.shape[-1] ** 0.5, dim=2)
    keys = torch.tanh(x * 0.7 + 0.1)
    text_keys = torch.tanh(text)
    return ReductionContext(attention=attention, text_embeds=text, text_mask=mask, keys=keys, text_keys=text_keys)


# (class, stage, params, context factory)
REDUCERS = [
    (ToMe, "projector", {}, None),
    (VisionZip, "projector", {}, cls_context),
    (DART, "projector", {}, text_context),
    (DART, "llm_layer", {"pivot_by": "token_norm"}, text_context),
    (SparseVLM, "llm_layer", {}, text_context),
    (SparseVLM, "llm_layer", {"recycle_ratio": 1.0, "cluster_ratio": 0.5}, text_context),
    (HoloV, "projector", {"regions": 3}, cls_context),
    (VScan, "projector", {}, cls_context),
]
IDS = [f"{c.name}@{s}{'-' if p else ''}{'-'.join(map(str, p.values()))}" for c, s, p, _ in REDUCERS]


@pytest.mark.parametrize(("cls", "stage", "params", "factory"), REDUCERS, ids=IDS)
def test_cuda_formulations_conform(cls, stage, params, factory):
    with ops.emulate_cuda_formulas():
        check_reducer(cls, stage=stage, params=params, context_factory=factory, max_examples=8)


def _call(cls, stage, params, factory, x, t):
    context = factory(x, None, stage) if factory is not None else ReductionContext()
    return cls(t, stage=stage, **params)(x, context=dataclasses.replace(context))


@pytest.mark.parametrize(("cls", "stage", "params", "factory"), REDUCERS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_formulations_keep_the_cpu_forms_tokens(cls, stage, params, factory, dtype):
    # Random tokens (no near-ties at these sizes): the same kept tokens, features equal to
    # the input dtype's rounding.
    x = (torch.randn(3, 144, 48, generator=torch.Generator().manual_seed(7)) * 2).to(dtype)
    exact = _call(cls, stage, params, factory, x, 30)
    with ops.emulate_cuda_formulas():
        got = _call(cls, stage, params, factory, x, 30)
    assert torch.equal(got.indices, exact.indices)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.tokens.float(), exact.tokens.float(), rtol=tol, atol=tol)
    if exact.sizes is not None:
        assert torch.equal(got.sizes, exact.sizes)


@pytest.mark.parametrize(("cls", "stage", "params", "factory"), REDUCERS, ids=IDS)
def test_cuda_formulations_read_no_device_value(cls, stage, params, factory):
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(8)).bfloat16()
    with ops.emulate_cuda_formulas():
        plain = _call(cls, stage, params, factory, x, 20)
        reducer = cls(20, stage=stage, **params)
        inner = reducer.reduce

        def guarded(*args, **kwargs):
            with no_host_sync():
                return inner(*args, **kwargs)

        reducer.reduce = guarded  # type: ignore[method-assign]
        context = factory(x, None, stage) if factory is not None else ReductionContext()
        got = reducer(x, context=context)
    assert torch.equal(got.indices, plain.indices) and torch.equal(got.tokens, plain.tokens)


# -- half-precision operands with float32 results -----------------------------------------------------


def _half_operands(dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(2, 70, 48, generator=gen) * scale).to(dtype)
    b = (torch.randn(2, 9, 48, generator=gen, dtype=torch.float64) * scale)
    return a, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_term_product_keeps_float32_precision_of_the_wide_operand(dtype, seed):
    # ApET's projection: a float64 basis split into three half terms, times half tokens.
    a, w = _half_operands(dtype, seed, 3.0)
    got = apet_module._three_term_product(w * 1e-3, a)  # any magnitude: scaled by a power of two first
    want = (w * 1e-3) @ a.double().transpose(1, 2)
    scale = (w * 1e-3).abs().sum(-1, keepdim=True) * a.double().abs().amax()
    assert bool(((got - want).abs() <= 2**-20 * scale).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cosine_similarity_of_half_tokens_beats_tf32_precision(dtype):
    # The kept features (float32) split into two half terms: 16+ significant bits, TF32 has 11.
    a, b = _half_operands(dtype, 3)
    b = b.float()
    want = torch.nn.functional.cosine_similarity(a.double().unsqueeze(2), b.double().unsqueeze(1), dim=-1)
    with ops.emulate_cuda_formulas():
        got = ops.cosine_similarity(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2**-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_of_half_tokens_is_exact(dtype):
    # One-hot products of half tokens: every product exact, sums in float32.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 40, 16, generator=gen).to(dtype)
    target = torch.randint(-1, 5, (2, 40), generator=gen)
    with ops.emulate_cuda_formulas():
        sums, counts = ops.merge_into(x, target, 5)
    want = torch.zeros(2, 5, 16, dtype=torch.float64)
    for row in range(2):
        for i in range(40):
            if target[row, i] >= 0:
                want[row, target[row, i]] += x[row, i].double()
    assert sums.dtype == torch.float32 and counts.dtype == torch.float32
    torch.testing.assert_close(sums.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(counts, torch.stack([(target == s).sum(1) for s in range(5)], 1).float())


@pytest.mark.parametrize("shape", [(3, 36, 4096), (2, 2, 5, 1024), (4, 64, 2048), (2, 65, 1024), (2, 8, 1000),
                                   (64, 4, 1024), (2, 32, 3, 1024)])
def test_gram_split_along_the_features_sums_the_same_products(shape):
    # Few matrices of few rows, many features: blocks of 256 features (any other shape, 64
    # matrices or more among them: one product).
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want = x @ x.transpose(-1, -2)
    with ops.emulate_cuda_formulas():
        got = ops.gram(x.float())
    assert got.shape == want.shape and got.dtype == torch.float32
    bound = 2**-20 * (x.abs() @ x.abs().transpose(-1, -2))
    assert bool(((got.double() - want).abs() <= bound).all())
    one = x.float() @ x.float().transpose(-1, -2)
    assert torch.equal(ops.gram(x.float()), one)  # CPU: one product
    if x[..., 0, 0].numel() >= 64:
        assert torch.equal(got, one)  # enough matrices to fill the GPU: one product there too


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_wide_bmm_sums_exact_products_in_float32(dtype):
    a, b = _half_operands(dtype, 5)
    b = b.to(dtype)
    got = ops.wide_bmm(a.cuda(), b.cuda().transpose(1, 2))
    assert got.dtype == torch.float32
    want = a.double() @ b.double().transpose(1, 2)
    bound = 2**-20 * (a.double().abs() @ b.double().abs().transpose(1, 2))
    assert bool(((got.cpu().double() - want).abs() <= bound).all())


# -- on the GPU (run by the lead on the H200) ---------------------------------------------------------


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_apet_at_large_inputs_matches_cpu_and_is_captured(dtype):
    # 2 x 1024 x 4096 = 2^23 elements: the product forms. Clustered tokens, well separated.
    x = _clustered(2, 1024, 4096, 12, dtype)
    reducer = tr.create("apet", 114, stage="projector")
    cpu = reducer(x)
    gpu = [reducer(x.cuda()) for _ in range(3)]  # capture, then replays
    failed = [k for k in graphs.stats()["failed"] if k.startswith("apet@")]
    assert not failed, failed
    assert torch.equal(gpu[1].indices, gpu[2].indices) and torch.equal(gpu[1].tokens, gpu[2].tokens)
    assert torch.equal(gpu[0].info["basis_indices"].cpu(), cpu.info["basis_indices"])
    same = (gpu[0].keep_mask.cpu() == cpu.keep_mask).float().mean()
    assert same > 0.995  # near-ties at the budget boundary may flip, nothing more
    torch.testing.assert_close(gpu[0].info["errors"].cpu(), cpu.info["errors"], rtol=1e-3, atol=1e-3)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("cls", "stage", "params", "factory"), REDUCERS, ids=IDS)
def test_cuda_reducers_match_cpu_and_are_captured(cls, stage, params, factory):
    x = (torch.randn(4, 576, 256, generator=torch.Generator().manual_seed(9)) * 2).bfloat16()
    cpu = _call(cls, stage, params, factory, x, 64)
    gpu = [_call(cls, stage, params, factory, x.cuda(), 64) for _ in range(2)]
    failed = [k for k in graphs.stats()["failed"] if k.startswith(f"{cls.name}@")]
    assert not failed, failed
    assert torch.equal(gpu[0].indices, gpu[1].indices)
    same = (gpu[0].keep_mask.cpu() == cpu.keep_mask).float().mean()
    assert same > 0.98
