"""Generalized Advantage Estimation with a per-token lambda (docs/spec.md "GAE").

    delta_t = r_t + gamma * V_{t+1} - V_t          (V_{t+1} = 0 after the last valid token)
    A_t     = delta_t + gamma * lambda_t * A_{t+1}
    G_t     = A_t + V_t                             (returns, taken before whitening)

Reference: Schulman et al. 2016, https://arxiv.org/abs/1506.02438 ; verl's `compute_gae_advantage_return`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._blocks import map_row_blocks, row_blocks
from ._checks import check_finite, check_mask, check_probability, check_same_shape, check_tensor, float_dtype
from ._compact import Compactor
from ._hparams import check_hparam
from .scan import reverse_linear_scan

__all__ = [
    "WHITEN_EPS",
    "check_gae_args",
    "check_lambda",
    "compute_gae",
    "masked_whiten",
    "next_token_values",
    "whiten_in_place",
]

WHITEN_EPS = 1e-8  # (A - mean) * rsqrt(var + WHITEN_EPS), as verl's masked_whiten


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mean) * rsqrt(var + WHITEN_EPS) with the mean and unbiased variance over `mask` (verl's `masked_whiten`).

    Computed in float64 and returned in `values`' dtype: float32 sums and squares overflow for large finite inputs
    (|x| ~ 1e20 squares past float32's 3.4e38).

    Args:
        values: float (B, T), finite.
        mask: bool/int/float (B, T) of 0 and 1 (rows with no valid token allowed).
        sum_over_processes: with data parallelism, a function that sums a small float64 tensor over the processes
            (e.g. `lambda t: accelerator.reduce(t, "sum")`): the mean and variance are then those of every
            process's valid tokens, as one process holding the whole batch would compute them (each process passes
            its own rows). None: this process's rows only.

    Returns:
        float (B, T); an empty batch (no valid token at all, B = 0) comes back unchanged.

    Raises:
        TypeError, ValueError: naming the argument (types, shapes, NaN/inf, mask values); exactly one valid token
            in the batch (the variance is undefined).
    """
    values = check_tensor(values, "values", ndim=2)
    if not values.is_floating_point():
        raise TypeError(f"`values` must be a float tensor, got {values.dtype}")
    mask = check_mask(mask, allow_empty_rows=True, name="mask")
    check_same_shape(mask, "mask", values.shape, "values")
    check_finite(values, "values")
    if sum_over_processes is not None and not callable(sum_over_processes):
        raise TypeError(f"`sum_over_processes` must be a function or None, got {type(sum_over_processes).__name__}")
    return _masked_whiten(values, mask, sum_over_processes=sum_over_processes)


