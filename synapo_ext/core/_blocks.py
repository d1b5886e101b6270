"""Blocks of rows: the pure-torch path runs its (B, T) passes on a few rows at a time, so that its temporaries
are a handful of block-sized tensors and only the outputs are (B, T). Every pass is row-independent, so the
results do not depend on the block size."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["map_row_blocks", "row_blocks", "row_counts"]

# tokens per block: on the CPU 1M (4 MiB per float32 temporary); on a GPU 32M, enough to fill it (8192 x 4096 is
# one block), since each block costs a few hundred kernel launches
CPU_BLOCK_TOKENS = 1 << 20
GPU_BLOCK_TOKENS = 1 << 25


def row_blocks(shape: tuple[int, ...], device: torch.device | str) -> list[slice]:
    """Slices of whole rows covering `shape[0]` rows of `shape[1]` tokens, each at most a block's tokens (at least
    one row)."""
    B, T = shape[0], shape[1]
    tokens = CPU_BLOCK_TOKENS if torch.device(device).type == "cpu" else GPU_BLOCK_TOKENS
    rows = max(1, tokens // max(T, 1))
    return [slice(i, i + rows) for i in range(0, B, rows)]


def map_row_blocks(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    outputs: Sequence[torch.Tensor],
    per_row: Sequence[torch.Tensor | float],
    *args: object,
) -> Sequence[torch.Tensor]:
    """For every block b of rows: `outputs[i][b] = fn(*(x[b] for x in per_row), *args)[i]`. An entry of `per_row`
    that is not a tensor (a constant lambda) goes to every block as it is. Returns `outputs`, each (B, T)."""
    first = outputs[0]
    for b in row_blocks(first.shape, first.device):
        results = fn(*(x[b] if isinstance(x, torch.Tensor) else x for x in per_row), *args)
        for out, result in zip(outputs, results, strict=True):
            out[b] = result
        del results, result  # not held while the next block is computed
    return outputs


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row of a bool (B, T) mask, int64 (B,), by blocks of rows: torch sums a bool or uint8
    tensor through a widened copy of it (int64: 8 bytes a token)."""
    counts = [mask[b].view(torch.uint8).sum(dim=1, dtype=torch.int32) for b in row_blocks(mask.shape, mask.device)]
    return torch.cat(counts).long() if counts else torch.zeros(0, dtype=torch.long, device=mask.device)
