"""The advantage stage fused into one compiled pass per row (numba, CPU): `compute_synapo_advantages` runs it on CPU
tensors when numba imports (`synapo_ext.core.backend.fused_kernels`), the torch stage (core/stage.py) otherwise.

The torch stage composes the public functions; this one runs `kernels.py`, which compute the actor's lambda, the
segments, HVM (or the decoupled GAE) and the per-row sums for the metrics and the whitening in one pass per row,
writing only the outputs asked for: no (B, T) lambda or int64 segment ids unless requested, start flags as bool,
every fresh output on huge pages (`_alloc.empty`). Whitening is one more in-place pass. Inputs are validated by the
same checks as the public functions, so errors name the same arguments.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch

from .._checks import check_mask, float_dtype
from ..config import SynAPOParams
from ..ea_gae import EA_GAE_EPS, check_ea_gae_args
from ..gae import WHITEN_EPS, check_gae_args
from ..hvm import check_hvm_args
from ..metrics import METRICS
from ..segments import check_segment_args
from ._alloc import empty

__all__ = ["FusedOutputs", "divergence", "stage", "stage_mask"]


def as_numpy(x: torch.Tensor):
    """A contiguous CPU tensor's memory as a numpy array (no copy when already contiguous)."""
    return x.detach().contiguous().numpy()


# a mask is read as the signed integers of its bits, one compiled variant per element size
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def stage_mask(k: SimpleNamespace, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch stage's `_mask_torch` (core/stage.py) in one pass over a mask of any dtype (bool, integer or
    float): the bool mask (the input itself when bool) and each row's length (last valid position + 1, int64 (B,))."""
    B, T = response_mask.shape
    lengths = torch.empty(B, dtype=torch.long)
    if response_mask.dtype == torch.bool:
        k.row_lengths(as_numpy(response_mask), as_numpy(lengths))
        return response_mask, lengths
    bits = _BITS[response_mask.element_size()]
    # the bits of 1 and of -0 in the mask's dtype (-0 is 0 for integers): every other value is refused
    one, neg_zero = torch.tensor([1.0, -0.0]).to(response_mask.dtype).view(bits).tolist()
    mask, bad = empty((B, T), torch.bool), torch.empty(B, dtype=torch.bool)
    k.mask_rows(as_numpy(response_mask.view(bits)), one, neg_zero, as_numpy(mask), as_numpy(lengths), as_numpy(bad))
    if bool(bad.any()):
        check_mask(response_mask)  # raises, naming the argument
        raise AssertionError("the mask kernel flagged a value that check_mask accepts")  # not reached
    return mask, lengths


