"""ApET: the published reference reproduced, conformance, properties, numerics, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce import InvalidInputError, ReductionContext, Stage
from tokenreduce.errors import ConfigError
from tokenreduce.testing import check_reducer
from tokenreduce_plugins.apet import ApET, ApETLlava, ApETQwen
from tokenreduce_plugins.apet_basis import density_peak_basis, farthest_point_sampling

# Vendored with its provenance (tests/fixtures/apet/README.md), so every clone runs these tests.
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "apet" / "apet_reference.npz"
ENCODER_CASES = [
    "gauss_b2_n144_d64_t32_k4",
    "clust_b1_n576_d256_t64_k10",
    "clust_b2_n576_d1024_t192_k10",
    "gauss_b1_n64_d32_t16_k8",
]
QWEN_CASES = ["qwen_n400_d128_t48_k10", "qwen_n256_d64_t32_k10"]
PROPS = settings(max_examples=20, deadline=None, derandomize=True, database=None)


@pytest.fixture(scope="module")
def reference():
    assert FIXTURE.is_file(), f"ApET reference fixture missing at {FIXTURE}; it is part of the repository"
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def _field(ref, case, name):
    return torch.from_numpy(np.asarray(ref[f"{case}/{name}"]))


# -- the published algorithm, exactly ------------------------------------------------


@pytest.mark.parametrize("case", ENCODER_CASES)
@pytest.mark.parametrize("name", ["apet-llava", "apet"])
def test_reproduces_reference_llava_encoder_cases(reference, case, name):
    x = _field(reference, case, "x")
    t, k = int(_field(reference, case, "T")), int(_field(reference, case, "k"))
    out = tr.create(name, budget=t, stage="vision_encoder", basis_tokens=k)(x)

    assert torch.equal(out.info["basis_indices"], _field(reference, case, "fps_idx"))
    assert torch.equal(out.indices, _field(reference, case, "topk").sort(dim=1).values)
    assert torch.equal(out.keep_mask, _field(reference, case, "keep_mask"))
    torch.testing.assert_close(out.tokens, _field(reference, case, "kept"), rtol=1e-4, atol=1e-5)
    _assert_errors_close(out.info["errors"], _field(reference, case, "errors"))
    assert out.sizes.sum(dim=1).tolist() == [float(x.shape[1])] * x.shape[0]


@pytest.mark.parametrize("case", QWEN_CASES)
def test_reproduces_reference_qwen_llm_layer_cases(reference, case):
    x = _field(reference, case, "x").unsqueeze(0)  # (N, D) -> one row
    t, k = int(_field(reference, case, "T")), int(_field(reference, case, "k"))
    out = tr.create("apet-qwen", budget=t, stage="llm_layer", basis_tokens=k)(x)

    assert torch.equal(out.info["basis_indices"][0], _field(reference, case, "fps_idx"))
    assert torch.equal(out.indices[0], _field(reference, case, "topk_sorted"))
    torch.testing.assert_close(out.tokens[0], _field(reference, case, "kept"), rtol=1e-4, atol=1e-5)
    _assert_errors_close(out.info["errors"][0], _field(reference, case, "errors"))


def _assert_errors_close(ours, ref):
    # Errors are norms of residuals: near-zero ones (the basis tokens) carry the float32
    # rounding of the whole solve, so the absolute tolerance scales with the largest error.
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())))


def test_reference_rows_are_reproduced_inside_a_padded_batch(reference):
    # Two fixture rows of different lengths in one padded batch give each row's reference result.
    a = _field(reference, "qwen_n256_d64_t32_k10", "x")
    b = _field(reference, "gauss_b1_n64_d32_t16_k8", "x")[0]
    x = torch.zeros(2, 256, 64)
    x[0] = a
    x[1, :64, :32] = b  # zero-padded features do not change distances, Gram or errors
    valid = torch.zeros(2, 256, dtype=torch.bool)
    valid[0] = True
    valid[1, :64] = True
    x[1, 64:] = 1e6  # padded garbage must not matter
    out = tr.create("apet-qwen", budget=lambda n: 32 if n == 256 else 16, stage="llm_layer", basis_tokens=8)(
        x, mask=valid
    )
    alone = tr.create("apet-qwen", budget=16, stage="llm_layer", basis_tokens=8)(x[1:, :64])
    assert torch.equal(out.indices[1, :16], alone.indices[0])
    torch.testing.assert_close(out.tokens[1, :16], alone.tokens[0])
    assert out.info["basis_indices"][1].max() < 64
    assert bool((out.info["assignment"][1, 64:] == -1).all())


# -- conformance kit -------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ApET, ApETLlava, ApETQwen])
def test_conforms_at_every_stage(cls):
    # The kit draws budgets >= min_budget; ApET needs basis_tokens < T in every reduced row.
    check_reducer(cls, params={"basis_tokens": 2}, min_budget=3, max_examples=15)


@pytest.mark.parametrize(
    ("params", "stage"),
    [
        ({"basis_tokens": 2, "basis_selection": "dpc"}, "projector"),
        ({"basis_tokens": 1, "basis_selection": "random", "seed": 5}, "vision_encoder"),
        ({"basis_tokens": 2, "fps_start": "random", "merge": "none"}, "llm_layer"),
        ({"basis_tokens": 2, "merge_scaling": 3.0, "basis_blend": 0.25, "basis_order": "rank"}, "projector"),
    ],
)
def test_variants_conform(params, stage):
    check_reducer(ApET, params=params, stage=stage, min_budget=params["basis_tokens"] + 1, max_examples=10)


# -- properties ------------------------------------------------------------------------


@st.composite
def batches(draw, max_n=48):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(6, max_n))
    d = draw(st.integers(1, 16))
    k = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    valid = torch.rand(b, n, generator=gen) < draw(st.sampled_from([1.0, 0.8]))
    valid[:, : k + 2] = True
    budget = draw(st.integers(k + 1, n - 1))
    selection = draw(st.sampled_from(["fps", "dpc", "random"]))
    return x, valid, budget, k, selection


@PROPS
@given(batches())
def test_kept_errors_never_below_dropped_errors(case):
    x, valid, budget, k, selection = case
    out = ApET(budget, basis_tokens=k, basis_selection=selection)(x, mask=valid)
    if out.info.get("identity"):  # every row kept whole
        return
    errors = out.info["errors"]
    reduced = out.counts < valid.sum(dim=1)
    for row in torch.nonzero(reduced).flatten().tolist():
        kept = errors[row][out.keep_mask[row]]
        dropped = errors[row][valid[row] & ~out.keep_mask[row]]
        if dropped.numel():
            assert kept.min() >= dropped.max()


@PROPS
@given(batches())
def test_merge_weights_sum_to_valid_count_and_match_assignment(case):
    x, valid, budget, k, selection = case
    out = ApET(budget, basis_tokens=k, basis_selection=selection)(x, mask=valid)
    assert torch.allclose(out.sizes.sum(dim=1), valid.sum(dim=1).float())
    if out.info.get("identity"):
        return
    assign = out.info["assignment"]
    assert bool((assign[~valid] == -1).all())  # padding never merged
    assert bool((assign[valid] >= 0).all())  # every valid token lands somewhere
    for row in range(x.shape[0]):
        per_slot = torch.bincount(assign[row][valid[row]], minlength=out.num_kept)
        assert torch.equal(per_slot.float(), out.sizes[row])
        # nothing is merged into a basis slot
        assert bool((out.sizes[row][out.info["basis_slots"][row]] == 1).all())


@PROPS
@given(st.sampled_from(["position", "rank"]), st.data())
def test_permutation_equivariance_with_fps_from_a_fixed_token(order, data):
    # FPS starts at token 0 ("first"), so we permute the tokens with token 0 held in
    # front: the start is then the same token and every pick, kept index and merge
    # follows the permutation. Tokens live in D >= k + 2 dimensions and T <= N - k, so
    # the kept errors are real residuals, not float32 noise around zero whose order
    # could legitimately change with the memory layout.
    k = data.draw(st.integers(1, 4), label="k")
    b, n, d = data.draw(st.integers(1, 3)), data.draw(st.integers(2 * k + 2, 40)), data.draw(st.integers(k + 2, 16))
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1))))
    budget = data.draw(st.integers(k + 1, n - k), label="budget")
    perm = torch.tensor([0, *data.draw(st.permutations(list(range(1, n))))])
    reducer = ApET(budget, basis_tokens=k, basis_order=order)
    out, out_p = reducer(x), reducer(x[:, perm])

    assert torch.equal(perm[out_p.info["basis_indices"]], out.info["basis_indices"])
    assert torch.equal(perm[out_p.indices].sort(dim=1).values, out.indices)
    torch.testing.assert_close(out_p.info["errors"], out.info["errors"][:, perm])
    # Features follow their token: sort the permuted output back to original positions.
    back = perm[out_p.indices].argsort(dim=1)
    feats = torch.gather(out_p.tokens, 1, back.unsqueeze(-1).expand_as(out_p.tokens))
    # 'position' hands the basis to the basis slots by position, which the permutation
    # reorders; 'rank' hands them out by error rank, which it does not.
    same = ~out.info["basis_slots"] if order == "position" else out.valid
    torch.testing.assert_close(feats[same], out.tokens[same], rtol=1e-5, atol=1e-5)


def _expected_features(x, out, *, blend, weight, order):
    """Features rebuilt from the info fields: basis placement then weighted merge."""
    row_feats = []
    for row in range(x.shape[0]):
        idx = out.indices[row]
        errors = out.info["errors"][row]
        basis_idx = out.info["basis_indices"][row]
        by_error = idx[torch.argsort(-errors[idx], stable=True)]
        k = basis_idx.numel()
        slots_tokens = by_error[-k:] if order == "rank" else by_error[-k:].sort().values
        feats = x[row, idx].clone()
        for j, tok in enumerate(slots_tokens.tolist()):
            s = int((idx == tok).nonzero())
            feats[s] = (1 - blend) * x[row, basis_idx[j]] + blend * x[row, tok]
        assign = out.info["assignment"][row]
        dropped = ~out.keep_mask[row]
        for s in range(idx.numel()):
            members = x[row][dropped & (assign == s)]
            if members.shape[0]:
                feats[s] = (weight * feats[s] + members.sum(0)) / (weight + members.shape[0])
        row_feats.append(feats)
    return torch.stack(row_feats)


@PROPS
@given(
    batches(max_n=32),
    st.sampled_from([0.0, 0.5, 0.8]),
    st.sampled_from([0.5, 1.0, 2.0]),
    st.sampled_from(["position", "rank"]),
)
def test_features_are_basis_placement_then_weighted_merge(case, blend, weight, order):
    x, _, budget, k, _ = case
    reducer = ApET(budget, basis_tokens=k, basis_blend=blend, merge_scaling=weight, basis_order=order)
    out = reducer(x)
    if out.info.get("identity"):
        return
    expected = _expected_features(x, out, blend=blend, weight=weight, order=order)
    torch.testing.assert_close(out.tokens, expected, rtol=1e-5, atol=1e-5)
    # every dropped token went to its most cosine-similar retained (non-basis) slot
    retained = out.valid & ~out.info["basis_slots"]
    for row in range(x.shape[0]):
        unit = torch.nn.functional.normalize(x[row], dim=-1)
        dropped = (~out.keep_mask[row]).nonzero().flatten()
        slot = out.info["assignment"][row, dropped]
        assert bool(retained[row][slot].all())
        got = (unit[dropped] * unit[out.indices[row][slot]]).sum(-1)
        best = (unit[dropped] @ unit[out.indices[row][retained[row]]].T).max(dim=1).values
        torch.testing.assert_close(got, best, rtol=0, atol=1e-5)


def test_merge_none_drops_and_keeps_retained_tokens_unchanged():
    x = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(1))
    out = ApET(12, basis_tokens=3, merge="none")(x)
    retained = out.valid & ~out.info["basis_slots"]
    assert torch.equal(out.tokens[retained], x[torch.arange(2)[:, None].expand_as(out.indices), out.indices][retained])
    assert torch.equal(out.sizes, torch.ones(2, 12))
    assert bool((out.info["assignment"][~out.keep_mask] == -1).all())


# -- stages and presets ----------------------------------------------------------------


def test_stage_defaults_ridge_and_basis_order():
    x = torch.randn(1, 40, 6, generator=torch.Generator().manual_seed(2))
    ridges = {s: ApET(12, stage=s)(x).info["ridge"] for s in Stage}
    assert ridges == {Stage.VISION_ENCODER: 1e-5, Stage.PROJECTOR: 1e-5, Stage.LLM_LAYER: 1e-1}
    assert {ApETLlava(12, stage=s)(x).info["ridge"] for s in Stage} == {1e-5}
    assert ApETQwen(12, stage="llm_layer")(x).info["ridge"] == 1e-1
    assert ApET(12, ridge=0.3, stage="llm_layer")(x).info["ridge"] == 0.3
    r = ApET(12, stage="llm_layer")
    assert (r.basis_order_at(Stage.LLM_LAYER), r.basis_order_at(Stage.PROJECTOR)) == ("rank", "position")
    # the stage comes from the context when an adapter passes one
    ctx = ReductionContext(stage=Stage.LLM_LAYER)
    assert ApET(12)(x, context=ctx).info["ridge"] == 1e-1


def test_presets_are_the_two_published_variants():
    assert ApETQwen(8).params.basis_blend == 0.5 and ApETLlava(8).params.basis_blend == 0.0
    assert tr.create("apet-qwen", budget=8, basis_blend=0.2).params.basis_blend == 0.2  # overridable
    x = torch.randn(1, 60, 16, generator=torch.Generator().manual_seed(3))
    llava = ApETLlava(20, basis_tokens=4, stage="projector")(x)
    qwen = ApETQwen(20, basis_tokens=4, stage="projector")(x)
    assert torch.equal(llava.indices, qwen.indices)  # same selection, different basis slots
    slots = llava.info["basis_slots"]
    torch.testing.assert_close(qwen.tokens[slots], 0.5 * llava.tokens[slots] + 0.5 * x[0, llava.indices[slots]])


# -- basis selection -------------------------------------------------------------------


def test_fps_matches_a_direct_implementation_and_respects_padding():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 30, 5, generator=gen)
    valid = torch.rand(3, 30, generator=gen) < 0.7
    picks = farthest_point_sampling(x, valid, 6)
    for row in range(3):
        pos = valid[row].nonzero().flatten()
        pts = x[row, pos]
        chosen = [0]
        dist = torch.full((len(pos),), float("inf"))
        for _ in range(5):
            dist = torch.minimum(dist, ((pts - pts[chosen[-1]]) ** 2).sum(-1))
            chosen.append(int(dist.argmax()))
        assert picks[row].tolist() == pos[chosen].tolist()


def test_fps_random_start_is_seeded_and_valid():
    x = torch.randn(2, 40, 4, generator=torch.Generator().manual_seed(5))
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[:, ::2] = False
    starts = {int(farthest_point_sampling(x, valid, 3, start="random", seed=s)[0, 0]) for s in range(8)}
    assert len(starts) > 1 and all(i % 2 == 1 for i in starts)
    a = farthest_point_sampling(x, valid, 3, start="random", seed=3)
    assert torch.equal(a, farthest_point_sampling(x, valid, 3, start="random", seed=3))


def test_dpc_finds_one_centre_per_cluster_and_uses_cluster_means():
    gen = torch.Generator().manual_seed(6)
    centres = torch.randn(4, 8, generator=gen) * 10
    labels = torch.arange(60) % 4
    x = (centres[labels] + 0.1 * torch.randn(60, 8, generator=gen)).unsqueeze(0)
    idx, basis = density_peak_basis(x, torch.ones(1, 60, dtype=torch.bool), 4)
    assert sorted(labels[idx[0]].tolist()) == [0, 1, 2, 3]
    means = torch.stack([x[0, labels == labels[i]].mean(0) for i in idx[0]])
    torch.testing.assert_close(basis[0], means)


def test_random_basis_is_seeded_distinct_and_valid():
    x = torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(7))
    valid = torch.arange(30).expand(2, 30) < torch.tensor([[30], [20]])
    runs = [ApET(8, basis_tokens=5, basis_selection="random", seed=s)(x, mask=valid) for s in (0, 0, 1)]
    assert torch.equal(runs[0].info["basis_indices"], runs[1].info["basis_indices"])
    assert not torch.equal(runs[0].info["basis_indices"], runs[2].info["basis_indices"])
    b = runs[0].info["basis_indices"]
    assert all(len(set(r)) == 5 for r in b.tolist()) and int(b[1].max()) < 20


# -- numerics --------------------------------------------------------------------------


def _assert_sane(out, x, valid=None):
    valid = torch.ones(x.shape[:2], dtype=torch.bool) if valid is None else valid
    assert bool(torch.isfinite(out.tokens.float()).all()) and bool(torch.isfinite(out.info["errors"]).all())
    assert torch.allclose(out.sizes.sum(dim=1), valid.sum(dim=1).float())


def test_all_equal_tokens_keep_the_first_tokens_with_distinct_basis():
    x = torch.randn(1, 1, 32).expand(2, 50, 32).contiguous() * 40
    out = ApET(10, basis_tokens=4)(x)
    _assert_sane(out, x)
    assert out.info["basis_indices"].tolist() == [[0, 1, 2, 3]] * 2  # lowest-index duplicates
    assert out.indices.tolist() == [list(range(10))] * 2  # all errors ~0: ties keep lower indices
    torch.testing.assert_close(out.tokens, x[:, :10])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_duplicates_and_k_at_least_distinct_tokens(dtype):
    gen = torch.Generator().manual_seed(8)
    distinct = torch.randn(3, 16, generator=gen) * 50
    x = distinct[torch.arange(40) % 3].unsqueeze(0).to(dtype)
    out = ApET(12, basis_tokens=6)(x)
    _assert_sane(out, x)
    # every token is in the span of the basis: errors vanish relative to the token norms
    assert float(out.info["errors"].max()) < 1e-2 * float(x.float().norm(dim=-1).max())


def test_rank_deficient_basis_in_one_dimension_and_low_rank_data():
    gen = torch.Generator().manual_seed(9)
    line = torch.randn(1, 30, 1, generator=gen)  # D = 1: every basis of k > 1 is rank deficient
    _assert_sane(ApET(8, basis_tokens=5)(line), line)
    plane = torch.randn(1, 60, 2, generator=gen) @ torch.randn(2, 32, generator=gen)  # rank 2 in D = 32
    out = ApET(20, basis_tokens=8)(plane)
    _assert_sane(out, plane)
    assert float(out.info["errors"].max()) < 1e-3 * float(plane.norm(dim=-1).max())


def test_zero_vectors():
    x = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(10))
    x[:, ::3] = 0
    out = ApET(12, basis_tokens=3)(x)
    _assert_sane(out, x)
    assert bool((out.info["errors"][:, ::3] == 0).all())  # a zero token is reconstructed exactly
    zeros = torch.zeros(1, 20, 4)
    out = ApET(5, basis_tokens=2)(zeros)
    _assert_sane(out, zeros)
    assert out.indices.tolist() == [[0, 1, 2, 3, 4]] and bool((out.tokens == 0).all())


@pytest.mark.parametrize("power", [100, -100])
def test_huge_and_tiny_magnitudes_scale_exactly(power):
    # Scaling by a power of two changes nothing but the scale of the features.
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(11))
    ref = ApET(16, basis_tokens=4)(x)
    out = ApET(16, basis_tokens=4, ridge=1e-5 * 2.0 ** (2 * power))(x * 2.0**power)
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.info["basis_indices"], ref.info["basis_indices"])
    torch.testing.assert_close(out.tokens, ref.tokens * 2.0**power, rtol=1e-6, atol=0)


def test_huge_values_in_every_dtype_stay_finite():
    gen = torch.Generator().manual_seed(12)
    for dtype, big in [(torch.float32, 1e37), (torch.bfloat16, 1e37), (torch.float16, 6e4), (torch.float64, 1e300)]:
        x = (torch.randn(1, 40, 8, generator=gen, dtype=torch.float64).clamp(-3, 3) * (big / 3)).to(dtype)
        out = ApET(10, basis_tokens=3)(x)
        assert out.tokens.dtype == dtype
        assert bool(torch.isfinite(out.tokens).all())
        assert torch.allclose(out.sizes.sum(dim=1), torch.tensor([40.0]))


def test_nan_and_inf_inputs_are_rejected():
    x = torch.randn(1, 20, 4)
    x[0, 3, 1] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        ApET(5, basis_tokens=2)(x)


# -- dtypes and devices ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtype_preserved_and_low_precision_close_to_fp32(dtype):
    x32 = torch.randn(2, 80, 24, generator=torch.Generator().manual_seed(13))
    x = x32.to(dtype)
    out = ApET(20, basis_tokens=5)(x)
    ref = ApET(20, basis_tokens=5)(x.float())  # same rounded inputs, computed in float32
    assert out.tokens.dtype == dtype and out.info["errors"].dtype == torch.float32
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.tokens, ref.tokens.to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("selection", ["fps", "dpc", "random"])
def test_cuda_matches_cpu(dtype, selection):
    gen = torch.Generator().manual_seed(14)
    x = (torch.randn(3, 144, 64, generator=gen) * 4).to(dtype)
    valid = torch.rand(3, 144, generator=gen) < 0.9
    reducer = ApET(32, basis_tokens=6, basis_selection=selection)
    cpu, gpu = reducer(x, mask=valid), reducer(x.cuda(), mask=valid.cuda())
    assert gpu.tokens.device.type == "cuda" and gpu.tokens.dtype == dtype
    assert torch.equal(gpu.info["basis_indices"].cpu(), cpu.info["basis_indices"])
    if selection == "dpc":
        # DPC's distances come from a matmul whose rounding differs by device; allow a
        # near-tie at the budget boundary to flip, nothing more.
        same = (gpu.keep_mask.cpu() == cpu.keep_mask).float().mean()
        assert same > 0.98
        return
    assert torch.equal(gpu.indices.cpu(), cpu.indices)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gpu.tokens.cpu().float(), cpu.tokens.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_cuda_reproduces_reference(reference):
    case = "clust_b2_n576_d1024_t192_k10"
    x = _field(reference, case, "x")
    out = tr.create("apet-llava", budget=192, stage="vision_encoder", basis_tokens=10)(x.cuda())
    assert torch.equal(out.info["basis_indices"].cpu(), _field(reference, case, "fps_idx"))
    assert torch.equal(out.indices.cpu(), _field(reference, case, "topk").sort(dim=1).values)
    # cuBLAS rounds differently from the CPU; on clustered tokens a dropped token can be
    # equally similar (to ~1e-6) to two retained tokens, and the argmax may then pick the
    # other one. Every differing assignment must be such a tie; every slot that no tie
    # touches must equal the reference.
    cpu = tr.create("apet-llava", budget=192, stage="vision_encoder", basis_tokens=10)(x)
    a_gpu, a_cpu = out.info["assignment"].cpu(), cpu.info["assignment"]
    differ = a_gpu != a_cpu
    kept_x = torch.gather(x.double(), 1, cpu.indices.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    sim = torch.nn.functional.normalize(x.double(), dim=-1) @ torch.nn.functional.normalize(kept_x, dim=-1).transpose(1, 2)
    rows, toks = differ.nonzero(as_tuple=True)
    gap = (sim[rows, toks, a_gpu[rows, toks]] - sim[rows, toks, a_cpu[rows, toks]]).abs()
    assert bool((gap < 1e-5).all()), f"non-tie assignment differences: {gap.max().item()}"
    touched = torch.zeros_like(out.valid.cpu())
    touched[rows, a_gpu[rows, toks]] = True
    touched[rows, a_cpu[rows, toks]] = True
    ref = _field(reference, case, "kept")
    torch.testing.assert_close(out.tokens.cpu()[~touched], ref[~touched], rtol=1e-4, atol=1e-5)
    assert int(touched.sum()) <= 0.05 * touched.numel()


# -- bad parameters --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"basis_tokens": 0}, r"basis_tokens: Input should be greater than or equal to 1 \(got 0\)"),
        ({"ridge": 0.0}, r"ridge: Input should be greater than 0"),
        ({"ridge": float("inf")}, r"ridge: .*finite"),
        ({"basis_selection": "kmeans"}, r"basis_selection: Input should be 'fps', 'dpc' or 'random'"),
        ({"fps_start": "last"}, r"fps_start: Input should be 'first' or 'random'"),
        ({"basis_blend": 1.5}, r"basis_blend: Input should be less than or equal to 1"),
        ({"basis_order": "random"}, r"basis_order: Input should be 'position' or 'rank'"),
        ({"merge": "mean"}, r"merge: Input should be 'nearest_cosine' or 'none'"),
        ({"merge_scaling": -1.0}, r"merge_scaling: Input should be greater than or equal to 0"),
        ({"basis": 3}, r"basis: Extra inputs are not permitted"),
    ],
)
def test_bad_params_are_rejected_with_field_and_value(params, message):
    with pytest.raises(ConfigError, match=message):
        tr.create("apet", budget=16, **params)


def test_basis_count_must_be_below_the_row_budget():
    x = torch.randn(2, 30, 4)
    message = r"basis_tokens=10 is out of range: .*1 <= basis_tokens < T.* row 0 keeps T=10"
    with pytest.raises(InvalidInputError, match=message):
        ApET(10)(x)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, 8:] = False  # row 1 keeps all its 8 tokens (not reduced); row 0 keeps 11 > k
    out = ApET(11)(x, mask=valid)
    assert out.counts.tolist() == [11, 8]
    assert torch.equal(out.tokens[1, :8], x[1, :8]) and out.info["basis_indices"][1].tolist() == [-1] * 10


def test_padding_rows_whole_rows_and_empty_rows_in_one_batch():
    x = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(15))
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1] = False  # all padding
    valid[2, 5:] = False  # 5 tokens: kept whole at budget 6
    for selection in ("fps", "dpc", "random"):
        out = ApET(6, basis_tokens=3, basis_selection=selection)(x, mask=valid)
        assert out.counts.tolist() == [6, 0, 5]
        assert out.sizes.sum(dim=1).tolist() == [20.0, 0.0, 5.0]
        assert torch.equal(out.tokens[2, :5], x[2, :5]) and bool((out.tokens[1] == 0).all())
        assert out.info["basis_indices"][1:].eq(-1).all() and out.info["basis_indices"][0].ge(0).all()



@pytest.mark.usefixtures("full_float32")  # compares the call with its internals, run directly
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stage", ["projector", "llm_layer"])
def test_cuda_graph_replay_equals_the_eager_algorithm(dtype, stage):
    # The graphed path (CUDA, no padding, one budget) must give the eager kernels' bits,
    # on the capturing call and on later replays with new inputs, and must not let a
    # replay overwrite what an earlier call returned.
    from tokenreduce import graphs

    gen = torch.Generator().manual_seed(21)
    xs = [torch.randn(4, 576, 256, generator=gen).to(dtype).cuda() for _ in range(3)]
    reducer = ApET(64, stage=stage, basis_tokens=10)
    graphed = [reducer(x) for x in xs]
    key_count = graphs.stats()["graphs"]
    failed = [k for k in graphs.stats()["failed"] if k.startswith("apet@")]
    assert key_count >= 1 and not failed, f"the common case must be captured: {failed}"
    first_again = graphed[0].tokens.clone()
    for x, out in zip(xs, graphed):
        b, n, _ = x.shape
        counts = torch.full((b,), 64, device=x.device)
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        # What CUDA runs eagerly (padding, ragged budgets): the same sync-free kernels.
        eager = reducer._reduce(x, counts, valid, active, Stage(stage), 64, sync_free=True)
        assert torch.equal(out.indices, eager.indices)
        assert torch.equal(out.tokens, eager.tokens)
        assert torch.equal(out.info["errors"], eager.info["errors"])
        assert torch.equal(out.sizes, eager.sizes)
        # The form with host branches (as on CPU) factors only the matrices it needs.
        branchy = reducer._reduce(x, counts, valid, active, Stage(stage), 64, sync_free=False)
        assert torch.equal(out.indices, branchy.indices)
        torch.testing.assert_close(out.tokens, branchy.tokens)
    assert torch.equal(graphed[0].tokens, first_again)
    # Padding takes the eager path and still gives the right answer.
    valid = torch.ones(4, 576, dtype=torch.bool, device="cuda")
    valid[1, 500:] = False
    padded = reducer(xs[0], mask=valid)
    assert not bool((padded.keep_mask & ~valid).any())
    assert graphs.stats()["graphs"] == key_count
    # An all-true mask is the dense case: it replays the same graph.
    masked = reducer(xs[1], mask=torch.ones(4, 576, dtype=torch.bool, device="cuda"))
    assert torch.equal(masked.tokens, graphed[1].tokens) and graphs.stats()["graphs"] == key_count


@pytest.mark.usefixtures("full_float32")  # compares the call with its internals, run directly
@pytest.mark.gpu
def test_cuda_graph_serves_callers_in_and_out_of_inference_mode_and_keeps_autograd():
    # Models run under inference_mode, direct calls often not: one captured graph must
    # serve both (its buffers are updated in place). Inputs that need gradients must not
    # take the graph, whose outputs are detached from them.
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(2, 576, 128, generator=gen).cuda()
    reducer = ApET(64, basis_tokens=10, stage="projector")
    with torch.inference_mode():
        inside = reducer(x)
    outside = reducer(x)
    assert torch.equal(inside.tokens, outside.tokens) and not outside.tokens.is_inference()
    outside.tokens.add_(0.0)  # an ordinary tensor: in-place works
    with torch.inference_mode():
        assert torch.equal(reducer(x.clone()).tokens, inside.tokens)
    leaf = x.clone().requires_grad_()
    out = reducer(leaf)
    out.tokens.sum().backward()
    assert leaf.grad is not None and bool((leaf.grad.abs().sum(dim=-1) > 0).any())
    assert torch.equal(out.indices, inside.indices)


@pytest.mark.usefixtures("full_float32")  # compares the call with its internals, run directly
@pytest.mark.gpu
def test_cuda_inputs_above_the_graph_size_cap_run_eagerly(monkeypatch):
    # Large inputs must not pin a graph's buffers on the GPU; they run the eager path.
    from tokenreduce import graphs

    previous = graphs.configure(max_elements=2 * 300 * 64 - 1)
    try:
        x = torch.randn(2, 300, 64, generator=torch.Generator().manual_seed(23)).cuda()
        before = graphs.stats()["graphs"]
        out = ApET(40, basis_tokens=8)(x)
        assert graphs.stats()["graphs"] == before
    finally:
        graphs.configure(**previous)
    ref = ApET(40, basis_tokens=8)(x.cpu())
    assert torch.equal(out.indices.cpu(), ref.indices)
    torch.testing.assert_close(out.tokens.cpu(), ref.tokens, rtol=1e-4, atol=1e-4)
