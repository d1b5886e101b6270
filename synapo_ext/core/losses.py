"""Losses: PPO's clipped value loss, HVM's two-head critic loss, the whole critic objective both hosts minimise
and VAPO's positive-example LM loss (docs/spec.md "HVM", "SCVL", "VAPO").

value loss       = 0.5 * mean_t max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2)
HVM loss         = value loss(V_loc, local target; all valid tokens)
                 + value loss(V_glob, global target; segment starts s_k only)
critic objective = scale * (0.5 * sum_t e_t / N_tok + 0.5 * sum_{s_k} e_k / N_start + w * sum_sides h / P)
                   (e: the clipped squared error; h: SCVL's split hinge; N_tok, N_start, P, scale: from the host)
positive LM loss = -sum_{b,t} w_b * log pi(y_bt) * m_bt / N,   w_b = coef * [score_b >= threshold],
                   N = sum_{b,t} [w_b > 0] * m_bt (the correct responses' tokens) unless the host gives N
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_finite, check_mask, check_same_shape, check_tensor
from ._hparams import Rule, check_argument, check_hparam, check_value
from .metrics import METRICS
from .scvl import SCVLSides, scvl_split_loss

__all__ = [
    "CriticObjective",
    "critic_objective",
    "hvm_critic_loss",
    "positive_lm_loss",
    "positive_lm_weights",
    "value_loss",
]


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_values: torch.Tensor | None = None,
    cliprange_value: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * token-mean of the (optionally clipped) squared error, and the clip fraction.

    Args:
        values: float (B, T), the critic's current predictions.
        returns: float (B, T), targets.
        mask: bool/0-1 (B, T), the tokens that count.
        old_values: float (B, T), rollout-time predictions; needed for clipping.
        cliprange_value: c, or None for no clipping.

    Returns:
        (loss, clipfrac), scalars; both 0 when `mask` selects nothing.

    Raises:
        TypeError, ValueError: naming the argument: a bad `cliprange_value` (> 0 or None), or a loss that is not
            finite: NaN/inf in `values`, `returns` or `old_values` (masked positions included), or errors so large
            that the squares overflow.
    """
    values = check_tensor(values, "values", ndim=2)
    check_same_shape(check_tensor(returns, "returns"), "returns", values.shape, "values")
    loss, clipfrac = _value_loss(values, returns, mask, old_values, cliprange_value, None)
    _check_loss(loss, "value loss", values=values, returns=returns, old_values=old_values)
    return loss, clipfrac


def _check_loss(loss: torch.Tensor, what: str, **inputs: torch.Tensor | None) -> None:
    """Raise a `ValueError` naming the input that made `loss` NaN/inf (one read of the scalar; the inputs are looked
    at only then), or saying the squares overflowed."""
    if bool(torch.isfinite(loss.detach())):
        return
    for name, x in inputs.items():
        if x is not None:
            check_finite(x, name)
    raise ValueError(
        f"the {what} is {float(loss)}: the inputs are finite but the squared errors overflow {loss.dtype} (values and "
        "targets too far apart, e.g. rewards of the order of 1e19 or more: scale the rewards down)"
    )


