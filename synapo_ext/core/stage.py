"""The whole SynAPO advantage stage in one call: what both host adapters run once per rollout batch.

lambda_t            = EA-GAE lambda (or VAPO's length-adaptive one, or PPO's constant)
advantages, targets = HVM over segments (or plain GAE with HVM off; critic targets use critic_lambda)
SCVL pairs          = positive/negative pairs per group, with the rollout-time values at d + 1

The torch stage composes the public functions; on CPU with numba the fused stage (`synapo_ext.core.fast`) computes
the same outputs in one compiled pass per row. `compute_synapo_advantages` chooses once (`backend.fused_kernels`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import backend
from ._blocks import row_counts
from ._checks import check_ids, check_mask, check_mask_type, check_same_shape, float_dtype
from .config import SynAPOParams
from .ea_gae import ea_gae_lambda
from .fast import stage as fused
from .gae import compute_gae
from .hvm import hvm_advantages
from .losses import positive_lm_weights
from .metrics import METRICS
from .scvl import SCVLPairs, SCVLSides, pairs_from_lengths, row_lengths, scvl_group_stats, scvl_pair_values, scvl_sides
from .segments import segment_ids

__all__ = [
    "StageInputs",
    "SynAPOAdvantages",
    "actor_lambda",
    "check_actor_lambda_inputs",
    "compute_synapo_advantages",
]


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


@dataclass(frozen=True)
class StageInputs:
    """One call of the stage, as `compute_synapo_advantages` takes it, with the mask checked: what the torch and
    the fused stage receive.

    Per row: response_mask: bool (B, T); lengths: int64 (B,), each row's last valid position + 1 (0: no valid
    token); rewards, values (B, T); global_values, entropy, response_ids (B, T), scores (B,), group_ids (B,): or
    None. Not per row: boundary_table (V,) or None; return_lam, return_seg_ids: the optional outputs asked for.
    """

    response_mask: torch.Tensor
    lengths: torch.Tensor
    rewards: torch.Tensor
    values: torch.Tensor
    global_values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    response_ids: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    group_ids: torch.Tensor | Sequence | None = None
    boundary_table: torch.Tensor | None = None
    return_lam: bool = False
    return_seg_ids: bool = False

    def take(self, rows: torch.Tensor) -> StageInputs:
        """The call on `rows` (int64 (R,)) only, checking that every per-row input has B rows."""
        B = self.response_mask.shape[0]
        per_row = [f.name for f in dataclasses.fields(self) if f.name not in _NOT_PER_ROW]
        return dataclasses.replace(self, **{name: _take_rows(getattr(self, name), name, rows, B) for name in per_row})


_NOT_PER_ROW = ("boundary_table", "return_lam", "return_seg_ids")


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
    if not isinstance(params, SynAPOParams):
        raise TypeError(f"`params` must be a SynAPOParams (e.g. params_from_preset(...)), got {type(params).__name__}")
    params.validate()  # a field assigned after construction is checked here (scalars only)
    # validate the mask once, as bool (an int64 mask is 8x the bytes of a bool one), with each row's length
    response_mask = check_mask_type(response_mask)
    tensors = [x for x in (rewards, values, global_values) if isinstance(x, torch.Tensor)]
    # the one choice: the fused stage's kernels, or None for the torch stage (B = 0: nothing to fuse)
    kernels = backend.fused_kernels(response_mask, *tensors) if response_mask.numel() else None
    if kernels is None:
        response_mask, lengths = _mask_torch(response_mask)
    else:
        response_mask, lengths = fused.stage_mask(kernels, response_mask)
    B = response_mask.shape[0]
    valid_rows = lengths > 0
    rows = valid_rows.nonzero().squeeze(1)
    x = StageInputs(
        response_mask,
        lengths,
        rewards=rewards,
        values=values,
        global_values=global_values,
        entropy=entropy,
        response_ids=response_ids,
        scores=scores,
        group_ids=group_ids,
        boundary_table=boundary_table,
        return_lam=bool(return_lam),
        return_seg_ids=bool(return_seg_ids),
    )
    if rows.numel() < B:  # skip the empty rows, then put the results back
        out = _scatter_rows(_stage(params, x.take(rows), kernels), rows, B)
    else:
        out = _stage(params, x, kernels)
    out.valid_rows = valid_rows
    out.metrics[METRICS.rows_empty] = float(B - rows.numel())
    return out


def _mask_torch(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage's mask as bool (B, T), checked (0 and 1 only; rows with no valid token allowed), and each row's
    length (last valid position + 1, int64 (B,)); the fused stage's `stage_mask` does both in one pass."""
    mask = check_mask(response_mask, allow_empty_rows=True)
    return mask, row_lengths(mask)