def whiten_in_place(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`masked_whiten` into `values` itself (no second (B, T) tensor): for advantages the caller has just made."""
    return _masked_whiten(values, mask, inplace=True)


def _masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    inplace: bool = False,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    reduce = sum_over_processes or (lambda t: t)
    # blocks of rows: per-block float64 sums (count and sum, then centred squares), then one elementwise pass
    blocks = row_blocks(values.shape, values.device)
    zero = torch.zeros((), dtype=torch.float64, device=values.device)
    total = sum((torch.where(mask[b], values[b].double(), 0.0).sum() for b in blocks), zero)
    # (count_nonzero: a bool `sum` makes an int64 copy of the mask first)
    count, total = reduce(torch.stack([mask.count_nonzero().double(), total]))
    if int(count) == 0:
        return values
    if int(count) < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens in `response_mask`, got {int(count)}")
    mean = total / count
    squares = reduce(
        sum((torch.where(mask[b], (values[b].double() - mean).square_(), 0.0).sum() for b in blocks), zero)
    )
    scale = torch.rsqrt(squares / (count - 1) + WHITEN_EPS)
    out = values if inplace else torch.empty_like(values)
    for b in blocks:  # (each block is read before it is written)
        out[b] = (values[b].double() - mean).mul_(scale)
    return out


def next_token_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """V_{t+1} in a right-padded layout: the next token's value, 0 after the row's last valid token."""
    next_values = torch.zeros_like(values)
    next_values[:, :-1] = torch.where(mask[:, 1:], values[:, 1:], 0.0)
    return next_values


def check_lambda(lam: float | torch.Tensor, name: str, shape: torch.Size, mask: torch.Tensor) -> float | torch.Tensor:
    """A float in [0, 1], or a (B, T) tensor in [0, 1] at valid positions (finite everywhere)."""
    if not isinstance(lam, torch.Tensor):
        return check_probability(lam, name, "gae_lambda")
    check_same_shape(lam, name, shape, "rewards")
    check_finite(lam, name)
    if lam.numel() == 0:
        return lam
    low, high = torch.aminmax(lam)
    if low < 0 or high > 1:  # masked positions may hold anything finite: look at the valid ones only
        valid = lam[mask]
        if not bool(((valid >= 0) & (valid <= 1)).all()):
            raise ValueError(
                f"`{name}` must be in [0, 1] at valid tokens, got values in [{valid.min()}, {valid.max()}]"
            )
    return lam


def check_gae_args(
    rewards: object, values: object, mask: torch.Tensor, *, finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_gae`'s checks of `rewards` and `values` (on a validated bool `mask`); `finite=False` leaves out the
    pass over the data."""
    rewards = check_tensor(rewards, "rewards", ndim=2)
    values = check_tensor(values, "values", ndim=2)
    check_same_shape(values, "values", rewards.shape, "rewards")
    check_same_shape(mask, "response_mask", rewards.shape, "rewards")
    if finite:
        check_finite(rewards, "rewards")
        check_finite(values, "values")
    return rewards, values


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    gamma: float,
    lam: float | torch.Tensor,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns over each row's valid tokens (masked tokens are skipped, not discounted).

    Args:
        rewards: float (B, T), token-level rewards r_t.
        values: float (B, T), V(s_t), the value of the state before token t.
        response_mask: bool/int/float (B, T) of 0 and 1; interior zeros are skipped as verl does.
        gamma: discount in [0, 1].
        lam: lambda in [0, 1], a float or a per-token (B, T) tensor (EA-GAE).
        whiten: whiten the advantages over valid tokens (verl's `masked_whiten`).

    Returns:
        (advantages, returns), both float (B, T); `returns` are A + V before any whitening.

    Raises:
        TypeError, ValueError: naming the argument (shapes, NaN/inf, mask values, empty rows, ranges).
    """
    mask = check_mask(response_mask)
    rewards, values = check_gae_args(rewards, values, mask)
    gamma = check_probability(gamma, "gamma")
    lam = check_lambda(lam, "lam", rewards.shape, mask)
    check_hparam("whiten_advantages", whiten, "whiten")

    dtype = float_dtype(rewards, values, lam if isinstance(lam, torch.Tensor) else None)
    outputs = [torch.empty(mask.shape, dtype=dtype, device=mask.device) for _ in range(2)]
    advantages, returns = map_row_blocks(_gae_rows, outputs, (rewards, values, mask, lam), gamma, dtype)
    if whiten:
        advantages = whiten_in_place(advantages, mask)
    return advantages, returns


def _gae_rows(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    lam: float | torch.Tensor,
    gamma: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE on some rows: compact them, one scan, expand."""
    layout = Compactor(mask)
    r = layout.compact(rewards.to(dtype))
    v = layout.compact(values.to(dtype))
    decay = gamma * (layout.compact(lam.to(dtype)) if isinstance(lam, torch.Tensor) else lam)
    if isinstance(decay, torch.Tensor):  # lambda past a row's end may be anything finite: keep the scan at 0 there
        decay = torch.where(layout.mask, decay, 0.0)

    # delta_t = r_t + gamma * V_{t+1} - V_t on valid tokens, 0 past the end (so A stays 0 there)
    deltas = torch.where(layout.mask, r + gamma * next_token_values(v, layout.mask) - v, 0.0)
    # A_t = delta_t + gamma * lambda_t * A_{t+1}
    advantages = reverse_linear_scan(decay, deltas)
    returns = advantages + v

    return layout.expand(advantages), layout.expand(returns)
