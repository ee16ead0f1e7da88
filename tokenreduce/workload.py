"""Synthetic, seeded token workloads: image-like token grids without a model or a download."""

from __future__ import annotations

import torch


def synthetic_tokens(batch: int = 1, side: int = 24, dim: int = 1024, *, clusters: int = 12, seed: int = 0) -> torch.Tensor:
    """``(batch, side*side, dim)`` tokens shaped like a ViT's patch features.

    A few "objects" (clusters with their own mean feature) are laid over the grid as
    blobs, plus a smooth background and noise, so that neighbouring tokens are
    redundant, as in real images: the regime token reduction exploits.
    """
    gen = torch.Generator().manual_seed(seed)
    n = side * side
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([ys, xs], dim=-1).reshape(n, 2).float()
    centres = torch.rand(batch, clusters, 2, generator=gen) * side
    radius = 1.0 + torch.rand(batch, clusters, 1, generator=gen) * side / 5
    means = torch.randn(batch, clusters + 1, dim, generator=gen)
    dist = torch.cdist(grid.expand(batch, n, 2), centres) / radius.transpose(1, 2)  # (B, N, C)
    owner = torch.where(dist.min(dim=2).values < 1, dist.argmin(dim=2), torch.full((batch, n), clusters))
    feats = torch.gather(means, 1, owner.unsqueeze(-1).expand(batch, n, dim))
    return feats + 0.3 * torch.randn(batch, n, dim, generator=gen)
