import torch

from tokenreduce import merge_nearest, ops
from tokenreduce.metrics import reconstruction_error
from tokenreduce.reducer import make_reduction


def test_merge_nearest_averages_dropped_tokens_into_most_similar_kept():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [0.0, 0.0]]])
    idx = torch.tensor([[0, 1]])
    slots = torch.ones(1, 2, dtype=torch.bool)
    valid = torch.tensor([[True, True, True, True, False]])
    feats, sizes, assign = merge_nearest(x, idx, slots, valid)
    assert torch.allclose(feats[0, 0], (x[0, 0] + x[0, 2]) / 2)
    assert torch.allclose(feats[0, 1], (x[0, 1] + x[0, 3]) / 2)
    assert sizes.tolist() == [[2.0, 2.0]]
    assert assign.tolist() == [[0, 1, 0, 1, -1]]  # the padded token is never merged


def test_merge_nearest_respects_targets_and_kept_weight():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]])
    idx = torch.tensor([[0, 1]])
    slots = torch.ones(1, 2, dtype=torch.bool)
    targets = torch.tensor([[False, True]])
    feats, sizes, assign = merge_nearest(x, idx, slots, torch.ones(1, 3, dtype=torch.bool), targets=targets, kept_weight=3.0)
    assert assign[0, 2] == 1  # slot 0 may not receive merges
    assert torch.allclose(feats[0, 1], (3 * x[0, 1] + x[0, 2]) / 4)
    assert torch.equal(feats[0, 0], x[0, 0])


def test_zero_vectors_have_zero_cosine_not_nan():
    a = torch.zeros(1, 2, 3)
    assert bool(torch.isfinite(ops.cosine_similarity(a, torch.randn(1, 4, 3))).all())


def test_keep_mask_ignores_padded_slots():
    idx = torch.tensor([[1, 3, -1]])
    slots = torch.tensor([[True, True, False]])
    assert ops.keep_mask_from(idx, slots, 4).tolist() == [[False, True, False, True]]


def test_reconstruction_error_is_zero_for_identity_and_positive_when_dropping():
    x = torch.randn(2, 16, 8)
    slots = torch.ones(2, 16, dtype=torch.bool)
    idx = torch.arange(16).expand(2, 16)
    assert torch.allclose(reconstruction_error(x, make_reduction(x, idx, slots)), torch.zeros(2))
    part = make_reduction(x, idx[:, :4].contiguous(), slots[:, :4].contiguous())
    assert bool((reconstruction_error(x, part) > 0.1).all())


def test_merge_into_unit_weights_by_default_and_equal_on_any_device_path():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 5, generator=gen)
    target = torch.tensor([[0, 1, -1, 2, 0, 0, -1, 1, 2], [2, 2, 2, -1, -1, 0, 1, 0, 1]])
    sums, weights = ops.merge_into(x, target, 3)
    ones_sums, ones_weights = ops.merge_into(x, target, 3, torch.ones(2, 9))
    assert torch.equal(sums, ones_sums) and torch.equal(weights, ones_weights)
    expected = torch.zeros(2, 3, 5)
    for b in range(2):
        for i in range(9):
            if target[b, i] >= 0:
                expected[b, target[b, i]] += x[b, i]
    torch.testing.assert_close(sums, expected)
    assert weights.tolist() == [[3.0, 2.0, 2.0], [2.0, 2.0, 3.0]]
    w = torch.rand(2, 9, generator=gen)
    weighted, total = ops.merge_into(x, target, 3, w)
    torch.testing.assert_close(total, torch.stack([torch.bincount(target[b][target[b] >= 0], w[b][target[b] >= 0], 3) for b in range(2)]))
    torch.testing.assert_close(weighted[0, 0], w[0, 0] * x[0, 0] + w[0, 4] * x[0, 4] + w[0, 5] * x[0, 5])
