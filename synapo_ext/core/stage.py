"""The whole SynAPO advantage stage in one call: what both host adapters run once per rollout batch.

lambda_t            = EA-GAE lambda (or VAPO's length-adaptive one, or PPO's constant)
advantages, targets = HVM over segments (or plain GAE with HVM off; critic targets use critic_lambda)
SCVL pairs          = positive/negative pairs per group, with the rollout-time values at d + 1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import _fused, backend  # noqa: F401 (_fused registers the fused numba `stage`)
from ._checks import check_mask, float_dtype, row_any
from .config import SynAPOParams
from .ea_gae import ea_gae_lambda
from .gae import compute_gae
from .hvm import hvm_advantages
from .losses import positive_lm_weights
from .metrics import METRICS
from .scvl import SCVLPairs, SCVLSides, scvl_group_stats, scvl_pair_values, scvl_pairs, scvl_sides
from .segments import segment_ids

__all__ = ["SynAPOAdvantages", "actor_lambda", "check_actor_lambda_inputs", "compute_synapo_advantages"]


@dataclass
class SynAPOAdvantages:
    """Outputs of the advantage stage; tensors are (B, T) unless said.

    advantages: the actor's advantages (whitened if `whiten_advantages`).
    returns: the critic's target (the local head's with HVM on).
    lam: the actor's lambda: the float of a constant lambda; a per-token (B, T) tensor only when asked for
        (`return_lam=True`), else None.
    global_returns, start_mask: the global head's target and the segment starts (bool) (HVM on only).
    seg_ids: int64 segment ids (HVM on and `return_seg_ids=True` only).
    scvl: SCVL pairs (P,) (SCVL on only); scvl_pos_values / scvl_neg_values: rollout-time V[i, d+1] and
        V[j, d+1] (P,), the partner values of SCVL's split form.
    metrics: floats for logging (`ea_gae/...`, `synapo/<part>/...`, `synapo/rows_empty`).
    valid_rows: bool (B,), rows with at least one valid token (the others were skipped: zeros, no SCVL pair).
    positive_lm_weights: float (B,), the positive-example LM loss's row weights (`scores` given only; 0 on skipped
        rows), see `positive_lm_weights`.
    scvl_sides: both sides of every SCVL pair (2P,) with the partner's rollout-time value: what a host carries with
        the rows and passes to `scvl_split_loss` (SCVL on only).
    """

    advantages: torch.Tensor
    returns: torch.Tensor
    lam: torch.Tensor | float | None
    global_returns: torch.Tensor | None = None
    start_mask: torch.Tensor | None = None
    seg_ids: torch.Tensor | None = None
    scvl: SCVLPairs | None = None
    scvl_pos_values: torch.Tensor | None = None
    scvl_neg_values: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    valid_rows: torch.Tensor | None = None
    positive_lm_weights: torch.Tensor | None = None
    scvl_sides: SCVLSides | None = None


def check_actor_lambda_inputs(params: SynAPOParams, entropy: torch.Tensor | None) -> None:
    if params.length_adaptive_lambda and params.ea_gae_enabled and entropy is None:
        raise ValueError("`entropy` (rollout-time, per token) is needed with ea_gae_enabled=True")


def actor_lambda(
    params: SynAPOParams, response_mask: torch.Tensor, entropy: torch.Tensor | None
) -> torch.Tensor | float:
    """The actor's lambda: EA-GAE, VAPO's length-adaptive lambda (beta = 0), or PPO's constant."""
    if not params.length_adaptive_lambda:
        return params.gae_lambda
    check_actor_lambda_inputs(params, entropy)
    return ea_gae_lambda(
        response_mask,
        entropy if params.ea_gae_enabled else None,
        alpha=params.ea_gae_alpha,
        beta=params.ea_gae_beta if params.ea_gae_enabled else 0.0,
        lambda_min=params.ea_gae_lambda_min,
        lambda_max=params.ea_gae_lambda_max,
    )


def _require(value: object, name: str, part: str) -> None:
    if value is None:
        raise ValueError(f"`{name}` is needed with {part}=True")


def _take_rows(x: torch.Tensor | Sequence | None, name: str, rows: torch.Tensor, batch_size: int):
    """x[rows] for a per-row input (a tensor with B rows, or a sequence of B ids), checking it has B rows."""
    if x is None:
        return None
    n = (x.shape[0] if x.dim() > 0 else 0) if isinstance(x, torch.Tensor) else len(x)
    if n != batch_size:
        raise ValueError(f"`{name}` has {n} rows but `response_mask` has {batch_size}")
    if isinstance(x, torch.Tensor):
        return x[rows.to(x.device)]
    return [x[i] for i in rows.tolist()]


