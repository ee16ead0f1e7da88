"""ApET's basis selection: farthest point sampling, density-peak clustering, random.

Each selector takes float32 tokens ``x (B, N, D)`` and their validity ``valid (B, N)`` and
returns ``(indices (B, k) int64, basis (B, k, D) float32)``. Padded tokens are never picked
and never influence a pick. Everything is batched; FPS loops over its ``k`` steps only.
Every row must hold at least ``k`` valid tokens for the picks to be distinct (the reducer
only uses the basis of rows it reduces, which hold more than ``k``).
"""

from __future__ import annotations

import math

import torch

from tokenreduce import ops

from .random_select import seeded_scores


def _row_random_scores(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``(N,)`` seeded uniform scores, identical on every device and for every row.

    Shared by all rows (like the ``random`` reducer) so a row's choice never depends on
    the other rows of the batch. Made once per (N, seed, device): no host-to-device copy
    per call (see :func:`~tokenreduce_plugins.random_select.seeded_scores`).
    """
    return seeded_scores(n, seed, device)


def farthest_point_sampling(
    x: torch.Tensor,
    valid: torch.Tensor,
    k: int,
    *,
    start: str = "first",
    seed: int = 0,
    fused: bool | None = None,
    sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices ``(B, k)`` of ``k`` tokens picked by farthest point sampling, in pick order.

    Squared Euclidean distance, exactly as the ApET code: each step picks the token
    farthest from all picks so far (ties: the lowest index). The first pick is the first
    valid token (``start="first"``; index 0 without padding) or a seeded random valid
    token (``start="random"``).

    Unlike the ApET code, an already picked token is never picked again: when every
    remaining token duplicates a pick (fewer distinct tokens than ``k``), the next pick
    is the lowest-index unpicked duplicate, so the indices stay distinct. Otherwise the
    picks are identical to the reference.

    ``fused`` (default: the CUDA formulation, :func:`tokenreduce.ops.cuda_formulas`): each
    step's distances come from one kernel reading the tokens once instead of a subtraction,
    a square and a sum (five passes over ``(B, N, D)``): ``torch.cdist`` (the Euclidean
    distance, computed directly), or, given ``sq_norms`` (``(B, N)``, the squared norms
    ``|x_i|^2``; the reducer passes them at large inputs), one matrix-vector product,
    ``|x_i|^2 + |c|^2 - 2 x_i.c`` in full float32 (cdist's direct kernel is no GEMM and
    reads at about half the bandwidth of one). The square root keeps the order of the
    distances, so ``cdist`` gives the same picks except where two squared distances differ
    only in their last bits; the product form rounds at about ``1e-7 |x|^2``, so a near-tie
    that close may resolve differently, and duplicates of a pick get a distance at that
    rounding level instead of 0 (picks among duplicates may differ: their features are
    the same). On CPU the reference's exact squared distances are used.
    """
    b, n, _ = x.shape
    rows = torch.arange(b, device=x.device)
    if start == "first":
        cur = valid.long().argmax(dim=1)  # first True
    else:
        scores = _row_random_scores(n, seed, x.device).expand(b, n)
        cur = scores.masked_fill(~valid, -1.0).argmax(dim=1)
    picks = [cur]
    fused = ops.cuda_formulas(x) if fused is None else fused
    if fused and sq_norms is not None:
        return _fps_by_products(x, valid, k, cur, sq_norms, picks)
    # Padded tokens sit at -inf so they are never the farthest; min() keeps them there.
    dist = torch.full((b, n), math.inf, device=x.device).masked_fill(~valid, -math.inf)
    # Picks are indices, never differentiated: no autograd, so one (B, N, D) buffer serves
    # every step (a fresh one per step costs page faults that double the step on CPU).
    # k - 1 steps, a host-known count, none reading the device: capturable in a CUDA graph.
    with torch.no_grad():
        diff = None if fused else torch.empty_like(x)
        for _ in range(k - 1):
            centre = x[rows, cur].unsqueeze(1)
            if fused:
                step = torch.cdist(x, centre, compute_mode="donot_use_mm_for_euclid_dist").squeeze(-1)
            else:
                # Subtracting an expanded view: several times faster on CPU than broadcasting.
                torch.sub(x, centre.expand_as(x), out=diff)
                # (x - c)^2 summed, not |x|^2 - 2xc + |c|^2: exact zeros for duplicates and
                # bit-for-bit the reference's distances (hence its picks). x*x == x**2 exactly.
                step = diff.mul_(diff).sum(-1)
            torch.minimum(dist, step, out=dist)
            dist.scatter_(1, cur.unsqueeze(1), -1.0)  # below every real distance: never re-picked
            cur = dist.argmax(dim=1)
            picks.append(cur)
    return torch.stack(picks, dim=1)


def _fps_by_products(
    x: torch.Tensor, valid: torch.Tensor, k: int, cur: torch.Tensor, sq: torch.Tensor, picks: list[torch.Tensor]
) -> torch.Tensor:
    """The FPS steps from one matrix-vector product each (see :func:`farthest_point_sampling`).

    ``|x_i|^2`` is the same in every step, so only ``m_i = min over picks c of |c|^2 - 2 x_i.c``
    is kept (-inf at padded and picked tokens) and the squared distance is ``|x_i|^2 + m_i``.
    k - 1 host-counted steps with no device read: capturable in a CUDA graph.
    """
    b, n, _ = x.shape
    rows = torch.arange(b, device=x.device)
    best = torch.full((b, n), math.inf, device=x.device).masked_fill(~valid, -math.inf)
    half = x.dtype in (torch.float16, torch.bfloat16)
    with torch.no_grad(), ops.full_float32(x.device):
        for _ in range(k - 1):
            centre = x[rows, cur].unsqueeze(-1)  # (B, D, 1)
            if half:  # products exact in float32, the tokens read in their dtype (ops.wide_bmm)
                step = torch.add(sq[rows, cur].view(b, 1), ops.wide_bmm(x, centre).squeeze(-1), alpha=-2.0)
            else:
                # |c|^2 - 2 x_i.c: the gathered |c|^2 broadcast into one batched product.
                step = torch.baddbmm(sq[rows, cur].view(b, 1, 1), x, centre, alpha=-2.0).squeeze(-1)
            torch.minimum(best, step, out=best)
            best.scatter_(1, cur.unsqueeze(1), -math.inf)  # never re-picked
            cur = (sq + best).argmax(dim=1)
            picks.append(cur)
    return torch.stack(picks, dim=1)


def density_peak_basis(x: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering (DPC-KNN) centres and cluster means, as the ApET code's ``dpc``.

    * distances ``d(i, j) = |x_i - x_j| / sqrt(D)`` between valid tokens;
    * local density ``rho_i = exp(-mean of d^2 to the k nearest tokens)`` (self included,
      as in the reference, which uses the basis count as the neighbour count);
    * ``delta_i`` = distance to the nearest token of higher density (the densest token
      gets the largest distance of the row); ties in density are broken by the lower
      index instead of the reference's random jitter;
    * centres: the ``k`` largest ``rho * delta``; every token joins its nearest centre
      (a centre always its own cluster); the basis is the mean of each cluster, as in
      the reference (``indices`` are the centres, in score order).

    Memory is ``O(B N^2)`` (the reference broadcasts ``(B, N, N, D)``).
    """
    b, n, d = x.shape
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    # Distances from a float64 Gram matrix: in float32 its rounding (which differs between
    # batch shapes on CUDA) flips near-tied densities, so a row could get other centres
    # alone than in a batch; float64 leaves only true ties, broken by index below.
    x64 = x.double()
    sq = (x64 * x64).sum(-1)
    d2 = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2.0 * (x64 @ x64.transpose(1, 2))).clamp_min(0.0).float()
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    dist = (d2.masked_fill(eye, 0.0) / d).sqrt()

    near = dist.masked_fill(~pair, math.inf).topk(k, dim=2, largest=False).values
    density = torch.exp(-(near.masked_fill(~torch.isfinite(near), 0.0) ** 2).mean(-1))

    idx = torch.arange(n, device=x.device)
    rho_i, rho_j = density.unsqueeze(2), density.unsqueeze(1)
    higher = (rho_j > rho_i) | ((rho_j == rho_i) & (idx.view(1, 1, n) < idx.view(1, n, 1)))
    higher &= pair
    dist_max = dist.masked_fill(~pair, 0.0).flatten(1).amax(dim=1).view(b, 1, 1)
    delta = torch.where(higher, dist, dist_max).amin(dim=2)

    score = delta * density
    centres, _ = ops.topk_per_row(score, torch.full((b,), k, device=x.device), valid, k)
    # A row with fewer than k valid tokens (never reduced, so never used) repeats a pick.
    centres = torch.where(centres >= 0, centres, centres[:, :1].clamp_min(0))

    to_centre = ops.gather_rows(dist.transpose(1, 2), centres).transpose(1, 2)  # (B, N, k)
    assign = to_centre.argmin(dim=2)
    assign.scatter_(1, centres, torch.arange(k, device=x.device).expand(b, k))
    assign = assign.masked_fill(~valid, -1)
    sums, counts = ops.merge_into(x, assign, k)
    return centres, sums / counts.clamp_min(1.0).unsqueeze(-1)


def random_basis(x: torch.Tensor, valid: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Indices ``(B, k)`` of ``k`` distinct valid tokens drawn uniformly (seeded).

    The ApET code draws with replacement (``randint``); distinct picks avoid a
    duplicated basis token, which only makes the basis rank deficient.
    """
    b, n, _ = x.shape
    scores = _row_random_scores(n, seed, x.device).expand(b, n)
    picks, _ = ops.topk_per_row(scores, torch.full((b,), k, device=x.device), valid, k)
    return picks


def select_basis(
    x: torch.Tensor,
    valid: torch.Tensor,
    k: int,
    *,
    method: str,
    start: str,
    seed: int,
    sq_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices (B, k), basis (B, k, D) float32)`` by ``method`` (``fps`` | ``dpc`` | ``random``).

    ``sq_norms``: the tokens' squared norms, for FPS's product form (see
    :func:`farthest_point_sampling`). ``x`` may be half precision there (ApET at large
    inputs on CUDA): the basis is widened, exactly.
    """
    if method == "dpc":
        return density_peak_basis(x, valid, k)
    if method == "fps":
        picks = farthest_point_sampling(x, valid, k, start=start, seed=seed, sq_norms=sq_norms)
    else:
        picks = random_basis(x, valid, k, seed=seed)
    return picks, ops.gather_rows(x, picks).float()