def divergence(
    k: SimpleNamespace, ids: torch.Tensor, lengths: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> torch.Tensor:
    """scvl.py's `_divergence` compiled (same arguments, same int64 (P,) result), for the stage's SCVL pairs."""
    shortest = torch.minimum(lengths[pos], lengths[neg])
    out = torch.empty_like(pos)
    k.divergence(as_numpy(ids), as_numpy(pos), as_numpy(neg), as_numpy(shortest), as_numpy(out))
    return out


def _array(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as float32/float64 (the kernels read either, computing in float64); bf16/fp16 are converted to dtype."""
    return x if x.dtype in (torch.float32, torch.float64) else x.to(dtype)


class FusedOutputs(NamedTuple):
    """`stage`'s outputs, the fields of `SynAPOAdvantages` it fills (see there)."""

    advantages: torch.Tensor
    returns: torch.Tensor
    lam: torch.Tensor | float | None
    global_returns: torch.Tensor | None
    start_mask: torch.Tensor | None
    seg_ids: torch.Tensor | None
    metrics: dict[str, float]


def stage(
    k: SimpleNamespace,
    params: SynAPOParams,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    global_values: torch.Tensor | None,
    entropy: torch.Tensor | None,
    response_ids: torch.Tensor | None,
    boundary_table: torch.Tensor | None,
    return_lam: bool,
    return_seg_ids: bool,
) -> FusedOutputs:
    """The torch stage's `_stage_torch` (core/stage.py) on rows that each hold a valid token (B > 0, `mask` bool),
    with the kernels `k` (`kernels.SERIAL` or `kernels.PARALLEL`)."""
    from . import kernels  # numba: imported when the fused stage runs

    B, T = mask.shape
    adaptive = params.length_adaptive_lambda
    use_entropy = adaptive and params.ea_gae_enabled
    # shapes, types and parameters here; NaN/inf and ids outside the table in the kernels' first pass per row
    ea_kw = {
        "alpha": params.ea_gae_alpha,
        "lambda_min": params.ea_gae_lambda_min,
        "lambda_max": params.ea_gae_lambda_max,
    }
    if use_entropy:
        entropy = check_ea_gae_args(mask, entropy, **ea_kw, finite=False)
    beta = params.ea_gae_beta if use_entropy else 0.0
    lambda_min, lambda_max = (params.ea_gae_lambda_min, params.ea_gae_lambda_max) if adaptive else (0.0, 1.0)
    if params.hvm_enabled:
        seg_kw = {
            "min_len": params.hvm_min_len,
            "max_len": params.hvm_max_len,
            "fallback_len": params.hvm_fallback_len,
        }
        ids, table = check_segment_args(response_ids, mask, boundary_table, **seg_kw, id_range=False)
        hvm_kw = {"global_weight": params.hvm_global_weight}
        rewards = check_hvm_args(rewards, values, global_values, mask, **hvm_kw, finite=False)
        dtype = float_dtype(rewards, values, global_values, entropy if use_entropy else None)
    else:
        rewards, values = check_gae_args(rewards, values, mask, finite=False)
        dtype = float_dtype(rewards, values, entropy if use_entropy else None)

    one = torch.zeros(1, 1, dtype=dtype)  # stands for an array a kernel does not read or write
    ent = as_numpy(_array(entropy, dtype)) if use_entropy else as_numpy(one)
    # lambda in ea_gae_lambda's dtype (float32 unless the entropy is float64), as the composed path rounds it
    lam_dtype = float_dtype(entropy if use_entropy else None)
    lam = empty((B, T), lam_dtype) if return_lam and adaptive else None
    no_lam = torch.full((1, 1), float(params.gae_lambda), dtype=lam_dtype)
    advantages, returns = empty((B, T), dtype), empty((B, T), dtype)
    row_stats = torch.empty(B, kernels.STATS, dtype=torch.float64)
    bad = torch.zeros(B, dtype=torch.long)
    lam_args = (adaptive, float(params.gae_lambda), params.ea_gae_alpha, beta, EA_GAE_EPS, lambda_min, lambda_max)
    whiten = params.whiten_advantages
    global_returns = start_mask = seg_ids = None
    if params.hvm_enabled:
        global_returns, start_mask = empty((B, T), dtype), empty((B, T), torch.bool)
        seg_ids = empty((B, T), torch.long) if return_seg_ids else None
        k.stage_hvm_rows(
            as_numpy(_array(rewards, dtype)), as_numpy(_array(values, dtype)), as_numpy(_array(global_values, dtype)),
            as_numpy(mask), ent, use_entropy, as_numpy(ids), as_numpy(table), lam_args,
            params.hvm_min_len, params.hvm_max_len or 0, params.hvm_fallback_len or 0,
            params.gamma, params.hvm_global_lambda, float(params.hvm_global_weight), whiten,
            lam is not None, as_numpy(no_lam if lam is None else lam),
            seg_ids is not None, as_numpy(torch.zeros(1, 1, dtype=torch.long) if seg_ids is None else seg_ids),
            as_numpy(advantages), as_numpy(returns), as_numpy(global_returns), as_numpy(start_mask),
            as_numpy(row_stats), as_numpy(bad),
        )  # fmt: skip
    else:
        k.stage_gae_rows(
            as_numpy(_array(rewards, dtype)), as_numpy(_array(values, dtype)), as_numpy(mask), ent, use_entropy,
            lam_args, params.gamma, params.critic_lambda, whiten, lam is not None,
            as_numpy(no_lam if lam is None else lam), as_numpy(advantages), as_numpy(returns), as_numpy(row_stats),
            as_numpy(bad),
        )  # fmt: skip
    if bool(bad.any()):  # the public functions' checks, in the composed path's order, name the input
        if use_entropy:
            check_ea_gae_args(mask, entropy, **ea_kw)
        if params.hvm_enabled:
            check_segment_args(response_ids, mask, boundary_table, **seg_kw)
            check_hvm_args(rewards, values, global_values, mask, **hvm_kw)
        else:
            check_gae_args(rewards, values, mask)
        raise AssertionError("a kernel flagged an input that the checks accept")  # not reached
    if whiten:
        _whiten_in_place(k, advantages, row_stats)

    metrics: dict[str, float] = {}
    count = float(row_stats[:, kernels.N_VALID].sum())
    if adaptive:
        metrics[METRICS.lambda_mean] = float(row_stats[:, kernels.LAM_SUM].sum()) / count
        metrics[METRICS.lambda_min] = float(row_stats[:, kernels.LAM_MIN].min())
        metrics[METRICS.lambda_max] = float(row_stats[:, kernels.LAM_MAX].max())
    if use_entropy:
        metrics[METRICS.entropy_mean] = float(row_stats[:, kernels.ENTROPY_SUM].sum()) / count
    if params.hvm_enabled:
        metrics[METRICS.segments_mean] = float(row_stats[:, kernels.SEGMENTS].mean())
    lam_out = lam if adaptive else params.gae_lambda
    if adaptive and not return_lam:
        lam_out = None
    return FusedOutputs(advantages, returns, lam_out, global_returns, start_mask, seg_ids, metrics)


def _whiten_in_place(k: SimpleNamespace, advantages: torch.Tensor, row_stats: torch.Tensor) -> None:
    """verl's masked_whiten from per-row (count, mean, centred sum of squares), combined in float64 (Chan et al.),
    then one in-place pass: (A - mean) * rsqrt(var + WHITEN_EPS)."""
    from . import kernels

    n = row_stats[:, kernels.N_VALID]
    count = float(n.sum())
    if count < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens in `response_mask`, got {int(count)}")
    row_mean = row_stats[:, kernels.ADV_MEAN]
    mean = float((n * row_mean).sum()) / count
    m2 = float((row_stats[:, kernels.ADV_M2] + n * (row_mean - mean) ** 2).sum())
    k.shift_scale(as_numpy(advantages), mean, (m2 / (count - 1) + WHITEN_EPS) ** -0.5)