def _scatter_rows(out: SynAPOAdvantages, rows: torch.Tensor, batch_size: int) -> SynAPOAdvantages:
    """Put the results of the non-empty `rows` back into a batch of `batch_size` rows (empty rows: zeros)."""

    def full(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        y = x.new_zeros((batch_size, *x.shape[1:]))
        y[rows.to(x.device)] = x
        return y

    pairs = out.scvl
    if pairs is not None:
        index = rows.to(pairs.pos_index.device)
        pairs = SCVLPairs(index[pairs.pos_index], index[pairs.neg_index], pairs.diverge_index)
    sides = out.scvl_sides
    if sides is not None:
        sides = sides._replace(rows=rows.to(sides.rows.device)[sides.rows])
    lam = full(out.lam) if isinstance(out.lam, torch.Tensor) else out.lam
    return dataclasses.replace(
        out,
        advantages=full(out.advantages),
        returns=full(out.returns),
        lam=lam,
        global_returns=full(out.global_returns),
        start_mask=full(out.start_mask),
        seg_ids=full(out.seg_ids),
        scvl=pairs,
        scvl_sides=sides,
        positive_lm_weights=full(out.positive_lm_weights),
    )


def compute_synapo_advantages(
    params: SynAPOParams,
    *,
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    global_values: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    response_ids: torch.Tensor | None = None,
    boundary_table: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    group_ids: torch.Tensor | Sequence | None = None,
    return_lam: bool = False,
    return_seg_ids: bool = False,
) -> SynAPOAdvantages:
    """Advantages, critic targets and SCVL pairs for one rollout batch.

    On CPU with numba (a default dependency) the lambda, segments, HVM (or GAE) and whitening run fused, one
    compiled pass per row, and only the outputs asked for are written; the pure-torch path (`use_backend("torch")`,
    GPU tensors, numba missing) composes the public functions and gives the same results.

    Rows with no valid token (padding rows, masked truncated completions) are skipped: their advantages, targets
    and lambda are 0, they join no SCVL pair, and `synapo/rows_empty` counts them. B = 0 gives empty outputs.

    Args:
        params: the SynAPO parameters (a preset, see `params_from_preset`).
        rewards: float (B, T), token-level rewards (outcome on the last valid token, plus any KL term).
        values: float (B, T), rollout-time V(s_t): the single head, or the local head with HVM on.
        response_mask: 0/1 (B, T).
        global_values: float (B, T), the global head (HVM on).
        entropy: float (B, T), rollout-policy entropy (EA-GAE on).
        response_ids: integer (B, T) (HVM or SCVL on).
        boundary_table: bool (V,) (HVM on), see `boundary_table_from_tokenizer`.
        scores: float (B,), outcome scores (SCVL on).
        group_ids: (B,) prompt ids (SCVL on).
        return_lam: also return the per-token lambda (a (B, T) tensor) when it is not a constant.
        return_seg_ids: also return the int64 (B, T) segment ids (HVM on).

    Returns:
        SynAPOAdvantages over all B rows.

    Raises:
        TypeError, ValueError: naming the argument (see the functions of each part).
    """
    # validate and convert the mask once (an int64 mask is 8x the bytes of a bool one, and every function reads it)
    response_mask = check_mask(response_mask, allow_empty_rows=True)
    B = response_mask.shape[0]
    valid_rows = row_any(response_mask)
    rows = valid_rows.nonzero().squeeze(1)
    per_row = {
        "rewards": rewards,
        "values": values,
        "global_values": global_values,
        "entropy": entropy,
        "response_ids": response_ids,
        "scores": scores,
        "group_ids": group_ids,
    }
    wanted = {"return_lam": bool(return_lam), "return_seg_ids": bool(return_seg_ids)}
    if rows.numel() < B:  # skip the empty rows, then put the results back
        inputs = {name: _take_rows(x, name, rows, B) for name, x in per_row.items()}
        out = _scatter_rows(_stage(params, response_mask[rows], boundary_table, **inputs, **wanted), rows, B)
    else:
        out = _stage(params, response_mask, boundary_table, **per_row, **wanted)
    out.valid_rows = valid_rows
    out.metrics[METRICS.rows_empty] = float(B - rows.numel())
    return out


def _stage(
    params: SynAPOParams,
    response_mask: torch.Tensor,
    boundary_table: torch.Tensor | None,
    *,
    rewards: torch.Tensor,
    values: torch.Tensor,
    global_values: torch.Tensor | None,
    entropy: torch.Tensor | None,
    response_ids: torch.Tensor | None,
    scores: torch.Tensor | None,
    group_ids: torch.Tensor | Sequence | None,
    return_lam: bool,
    return_seg_ids: bool,
) -> SynAPOAdvantages:
    """The stage on rows that each hold at least one valid token (`response_mask`: bool (B, T))."""
    if params.hvm_enabled:
        _require(global_values, "global_values", "hvm_enabled")
        _require(response_ids, "response_ids", "hvm_enabled")
        _require(boundary_table, "boundary_table", "hvm_enabled")
    tensors = [x for x in (rewards, values, global_values) if isinstance(x, torch.Tensor)]
    # B = 0: nothing to fuse (and no statistics); the composed path gives the empty outputs
    stage = backend.implementation("stage", *tensors) if response_mask.numel() else _stage_torch
    out = stage(
        params,
        response_mask,
        boundary_table,
        rewards=rewards,
        values=values,
        global_values=global_values,
        entropy=entropy,
        response_ids=response_ids,
        return_lam=return_lam,
        return_seg_ids=return_seg_ids,
    )
    metrics = out.metrics

    if scores is not None:
        out.positive_lm_weights = positive_lm_weights(
            scores, coef=params.positive_lm_coef, threshold=params.positive_lm_threshold
        )
    if params.scvl_enabled:
        _require(response_ids, "response_ids", "scvl_enabled")
        _require(scores, "scores", "scvl_enabled")
        _require(group_ids, "group_ids", "scvl_enabled")
        pairs = scvl_pairs(
            response_ids,
            response_mask,
            scores,
            group_ids,
            threshold=params.scvl_threshold,
            max_pairs=params.scvl_max_pairs,
        )
        out.scvl = pairs
        out.scvl_pos_values, out.scvl_neg_values = scvl_pair_values(values, pairs)
        out.scvl_sides = scvl_sides(pairs, out.scvl_pos_values, out.scvl_neg_values)
        stats = scvl_group_stats(scores, group_ids, threshold=params.scvl_threshold)
        metrics[METRICS.scvl_pairs] = float(pairs.pos_index.numel())
        metrics[METRICS.scvl_groups_mixed] = float(stats["groups_mixed"])
        metrics[METRICS.scvl_groups_skipped] = float(stats["groups"] - stats["groups_mixed"])
    return out


@backend.register("stage", "torch")
def _stage_torch(
    params: SynAPOParams,
    response_mask: torch.Tensor,
    boundary_table: torch.Tensor | None,
    *,
    rewards: torch.Tensor,
    values: torch.Tensor,
    global_values: torch.Tensor | None,
    entropy: torch.Tensor | None,
    response_ids: torch.Tensor | None,
    return_lam: bool,
    return_seg_ids: bool,
) -> SynAPOAdvantages:
    """Lambda, HVM or GAE advantages and critic targets, metrics: the public functions composed (no SCVL)."""
    lam = actor_lambda(params, response_mask, entropy)
    metrics: dict[str, float] = {}
    has_tokens = response_mask.numel() > 0  # B = 0: no statistics
    if isinstance(lam, torch.Tensor) and has_tokens:
        lam_mean, lam_min, lam_max = backend.masked_stats(lam, response_mask)
        metrics.update({METRICS.lambda_mean: lam_mean, METRICS.lambda_min: lam_min, METRICS.lambda_max: lam_max})
    if params.length_adaptive_lambda and params.ea_gae_enabled and has_tokens:  # entropy checked by ea_gae_lambda
        metrics[METRICS.entropy_mean] = backend.masked_stats(entropy.to(float_dtype(entropy)), response_mask)[0]
    lam_out = lam if return_lam or not isinstance(lam, torch.Tensor) else None
    if params.hvm_enabled:
        seg = segment_ids(
            response_ids,
            response_mask,
            boundary_table,
            min_len=params.hvm_min_len,
            max_len=params.hvm_max_len,
            fallback_len=params.hvm_fallback_len,
        )
        hvm = hvm_advantages(
            rewards,
            values,
            global_values,
            response_mask,
            seg,
            gamma=params.gamma,
            lam=lam,
            global_lam=params.hvm_global_lambda,
            global_weight=params.hvm_global_weight,
            whiten=params.whiten_advantages,
        )
        if has_tokens:
            metrics[METRICS.segments_mean] = float(hvm.start_mask.sum(dim=1).double().mean())
        seg_out = seg if return_seg_ids else None
        return SynAPOAdvantages(
            hvm.advantages, hvm.local_returns, lam_out, hvm.global_returns, hvm.start_mask, seg_out, metrics=metrics
        )
    advantages, returns = compute_gae(
        rewards, values, response_mask, gamma=params.gamma, lam=lam, whiten=params.whiten_advantages
    )
    if isinstance(lam, torch.Tensor) or float(lam) != params.critic_lambda:
        # VAPO's decoupled GAE: the critic's targets use their own lambda
        _, returns = compute_gae(rewards, values, response_mask, gamma=params.gamma, lam=params.critic_lambda)
    return SynAPOAdvantages(advantages, returns, lam_out, metrics=metrics)