def _value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    old_values: torch.Tensor | None,
    cliprange_value: float | None,
    num_tokens: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`value_loss` divided by `num_tokens` (None: `mask`'s own count); the clip fraction is over `mask`'s tokens."""
    cliprange_value = check_argument("cliprange_value", cliprange_value)
    mask = mask.to(values.dtype)
    count = mask.sum().clamp_min(1.0)
    losses = (values - returns).square()
    clipfrac = values.new_zeros(())
    if cliprange_value is not None:
        if old_values is None:
            raise ValueError("`old_values` are needed when `cliprange_value` is set")
        clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
        clipped_losses = (clipped - returns).square()
        clipfrac = ((clipped_losses > losses).to(values.dtype) * mask).sum() / count
        losses = torch.maximum(losses, clipped_losses)
    return 0.5 * (losses * mask).sum() / (count if num_tokens is None else num_tokens), clipfrac.detach()


def hvm_critic_loss(
    local_values: torch.Tensor,
    global_values: torch.Tensor,
    local_returns: torch.Tensor,
    global_returns: torch.Tensor,
    response_mask: torch.Tensor,
    start_mask: torch.Tensor,
    *,
    cliprange_value: float | None = None,
    old_local_values: torch.Tensor | None = None,
    old_global_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HVM's critic loss: local head on every valid token, global head on segment starts.

    Args:
        local_values, global_values: float (B, T), the two heads' current predictions.
        local_returns, global_returns: float (B, T), targets from `hvm_advantages`.
        response_mask: 0/1 (B, T).
        start_mask: bool (B, T), segment starts (`HVMResult.start_mask`).
        old_local_values, old_global_values: rollout-time predictions, for clipping.
        cliprange_value: PPO value clip c for both heads, or None.

    Returns:
        (loss, metrics) with metrics `local_loss`, `global_loss`, `local_clipfrac`, `global_clipfrac`.
    """
    heads = {"global_values": global_values, "global_returns": global_returns, "start_mask": start_mask}
    out = critic_objective(
        local_values, local_returns, response_mask, cliprange_value=cliprange_value, old_values=old_local_values,
        old_global_values=old_global_values, **heads,
    )  # fmt: skip
    metrics = {
        "local_loss": out.metrics[METRICS.vf_loss],
        "global_loss": out.metrics[METRICS.global_loss],
        "local_clipfrac": out.metrics[METRICS.vf_clipfrac],
        "global_clipfrac": out.metrics[METRICS.global_clipfrac],
    }
    return out.loss, metrics


_COUNT = Rule("float", 0.0, optional=True)  # a normaliser: a count >= 0, or None for the call's own
_SCALE = Rule("float", 0.0, low_open=True)


class CriticObjective(NamedTuple):
    """`critic_objective`'s result: `loss`, the scalar to backpropagate; `metrics`, detached scalars keyed by
    `METRICS` names (`vf_loss`, `vf_clipfrac`, with HVM `global_loss`, `global_clipfrac`, with SCVL `scvl_loss`)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def critic_objective(
    values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    num_tokens: float | None = None,
    cliprange_value: float | None = None,
    old_values: torch.Tensor | None = None,
    global_values: torch.Tensor | None = None,
    global_returns: torch.Tensor | None = None,
    start_mask: torch.Tensor | None = None,
    old_global_values: torch.Tensor | None = None,
    num_starts: float | None = None,
    scvl_sides: SCVLSides | None = None,
    scvl_weight: float = 0.0,
    scvl_margin: float = 0.0,
    num_pairs: float | None = None,
    scale: float = 1.0,
) -> CriticObjective:
    """The critic's whole loss on the rows a host holds, and the values it logs (docs/spec.md "Critic objective"):

        loss = scale * (vf + global + scvl_weight * S)
        vf     = 0.5 * sum_{valid t} max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2) / num_tokens
        global = the same on the global head over segment starts / num_starts                  (HVM, if given)
        S      = sum over the sides given of SCVL's split hinge * (1 / num_pairs)             (SCVL, if given)

    The normalisers are counts over the batch the host means: a host that splits its batch into micro-batches (or
    processes) passes the whole batch's counts, as verl's `agg_loss` takes `batch_num_tokens`, and `scale` for the
    gradient averaging of its wrapper (verl's `dp_size`); a host that normalises each call by itself leaves them None.
    The metrics are the terms as added (scale included), so they sum over micro-batches like the loss:

        vf_loss = scale * vf,  global_loss = scale * global,  scvl_loss = scale * S / 2

    `scvl_loss` is SCVL's hinge, mean over pairs: both sides of a pair hold the hinge, so at the rollout-time weights
    S / 2 is `scvl_loss`'s value on the joint pairs. The clip fractions are over this call's tokens (starts).

    Args:
        values: float (B, T), the single head's (or HVM's local head's) current values.
        returns: float (B, T), its targets.
        response_mask: 0/1 (B, T), the tokens that count.
        cliprange_value, old_values: PPO's value clip c (None: no clipping) and the rollout-time values.
        global_values, global_returns, start_mask, old_global_values: HVM's global head, (B, T) each (with
            `start_mask` 0/1, the segment starts); all None without HVM.
        scvl_sides: the SCVL pair sides whose row is in `values` (`rows` indexing `values`), or None without SCVL.
        scvl_weight, scvl_margin: SCVL's weight w and hinge margin.
        num_tokens: N_tok; None: `response_mask`'s valid tokens.
        num_starts: N_start; None: `start_mask`'s starts.
        num_pairs: P, the pairs the sides are a share of; None: half the sides given. 0: the SCVL term is 0.
        scale: multiplies every term (> 0).

    Returns:
        CriticObjective(loss, metrics).

    Raises:
        TypeError, ValueError: naming the argument.
    """
    values = check_tensor(values, "values", ndim=2)
    check_same_shape(check_tensor(returns, "returns"), "returns", values.shape, "values")
    num_tokens, num_starts, num_pairs = (
        check_value(n, name, _COUNT) for n, name in ((num_tokens, "num_tokens"), (num_starts, "num_starts"),
                                                     (num_pairs, "num_pairs"))
    )  # fmt: skip
    scale = check_value(scale, "scale", _SCALE)
    scvl_weight = check_hparam("scvl_weight", scvl_weight)
    hvm = (global_values, global_returns, start_mask)
    if any(x is None for x in hvm) and any(x is not None for x in hvm):
        raise ValueError("`global_values`, `global_returns` and `start_mask` go together (HVM): give all or none")

    vf, vf_clipfrac = _value_loss(values, returns, response_mask, old_values, cliprange_value, num_tokens)
    loss = vf
    metrics = {METRICS.vf_loss: vf.detach(), METRICS.vf_clipfrac: vf_clipfrac}
    if global_values is not None:
        check_same_shape(global_values, "global_values", values.shape, "values")
        glob, glob_clipfrac = _value_loss(
            global_values, global_returns, start_mask, old_global_values, cliprange_value, num_starts
        )
        loss = loss + glob
        metrics[METRICS.global_loss] = glob.detach()
        metrics[METRICS.global_clipfrac] = glob_clipfrac
    if scvl_sides is not None:
        if num_pairs is None:
            num_pairs = scvl_sides.rows.numel() / 2
        hinge_sum = scvl_split_loss(values, *scvl_sides, margin=scvl_margin, num_pairs=1)
        scvl = hinge_sum * (1 / num_pairs) if num_pairs > 0 else hinge_sum * 0.0
        loss = loss + scvl_weight * scvl
        metrics[METRICS.scvl_loss] = 0.5 * scale * scvl.detach()
    if scale != 1:
        loss = loss * scale
        for name in (METRICS.vf_loss, METRICS.global_loss):
            if name in metrics:
                metrics[name] = metrics[name] * scale
    inputs = {"values": values, "returns": returns, "old_values": old_values, "global_values": global_values}
    inputs.update(global_returns=global_returns, old_global_values=old_global_values)
    _check_loss(loss, "critic loss", **inputs)
    return CriticObjective(loss, metrics)


def positive_lm_weights(scores: torch.Tensor, *, coef: float, threshold: float) -> torch.Tensor:
    """Per-row weight of the positive-example LM loss: `coef` on correct rows (score >= threshold), else 0.

    Args:
        scores: float (B,), outcome scores; NaN (a row without a score) counts as not correct.
        coef: mu >= 0 (`SynAPOParams.positive_lm_coef`).
        threshold: `SynAPOParams.positive_lm_threshold`.

    Returns:
        float32 (B,) on `scores`' device.
    """
    scores = check_tensor(scores, "scores", ndim=1)
    check_hparam("positive_lm_coef", coef, "coef")
    check_hparam("positive_lm_threshold", threshold, "threshold")
    correct = scores >= threshold  # NaN >= threshold is False
    return correct.to(torch.float32) * float(coef)


def positive_lm_loss(
    log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """VAPO's positive-example LM loss: -sum_{b,t} w_b * log pi(y_bt) * m_bt / N.

    Args:
        log_probs: float (B, T), log pi of the sampled tokens under the current policy.
        response_mask: 0/1 (B, T), the tokens that count (rows with no valid token are allowed).
        weights: float (B,), from `positive_lm_weights`.
        num_tokens: N; None: the valid tokens of rows with w_b > 0 (the mean NLL over correct responses, times
            coef). A host that splits a batch across micro-batches passes the batch's N, so the micro-batch terms
            sum to the batch's loss.

    Returns:
        A scalar tensor; 0 (with a zero gradient) when no row has a weight.

    Raises:
        TypeError, ValueError: naming the argument.
    """
    log_probs = check_tensor(log_probs, "log_probs", ndim=2)
    mask = check_mask(response_mask, allow_empty_rows=True)
    check_same_shape(mask, "response_mask", log_probs.shape, "log_probs")
    weights = check_tensor(weights, "weights", ndim=1)
    if weights.numel() != log_probs.shape[0]:
        raise ValueError(f"`weights` has {weights.numel()} entries, expected one per row ({log_probs.shape[0]})")
    check_finite(weights, "weights")
    num_tokens_checked = check_argument("num_tokens", num_tokens)
    if not isinstance(num_tokens, torch.Tensor):
        num_tokens = num_tokens_checked
    w = weights.to(log_probs.device, log_probs.dtype)[:, None]  # (B, 1)
    counted = mask & (w != 0)  # (B, T); a -inf log-prob outside it never meets a zero weight (no NaN)
    if num_tokens is None:
        num_tokens = (mask & (w > 0)).sum().clamp_min(1)
    # -sum_{b,t} w_b * log pi(y_bt) * m_bt / N
    loss = -torch.where(counted, log_probs * w, 0.0).sum() / num_tokens
    if not bool(torch.isfinite(loss.detach())):  # NaN/inf log-probs of the counted tokens
        bad = int((~torch.isfinite(log_probs[counted])).sum())
        raise ValueError(
            f"`log_probs` holds {bad} NaN/inf entries at the counted tokens (rows with a positive-LM weight): the "
            "policy's log-probabilities of its own samples must be finite"
        )
    return loss
