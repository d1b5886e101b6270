"""HVM: hierarchical value modelling, a local (tactical) and a global (strategic) critic head (docs/spec.md "HVM").

For segment k with first token s_k, last token e_k and n_k tokens (valid tokens only):

    g_k      = V_glob[s_k],  g_K = 0
    local:   deltaL_t = r_t + gamma * V_loc[t+1] - V_loc[t]    (at t = e_k the bootstrap is g_{k+1})
             AL_t     = deltaL_t + gamma * lambda_t * AL_{t+1}  (restarting at 0 after e_k)
             local target LR_t = sum_{s=t..e_k} gamma^(s-t) r_s + gamma^(e_k-t+1) g_{k+1}
    global:  deltaG_k = R_k + gamma^n_k g_{k+1} - g_k = LR_{s_k} - g_k
             AG_k     = deltaG_k + gamma^n_k * global_lam * AG_{k+1}
             global target = sum_{t >= s_k} gamma^(t-s_k) r_t   (Monte-Carlo from s_k)
    A_t = AL_t + global_weight * AG_{k(t)}
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._blocks import map_row_blocks
from ._checks import check_finite, check_mask, check_probability, check_same_shape, check_tensor, float_dtype
from ._compact import Compactor
from ._hparams import check_hparam
from .gae import check_lambda, next_token_values, whiten_in_place
from .scan import reverse_linear_scan

__all__ = ["HVMResult", "check_hvm_args", "hvm_advantages", "segment_bounds"]


class HVMResult(NamedTuple):
    """Outputs of `hvm_advantages`, all (B, T).

    advantages: A_t = AL_t + global_weight * AG_{k(t)} (whitened if asked).
    local_returns: the local head's target at every token.
    global_returns: the global head's target of the segment holding token t (Monte-Carlo from s_k).
    start_mask: bool, True at each segment's first valid token s_k (where the global head is trained).
    """

    advantages: torch.Tensor
    local_returns: torch.Tensor
    global_returns: torch.Tensor
    start_mask: torch.Tensor


def segment_bounds(seg_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_start, is_end), bool (B, T), on right-padded rows: the first and last token of each segment."""
    is_start = mask.clone()
    is_start[:, 1:] &= seg_ids[:, 1:] != seg_ids[:, :-1]
    is_end = mask.clone()
    is_end[:, :-1] &= ~mask[:, 1:] | (seg_ids[:, 1:] != seg_ids[:, :-1])
    return is_start, is_end


def _check_seg_ids(seg_ids: object, shape: torch.Size, mask: torch.Tensor) -> torch.Tensor:
    seg_ids = check_tensor(seg_ids, "seg_ids", ndim=2)
    check_same_shape(seg_ids, "seg_ids", shape, "rewards")
    if seg_ids.is_floating_point() or seg_ids.dtype == torch.bool:
        raise TypeError(f"`seg_ids` must be an integer tensor, got {seg_ids.dtype}")
    return seg_ids


def check_hvm_args(
    rewards: object,
    local_values: object,
    global_values: object,
    mask: torch.Tensor,
    *,
    global_weight: float,
    finite: bool = True,
) -> torch.Tensor:
    """`hvm_advantages`'s checks of its tensors (on a validated bool `mask`) and `global_weight`; returns rewards.
    `finite=False` leaves out the passes over the data."""
    rewards = check_tensor(rewards, "rewards", ndim=2)
    check_same_shape(mask, "response_mask", rewards.shape, "rewards")
    for name, x in (("local_values", local_values), ("global_values", global_values)):
        check_same_shape(check_tensor(x, name, ndim=2), name, rewards.shape, "rewards")
        if finite:
            check_finite(x, name)
    if finite:
        check_finite(rewards, "rewards")
    check_hparam("hvm_global_weight", global_weight, "global_weight")
    return rewards


