"""One name per logged quantity, the same on both hosts, and the metric formulas the hosts share.

Names follow verl's (`critic/vf_loss`, `critic/vf_explained_var`, `critic/values/mean`); SynAPO's critic terms use
`critic/synapo/...`, its actor term `actor/synapo/...`, its other statistics `synapo/<part>/...` and EA-GAE's
`ea_gae/...` (docs/spec.md, "Metrics"). Adapters log under `METRICS.<field>` and nothing else for these quantities.

    explained variance = 1 - Var[G - V] / (Var[G] + 1e-5)      (over valid tokens; verl's `vf_explained_var`)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ._checks import check_finite, check_mask, check_same_shape, check_tensor

__all__ = ["EXPLAINED_VARIANCE_EPS", "METRICS", "MetricNames", "explained_variance"]

EXPLAINED_VARIANCE_EPS = 1e-5


@dataclass(frozen=True)
class MetricNames:
    """The canonical metric names (an attribute typo fails at once; the values are unique, tested).

    Critic (one update step, averaged over the host's steps):
        vf_loss: 0.5 * MSE (clipped) of the single head, or of the local head with HVM on.
        vf_clipfrac: fraction of tokens where value clipping was active (same head).
        global_loss, global_clipfrac: the same for HVM's global head (on segment starts).
        scvl_loss: SCVL's hinge, mean over pairs (unweighted: the critic adds `scvl_weight` times twice it, the
            split form's sum over both sides of each pair; `critic_objective`).
        grad_norm, lr: the critic's gradient norm before clipping and its learning rate.
        explained_variance: `explained_variance(values, returns, mask)` of the rollout batch against the critic's
            own targets (with HVM: the local head against its bootstrapped in-segment target; left out of a batch's
            log where it is undefined: returns without variance).
        explained_variance_outcome: the same for the value (the single head, or HVM's local head) against the
            Monte-Carlo outcome return (the row's discounted score from each token on, GAE lambda = 1's target): one
            figure comparable across presets, and the one VAPO's warm-up rule judges the critic by.
        values_mean, returns_mean: mean rollout-time value and critic target over valid tokens.
        warmup_done: 0 on a batch of VAPO's value pretraining (warm-up), 1 once it is over.
        warmup_batches: rollout batches so far that trained only the critic (warm-up), this one included.
    Actor:
        positive_lm_loss: the positive-example LM term added to the policy loss (coefficient included).
    Advantage stage (`compute_synapo_advantages`):
        lambda_mean, lambda_min, lambda_max: the actor's per-token lambda over valid tokens.
        entropy_mean: mean rollout entropy over valid tokens.
        segments_mean: HVM segments per row.
        scvl_pairs, scvl_groups_mixed, scvl_groups_skipped: SCVL pairs, groups with a pair, groups without.
        rows_empty: rows with no valid token (skipped); rows_unscored: rows without a score (skipped);
        batches_skipped: batches with no row left.
    """

    vf_loss: str = "critic/vf_loss"
    vf_clipfrac: str = "critic/vf_clipfrac"
    global_loss: str = "critic/synapo/global_loss"
    global_clipfrac: str = "critic/synapo/global_clipfrac"
    scvl_loss: str = "critic/synapo/scvl_loss"
    grad_norm: str = "critic/grad_norm"
    lr: str = "critic/lr"
    explained_variance: str = "critic/vf_explained_var"
    explained_variance_outcome: str = "critic/vf_explained_var_outcome"
    values_mean: str = "critic/values/mean"
    returns_mean: str = "critic/returns/mean"
    warmup_done: str = "critic/warmup_done"
    warmup_batches: str = "critic/warmup_batches"
    positive_lm_loss: str = "actor/synapo/positive_lm_loss"
    lambda_mean: str = "ea_gae/lambda_mean"
    lambda_min: str = "ea_gae/lambda_min"
    lambda_max: str = "ea_gae/lambda_max"
    entropy_mean: str = "ea_gae/entropy_mean"
    segments_mean: str = "synapo/hvm/segments_mean"
    scvl_pairs: str = "synapo/scvl/pairs"
    scvl_groups_mixed: str = "synapo/scvl/groups_mixed"
    scvl_groups_skipped: str = "synapo/scvl/groups_skipped"
    rows_empty: str = "synapo/rows_empty"
    rows_unscored: str = "synapo/rows_unscored"
    batches_skipped: str = "synapo/batches_skipped"

    def names(self) -> tuple[str, ...]:
        """Every canonical name."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


METRICS = MetricNames()


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor | None:
    """1 - Var[G - V] / (Var[G] + 1e-5) over valid tokens (unbiased variances, float64): verl's
    `critic/vf_explained_var`. 1 is a perfect critic, 0 one that predicts the mean, < 0 worse.

    Undefined (None) when the returns have no variance (every valid G equal, e.g. a batch whose rewards are all 0
    and a critic at 0) or there are fewer than two valid tokens: the formula would say 1 (a perfect critic) or 0
    with nothing to explain. verl's own metric says 1 there; the hosts here leave the metric out of that batch's log.

    Args:
        values: float (B, T), the critic's values V.
        returns: float (B, T), its targets G.
        response_mask: 0/1 (B, T); rows with no valid token are allowed.

    Returns:
        A float64 scalar tensor, or None where it is undefined.

    Raises:
        TypeError, ValueError: naming the argument (shapes, NaN/inf, mask values).
    """
    values = check_tensor(values, "values", ndim=2)
    returns = check_tensor(returns, "returns", ndim=2)
    check_same_shape(values, "values", returns.shape, "returns")
    mask = check_mask(response_mask, allow_empty_rows=True)
    check_same_shape(mask, "response_mask", returns.shape, "returns")
    target = returns[mask].double()
    check_finite(target, "returns")
    residual = target - values[mask].double()
    check_finite(residual, "values")
    if target.numel() < 2:
        return None
    variance = target.var()
    if variance == 0:
        return None
    return 1.0 - residual.var() / (variance + EXPLAINED_VARIANCE_EPS)
