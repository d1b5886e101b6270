"""Interior zeros of `response_mask`: cut the masked tokens out, compute, put the results back.

docs/spec.md: every recursion runs over a row's valid tokens only, as if masked tokens (tool / observation
tokens in multi-turn rollouts) were cut out. The algorithms in this package are written for
right-padded rows (valid tokens first); `Compactor` moves each row's valid tokens to the left when
the mask is not already right-padded and scatters results back, so every algorithm has one path.
"""

from __future__ import annotations

import torch

__all__ = ["Compactor"]


class Compactor:
    """Maps (B, T) tensors between the original layout and the right-padded ("compact") layout.

    Args:
        mask: bool (B, T), every row with at least one True.

    Attributes:
        lengths: int64 (B,), l_b = number of valid tokens per row.
        mask: bool (B, T) of the compact layout: `t < l_b`.
        identity: True when the input mask is already right-padded (then both maps are no-ops).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        B, T = mask.shape
        self.lengths = mask.view(torch.uint8).sum(dim=1, dtype=torch.int32).long()  # bool sums are ~2x slower
        positions = torch.arange(T, device=mask.device)
        compact_mask = positions < self.lengths[:, None]
        self.identity = bool(torch.equal(compact_mask, mask))
        self.mask = compact_mask
        if self.identity:
            return
        # rank of each token among its row's valid tokens (masked tokens: the rank of the last valid one before)
        rank = mask.cumsum(dim=1) - 1
        # source[b, j] = original position of the j-th valid token of row b; masked tokens go to a dump column T
        dest = torch.where(mask, rank, torch.full_like(rank, T))
        source = torch.zeros(B, T + 1, dtype=torch.long, device=mask.device)
        source.scatter_(1, dest, positions.expand(B, T).contiguous())
        self._source = source[:, :T]
        # Each original position reads back the compact slot of its own rank (masked tokens: a neighbour's).
        self._rank = rank.clamp_min(0)

    def compact(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) original layout -> (B, T) right-padded layout (entries past l_b are arbitrary)."""
        return x if self.identity else x.gather(1, self._source)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded layout -> original layout (masked positions get a neighbour's value)."""
        return x if self.identity else x.gather(1, self._rank)