def hvm_advantages(
    rewards: torch.Tensor,
    local_values: torch.Tensor,
    global_values: torch.Tensor,
    response_mask: torch.Tensor,
    seg_ids: torch.Tensor,
    *,
    gamma: float,
    lam: float | torch.Tensor,
    global_lam: float,
    global_weight: float,
    whiten: bool = False,
) -> HVMResult:
    """Two-level advantages and the targets of both critic heads.

    Args:
        rewards: float (B, T), token-level rewards.
        local_values: float (B, T), V_loc(s_t).
        global_values: float (B, T), V_glob(s_t); only its value at each segment start is used.
        response_mask: bool/int/float (B, T) of 0 and 1 (interior zeros are skipped).
        seg_ids: integer (B, T) from `segment_ids`: nondecreasing over each row's valid tokens; a change of
            id between consecutive valid tokens starts a new segment.
        gamma: discount in [0, 1].
        lam: local lambda in [0, 1], a float or a per-token (B, T) tensor (EA-GAE).
        global_lam: lambda of the GAE over segments, in [0, 1].
        global_weight: weight of the global advantage in A_t.
        whiten: whiten the advantages over valid tokens (verl's `masked_whiten`).

    Returns:
        HVMResult (advantages, local_returns, global_returns, start_mask), each (B, T).

    Raises:
        TypeError, ValueError: naming the argument.
    """
    mask = check_mask(response_mask)
    rewards = check_hvm_args(rewards, local_values, global_values, mask, global_weight=global_weight)
    seg_ids = _check_seg_ids(seg_ids, rewards.shape, mask)
    gamma = check_probability(gamma, "gamma")
    global_lam = check_probability(global_lam, "global_lam", "hvm_global_lambda")
    lam = check_lambda(lam, "lam", rewards.shape, mask)
    check_hparam("whiten_advantages", whiten, "whiten")

    dtype = float_dtype(rewards, local_values, global_values, lam if isinstance(lam, torch.Tensor) else None)
    # on blocks of rows (see `_hvm_rows`): the temporaries are block-sized, only the four outputs are (B, T)
    outputs = [torch.empty(mask.shape, dtype=dtype, device=mask.device) for _ in range(3)]
    outputs.append(torch.empty(mask.shape, dtype=torch.bool, device=mask.device))  # start_mask
    per_row = (rewards, local_values, global_values, mask, seg_ids, lam)
    advantages, local_returns, global_returns, start_mask = map_row_blocks(
        _hvm_rows, outputs, per_row, gamma, global_lam, global_weight, dtype
    )
    if whiten:
        advantages = whiten_in_place(advantages, mask)
    return HVMResult(advantages, local_returns, global_returns, start_mask)


def _hvm_rows(
    rewards: torch.Tensor,
    local_values: torch.Tensor,
    global_values: torch.Tensor,
    mask: torch.Tensor,
    seg_ids: torch.Tensor,
    lam: float | torch.Tensor,
    gamma: float,
    global_lam: float,
    global_weight: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HVM on some rows, in the module docstring's formulas: five reverse scans over the compacted rows."""
    layout = Compactor(mask)
    valid = layout.mask
    r = torch.where(valid, layout.compact(rewards.to(dtype)), 0.0)
    v_loc = layout.compact(local_values.to(dtype))
    v_glob = layout.compact(global_values.to(dtype))
    lam_t = layout.compact(lam.to(dtype)) if isinstance(lam, torch.Tensor) else lam
    is_start, is_end = segment_bounds(layout.compact(seg_ids), valid)
    inside = (valid & ~is_end).to(dtype)  # 0 at segment ends (the local recursions restart) and past the row

    # bootstrap: V_loc[t+1] inside a segment, g_{k+1} = V_glob[s_{k+1}] at e_k (0 after the last segment)
    bootstrap = torch.where(is_end, next_token_values(v_glob, valid), next_token_values(v_loc, valid))
    # local: deltaL_t = r_t + gamma * bootstrap_t - V_loc[t];  AL_t = deltaL_t + gamma * lambda_t * AL_{t+1}
    local_deltas = torch.where(valid, r + gamma * bootstrap - v_loc, 0.0)
    local_advantages = reverse_linear_scan(inside * gamma * lam_t, local_deltas)
    # local target: LR_t = r_t + gamma * LR_{t+1}, with LR_{e_k} = r_{e_k} + gamma * g_{k+1}
    local_returns = reverse_linear_scan(inside * gamma, r + torch.where(is_end, gamma * bootstrap, 0.0))

    # global: AG_k = (LR_{s_k} - g_k) + gamma^n_k * global_lam * AG_{k+1}; other tokens carry AG through
    global_deltas = torch.where(is_start, local_returns - v_glob, 0.0)
    # gamma^n_k at s_k: D_t = gamma * D_{t+1} inside a segment, D_{e_k} = gamma  (so D_t = gamma^(e_k - t + 1))
    discount = reverse_linear_scan(inside * gamma, is_end.to(dtype) * gamma) if gamma != 1.0 else 1.0
    global_decay = torch.where(is_start, discount * global_lam, torch.ones((), dtype=dtype, device=r.device))
    global_advantages = reverse_linear_scan(global_decay, global_deltas)
    # global target: Monte-Carlo return from s_k, G_t = r_t + gamma * G_{t+1}
    mc_returns = reverse_linear_scan(gamma, r)

    # A_t = AL_t + global_weight * AG_{k(t)}: segment-level values read at s_k for every token of segment k
    position = torch.arange(mask.shape[1], device=mask.device).expand_as(is_start)
    segment_start = torch.where(is_start, position, 0).cummax(dim=1).values
    advantages = global_advantages.gather(1, segment_start).mul_(global_weight)
    advantages += local_advantages  # (not add's alpha=, which may fuse the product into an FMA)
    global_returns = mc_returns.gather(1, segment_start)

    return (
        layout.expand(advantages),
        layout.expand(local_returns),
        layout.expand(global_returns),
        layout.expand(is_start) & mask,
    )
