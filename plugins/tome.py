"""``tome``: Token Merging, repeated bipartite soft matching until exactly T tokens remain."""

from __future__ import annotations

import torch

from tokenreduce import Reducer, Stage, make_reduction, ops
from tokenreduce.numerics import safe_scale, unscale


class ToMe(Reducer):
    """ToMe: merge the most similar token pairs by bipartite soft matching, round after round.

    One round, as ``bipartite_soft_matching`` + ``merge_wavg`` in the official code:
    the current tokens (in their current order) are split alternately into sets A
    (even positions) and B (odd positions); each A token finds its most
    cosine-similar B token; the ``r`` A tokens with the most similar matches are
    merged into their match by a size-weighted average, and the sequence becomes
    ``[unmerged A in decreasing match similarity, B in order]``. One round removes at
    most half of the tokens, so rounds repeat with ``r = min(n - T, n // 2)`` until
    exactly ``T`` remain (``ceil(log2(N / T))`` rounds or so).

    Similarity uses the current (merged) features themselves: there is no next layer
    to provide fresh keys, as ToMe in a ViT would use. Each kept token's index is its
    surviving B-chain token (the one never merged away); outputs are in position
    order. ``sizes`` counts the input tokens each output averages (for proportional
    attention); ``info["assignment"] (B, N)`` gives each input token's output slot.

    On CUDA: cosine similarities come from one product divided by the norms
    (:func:`tokenreduce.ops.cosine_similarity`), the merge sums from a one-hot product
    (:func:`tokenreduce.ops.merge_into`), both in TF32 (:mod:`tokenreduce.precision`), and
    a merged B token's weighted sum is formed in one fused multiply-add pass: the same
    values up to float32 rounding, so a near-tie between matches can resolve differently.

    Stages: any (features only).

    Paper: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023,
    arXiv:2210.09461. Official code: https://github.com/facebookresearch/ToMe
    """

    name = "tome"
    stages = frozenset(Stage)
    # Without a mask every row has the same live count, so the rounds and their sizes are
    # planned on the host: no device read, capturable in a CUDA graph.
    graph_safe = True
    paper = (
        'Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, arXiv:2210.09461 '
        "(github.com/facebookresearch/ToMe)"
    )

    def reduce(self, tokens, counts, valid, context):
        b, n, _ = tokens.shape
        dev = tokens.device
        t = context.uniform_count
        # Rows of extreme magnitude are divided by a power of two (exact; cosine
        # similarities and weighted means do not change), so float32 sums cannot overflow.
        # Without padding (t known) there is nothing to mask.
        x, scale = safe_scale(tokens, None if t is not None else valid)
        owner = torch.arange(n, device=dev).expand(b, n)  # per input token: its group's representative
        if t is not None:
            # Every token valid, every row keeping t: the live count after each round is the
            # same in every row and known here, so is each round's r. The state starts in
            # position order (the sort below would be the identity).
            pos = torch.arange(n, device=dev).expand(b, n)
            state = (x, valid.float(), valid, pos)
            live, rounds = n, 0
            while min(live - t, live // 2) > 0:
                r = min(live - t, live // 2)
                # The state holds the live tokens only: each round's similarities, gathers and
                # merges shrink with the live count instead of staying (B, N, D).
                state, owner = _merge_round(*state, r, owner, live)
                live, rounds = live - r, rounds + 1
        else:
            # Working state, in the current token order with live tokens first (padding
            # last): features, sizes, liveness and each token's representative (original index).
            perm = torch.sort((~valid).long(), dim=1, stable=True).indices
            state = (ops.gather_rows(x, perm), valid.gather(1, perm).float(), valid.gather(1, perm), perm)
            rounds = 0
            while True:  # per-row budgets: rounds until no row has tokens left to merge (one read each)
                live = state[2].sum(dim=1)
                r = torch.minimum(live - counts, live // 2).clamp(min=0)
                if not bool((r > 0).any()):
                    break
                state, owner = _merge_round(*state, r, owner)
                rounds += 1
            t = int(counts.max())
        x, size, alive, rep = state

        # Output in position order of the representatives.
        slots = ops.slot_mask(counts, t)
        order = torch.sort(torch.where(alive, rep, n), dim=1).indices[:, :t]
        indices = rep.gather(1, order).masked_fill(~slots, -1)
        # Output slot of every input token: the slot of its group's representative.
        slot_of = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)
        slot_of.scatter_(1, torch.where(slots, indices, n), torch.arange(t, device=dev).expand(b, t))
        assignment = torch.where(valid, slot_of.gather(1, owner), torch.full_like(owner, -1))
        return make_reduction(
            tokens,
            indices,
            slots,
            features=unscale(ops.gather_rows(x, order), scale, tokens.dtype),
            sizes=size.gather(1, order),
            info={"assignment": assignment, "rounds": rounds},
        )


def _merge_round(x, size, alive, rep, r, owner, live=None):
    """One round of bipartite soft matching, merging ``r[b]`` tokens of each row.

    ``x (B, N, D)`` float32 features, ``size``/``alive``/``rep (B, N)`` in the current
    order (live first); ``owner (B, N)`` maps input tokens to representatives. ``r`` is
    ``(B,)``; or an int, with ``live`` the host-known live count, when the state holds
    exactly ``live`` tokens, all live, in every row and each merges ``r``: the new order is
    then known without a sort, and the new state holds exactly the ``live - r`` left.
    Returns the new state (the same layout) and owner map.
    """
    b, _, d = x.shape
    n = owner.shape[1]  # input tokens: rep holds their indices (the state may be cut to its live tokens)
    dev = x.device
    uniform = live is not None
    xa, xb = x[:, 0::2], x[:, 1::2]
    ok_a, ok_b = alive[:, 0::2], alive[:, 1::2]
    scores = ops.cosine_similarity(xa, xb)
    if not uniform:  # (uniform: every token of the state is live, nothing to mask)
        scores = scores.masked_fill(~(ok_a.unsqueeze(2) & ok_b.unsqueeze(1)), float("-inf"))
    node_max, node_idx = scores.max(dim=2)  # a row reaching here has n >= 2, so B is not empty
    # A tokens by decreasing best match; the first r[b] of each row are merged away.
    edge = torch.sort(node_max, dim=1, descending=True, stable=True).indices
    is_src = torch.arange(edge.shape[1], device=dev)[None] < (r if uniform else r[:, None])
    dst = node_idx.gather(1, edge)
    a_x = xa.gather(1, edge.unsqueeze(-1).expand(-1, -1, d))
    a_size, a_rep = size[:, 0::2].gather(1, edge), rep[:, 0::2].gather(1, edge)

    # Size-weighted average into the B tokens (merge_wavg: sum x * size, sum size, divide).
    sums, added = ops.merge_into(a_x, torch.where(is_src, dst, -1), xb.shape[1], a_size)
    b_size = size[:, 1::2]
    new_b_size = b_size + added
    if ops.cuda_formulas(x):
        # One fused pass for x_b * size_b + sums, divided in place: two passes over the
        # (B, N/2, D) state fewer (an FMA may round differently from the product and sum).
        merged = torch.addcmul(sums, xb, b_size.unsqueeze(-1)).div_(new_b_size.clamp(min=1e-12).unsqueeze(-1))
    else:
        merged = (xb * b_size.unsqueeze(-1) + sums) / new_b_size.clamp(min=1e-12).unsqueeze(-1)
    new_xb = torch.where((added > 0).unsqueeze(-1), merged, xb)

    # Input tokens owned by a merged A token now belong to its B token (spare column n
    # absorbs the writes of A tokens that are not merged).
    remap = torch.arange(n + 1, device=dev).repeat(b, 1)
    remap.scatter_(1, torch.where(is_src, a_rep, n), rep[:, 1::2].gather(1, dst))
    owner = remap.gather(1, owner)

    if uniform:
        # The state holds exactly the ``live`` tokens, all live: the new one is the order the
        # stable sort below gives, known on the host, cut to its live - r tokens: A but its
        # first r (merged away), by match, then B in order.
        def order(a: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
            # A round that merges every A token (most rounds: r = live // 2) keeps B alone: no copy.
            return torch.cat([a[:, r:], bb], dim=1) if a.shape[1] > r else bb

        state = (order(a_x, new_xb), order(a_size, new_b_size), alive[:, : live - r], order(a_rep, rep[:, 1::2]))
        return state, owner

    # New order as in the official code: [unmerged A by match, B in order]; live first.
    a_ok = ok_a.gather(1, edge)
    x = torch.cat([a_x, new_xb], dim=1)
    size = torch.cat([a_size, new_b_size], dim=1)
    rep = torch.cat([a_rep, rep[:, 1::2]], dim=1)
    alive = torch.cat([a_ok & ~is_src, ok_b], dim=1)
    live_first = torch.sort((~alive).long(), dim=1, stable=True).indices
    state = (
        ops.gather_rows(x, live_first),
        size.gather(1, live_first),
        alive.gather(1, live_first),
        rep.gather(1, live_first),
    )
    return state, owner