def _stage(params: SynAPOParams, x: StageInputs, kernels) -> SynAPOAdvantages:
    """The stage on rows that each hold at least one valid token: fused with `kernels`, else torch."""
    if params.hvm_enabled:
        _require(x.global_values, "global_values", "hvm_enabled")
        _require(x.response_ids, "response_ids", "hvm_enabled")
        _require(x.boundary_table, "boundary_table", "hvm_enabled")
    if kernels is None or not x.response_mask.numel():  # B = 0: no statistics; the torch stage's empty outputs
        out = _stage_torch(params, x)
    else:
        check_actor_lambda_inputs(params, x.entropy)
        out = SynAPOAdvantages(**fused.stage(
            kernels, params, x.response_mask, x.rewards, x.values, x.global_values, x.entropy, x.response_ids,
            x.boundary_table, x.return_lam, x.return_seg_ids,
        )._asdict())  # fmt: skip
    metrics = out.metrics

    if x.scores is not None:
        out.positive_lm_weights = positive_lm_weights(
            x.scores, coef=params.positive_lm_coef, threshold=params.positive_lm_threshold
        )
    if params.scvl_enabled:
        _require(x.response_ids, "response_ids", "scvl_enabled")
        _require(x.scores, "scores", "scvl_enabled")
        _require(x.group_ids, "group_ids", "scvl_enabled")
        ids = check_ids(x.response_ids, "response_ids")
        check_same_shape(x.response_mask, "response_mask", ids.shape, "response_ids")
        pairs = pairs_from_lengths(
            ids, x.lengths, x.scores, x.group_ids, threshold=params.scvl_threshold, max_pairs=params.scvl_max_pairs,
            divergence=None if kernels is None else functools.partial(fused.divergence, kernels),
        )  # fmt: skip
        out.scvl = pairs
        out.scvl_pos_values, out.scvl_neg_values = scvl_pair_values(x.values, pairs)
        out.scvl_sides = scvl_sides(pairs, out.scvl_pos_values, out.scvl_neg_values)
        stats = scvl_group_stats(x.scores, x.group_ids, threshold=params.scvl_threshold)
        metrics[METRICS.scvl_pairs] = float(pairs.pos_index.numel())
        metrics[METRICS.scvl_groups_mixed] = float(stats["groups_mixed"])
        metrics[METRICS.scvl_groups_skipped] = float(stats["groups"] - stats["groups_mixed"])
    return out


def _stage_torch(params: SynAPOParams, x: StageInputs) -> SynAPOAdvantages:
    """Lambda, HVM or GAE advantages and critic targets, metrics: the public functions composed (no SCVL)."""
    response_mask, rewards, values, entropy = x.response_mask, x.rewards, x.values, x.entropy
    boundary_table, return_lam, return_seg_ids = x.boundary_table, x.return_lam, x.return_seg_ids
    lam = actor_lambda(params, response_mask, entropy)
    metrics: dict[str, float] = {}
    has_tokens = response_mask.numel() > 0  # B = 0: no statistics
    if isinstance(lam, torch.Tensor) and has_tokens:
        lam_mean, lam_min, lam_max = _masked_stats(lam, response_mask)
        metrics.update({METRICS.lambda_mean: lam_mean, METRICS.lambda_min: lam_min, METRICS.lambda_max: lam_max})
    if params.length_adaptive_lambda and params.ea_gae_enabled and has_tokens:  # entropy checked by ea_gae_lambda
        metrics[METRICS.entropy_mean] = _masked_stats(entropy.to(float_dtype(entropy)), response_mask)[0]
    lam_out = lam if return_lam or not isinstance(lam, torch.Tensor) else None
    if params.hvm_enabled:
        seg = segment_ids(
            x.response_ids,
            response_mask,
            boundary_table,
            min_len=params.hvm_min_len,
            max_len=params.hvm_max_len,
            fallback_len=params.hvm_fallback_len,
            dtype=torch.int64 if return_seg_ids else torch.int32,  # int32 when only HVM reads them
        )
        hvm = hvm_advantages(
            rewards,
            values,
            x.global_values,
            response_mask,
            seg,
            gamma=params.gamma,
            lam=lam,
            global_lam=params.hvm_global_lambda,
            global_weight=params.hvm_global_weight,
            whiten=params.whiten_advantages,
        )
        if has_tokens:
            metrics[METRICS.segments_mean] = float(row_counts(hvm.start_mask).double().mean())
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


def _masked_stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """(mean, min, max) of `x` over the valid tokens of a bool `mask` (at least one)."""
    valid = x[mask]
    return float(valid.double().mean()), float(valid.min()), float(valid.max())
