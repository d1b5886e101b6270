"""The one recursion behind GAE, HVM and returns: a reverse first-order linear scan.

    x_t = a_t * x_{t+1} + b_t,     x_T = 0,     along the last dim of (B, T) tensors.

GAE is `a = gamma * lambda`, `b = delta`; returns are `a = gamma`, `b = r`; a carry through a token is
`a = 1, b = 0`; a restart at a segment end is `a = 0`.

The pure-torch path is a blocked scan: each block of C = 64 tokens is solved with C vectorised steps
(over all rows and blocks at once), which also gives P = prod(a) over the rest of the block; the block
carries then satisfy the same recursion on a (B, T / C) problem, solved recursively. Python-level steps:
about C * log_C(T) (128 at T = 16384), never T. No logs or divisions, so a = 0 is exact.
"""

from __future__ import annotations

import torch

__all__ = ["reverse_linear_scan"]

CHUNK = 64


def reverse_linear_scan(a: torch.Tensor | float, b: torch.Tensor, *, chunk: int = CHUNK) -> torch.Tensor:
    """Solve x_t = a_t * x_{t+1} + b_t backwards with x_T = 0.

    Args:
        a: decay, a float or a tensor broadcastable to `b`'s shape (B, T).
        b: input, float tensor (B, T).
        chunk: block length C of the blocked scan.

    Returns:
        x: tensor (B, T) with `b`'s dtype. The inputs are not modified.
    """
    B, T = b.shape
    a = torch.as_tensor(a, dtype=b.dtype, device=b.device).expand(B, T)
    if T == 0:
        return b.clone()
    n_blocks = -(-T // chunk)
    C = chunk if n_blocks > 1 else T
    pad = n_blocks * C - T
    # (C, B, N) layout: step j of the loop touches one contiguous (B, N) slab.
    # Padding past the end has a = b = 0, so x stays 0 there and x_T = 0 holds.
    a3, x3 = (_blocks(t, pad, n_blocks, C) for t in (a, b))
    # In place, block-local (x_{C} = 0):  x[j] = b[j] + a[j] * x[j+1];  a[j] <- P[j] = a[j] * P[j+1]
    for j in range(C - 2, -1, -1):
        x3[j].addcmul_(a3[j], x3[j + 1])
        a3[j].mul_(a3[j + 1])
    if n_blocks > 1:
        # Block starts obey the same recursion one level up: c_k = x3[0, k] + P[0, k] * c_{k+1}.
        starts = reverse_linear_scan(a3[0], x3[0], chunk=chunk)  # (B, N)
        carry_in = torch.zeros_like(starts)  # c_{k+1}, the exact value entering block k from the right
        carry_in[:, :-1] = starts[:, 1:]
        x3.addcmul_(a3, carry_in)  # x[j, k] += P[j, k] * c_{k+1}
    del a3  # the result's copy below then holds x3 and itself only
    return x3.permute(1, 2, 0).reshape(B, n_blocks * C)[:, :T]


def _blocks(x: torch.Tensor, pad: int, n_blocks: int, C: int) -> torch.Tensor:
    """(B, T) -> a fresh (C, B, N) tensor of its blocks, zero-padded past T: one copy (two where T is not a multiple
    of C). Always a copy, which the scan then overwrites: `.contiguous()` alone would return the caller's own
    memory where the permuted view happens to be contiguous (one row and one block)."""
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    blocks = torch.empty((C, x.shape[0], n_blocks), dtype=x.dtype, device=x.device)
    return blocks.copy_(x.reshape(x.shape[0], n_blocks, C).permute(2, 0, 1))
