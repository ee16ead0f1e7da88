"""Our baselines reproduce fixtures made by the methods' official code (see fixtures/baselines/README.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tokenreduce as tr
from tokenreduce import ReductionContext

FIXTURES = Path(__file__).parent / "fixtures" / "baselines"


def load(name: str) -> tuple[dict[str, np.ndarray], list[int]]:
    data = dict(np.load(FIXTURES / f"{name}.npz"))
    cases = sorted({int(k.split("_")[0][4:]) for k in data})
    return data, cases


def case(data: dict, k: int, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(data[f"case{k}_{key}"]))


@pytest.mark.parametrize("k", load("tome")[1])
def test_tome_matches_official_bipartite_soft_matching(k):
    data, _ = load("tome")
    tokens, t = case(data, k, "tokens"), int(data[f"case{k}_budget"])
    source, features, sizes = case(data, k, "source"), case(data, k, "features"), case(data, k, "sizes")
    out = tr.create("tome", budget=t)(tokens)
    assert out.info["rounds"] == int(data[f"case{k}_rounds"])
    for b in range(tokens.shape[0]):
        # Match output tokens by the set of inputs they merge (order differs: ours is by position).
        official = {tuple(source[b, j].nonzero()[:, 0].tolist()): j for j in range(t)}
        for slot in range(t):
            group = tuple((out.info["assignment"][b] == slot).nonzero()[:, 0].tolist())
            assert group in official, f"row {b}: merged group {group} is not one of the official groups"
            j = official[group]
            torch.testing.assert_close(out.tokens[b, slot], features[b, j], rtol=1e-5, atol=1e-5)
            assert float(out.sizes[b, slot]) == float(sizes[b, j])


@pytest.mark.parametrize("k", load("divprune")[1])
def test_divprune_matches_official_selection_order(k):
    data, _ = load("divprune")
    tokens, t = case(data, k, "tokens"), int(data[f"case{k}_budget"])
    out = tr.create("divprune", budget=t)(tokens)
    assert out.info["selection_order"].tolist() == case(data, k, "selection_order").tolist()
    assert out.indices.tolist() == torch.sort(case(data, k, "selection_order"), dim=1).values.tolist()


@pytest.mark.parametrize("k", load("dart")[1])
def test_dart_matches_official_retained_tokens(k):
    data, _ = load("dart")
    ctx = ReductionContext(
        keys=case(data, k, "keys"), text_embeds=case(data, k, "text_embeds"), text_keys=case(data, k, "text_keys")
    )
    reducer = tr.create(
        "dart",
        budget=int(data[f"case{k}_budget"]),
        stage="llm_layer",
        pivot_image_tokens=int(data[f"case{k}_pivot_image_tokens"]),
        pivot_text_tokens=int(data[f"case{k}_pivot_text_tokens"]),
    )
    out = reducer(case(data, k, "tokens"), context=ctx)
    assert out.indices[0].tolist() == case(data, k, "kept").tolist()


@pytest.mark.parametrize("k", load("visionzip")[1])
def test_visionzip_matches_official_dominant_and_contextual_tokens(k):
    data, _ = load("visionzip")
    ctx = ReductionContext(cls_attention=case(data, k, "cls_attention_heads").mean(dim=1), keys=case(data, k, "keys"))
    reducer = tr.create("visionzip", budget=int(data[f"case{k}_budget"]), contextual=int(data[f"case{k}_contextual"]))
    out = reducer(case(data, k, "tokens"), context=ctx)
    dominant_idx = torch.sort(case(data, k, "dominant_indices"), dim=1).values
    for b in range(out.tokens.shape[0]):
        is_dom = out.info["dominant"][b][out.indices[b]]
        assert out.indices[b][is_dom].tolist() == dominant_idx[b].tolist()
        # Official order: dominant tokens in position order, then contextual in target order.
        torch.testing.assert_close(out.tokens[b][is_dom], case(data, k, "dominant_features")[b])
        contextual = case(data, k, "contextual_features")[b]
        torch.testing.assert_close(out.tokens[b][~is_dom], contextual, rtol=1e-5, atol=1e-5)
