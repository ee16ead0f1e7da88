"""The result every reducer returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Reduction:
    """What a reducer kept of ``(B, N, D)`` input tokens.

    Rows may keep different numbers of tokens (a padding mask, or a ratio budget
    over rows of different valid length). Outputs are then right-padded to the
    largest count ``T``; ``valid`` marks the real slots.

    Attributes:
        tokens: ``(B, T, D)`` kept (possibly merged) features, input dtype and device.
            Padded slots are zero.
        indices: ``(B, T)`` int64 positions into the input, ascending over the valid
            slots of each row. Padded slots hold ``-1``.
        keep_mask: ``(B, N)`` bool, ``True`` at the kept positions.
        valid: ``(B, T)`` bool, ``True`` at real slots.
        sizes: optional ``(B, T)`` float32: how many input tokens each kept token
            stands for (1 for a plain kept token, more after merging; 0 at padded
            slots). Useful for size-aware (proportional) attention.
        info: reducer-specific diagnostics (scores, errors, basis indices, ...).
    """

    tokens: torch.Tensor
    indices: torch.Tensor
    keep_mask: torch.Tensor
    valid: torch.Tensor
    sizes: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> torch.Tensor:
        """``(B,)`` number of tokens kept per row."""
        return self.valid.sum(dim=1)

    @property
    def num_kept(self) -> int:
        """Largest number of tokens kept in any row (``T``)."""
        return self.tokens.shape[1]

    def to(self, device: torch.device | str) -> Reduction:
        """The same reduction on another device (dtypes unchanged)."""
        sizes = None if self.sizes is None else self.sizes.to(device)
        return Reduction(
            tokens=self.tokens.to(device),
            indices=self.indices.to(device),
            keep_mask=self.keep_mask.to(device),
            valid=self.valid.to(device),
            sizes=sizes,
            info=dict(self.info),
        )
