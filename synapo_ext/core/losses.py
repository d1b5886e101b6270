"""Losses: PPO's clipped value loss, HVM's two-head critic loss and VAPO's positive-example LM loss
(docs/spec.md "HVM", "VAPO").

value loss       = 0.5 * mean_t max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2)
HVM loss         = value loss(V_loc, local target; all valid tokens)
                 + value loss(V_glob, global target; segment starts s_k only)
positive LM loss = -sum_{b,t} w_b * log pi(y_bt) * m_bt / N,   w_b = coef * [score_b >= threshold],
                   N = sum_{b,t} [w_b > 0] * m_bt (the correct responses' tokens) unless the host gives N
"""

from __future__ import annotations

import torch

from ._checks import check_mask, check_same_shape, check_tensor

__all__ = ["hvm_critic_loss", "positive_lm_loss", "positive_lm_weights", "value_loss"]


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
    """
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
    return 0.5 * (losses * mask).sum() / count, clipfrac.detach()


def hvm_critic_loss(
    local_values: torch.Tensor,
    global_values: torch.Tensor,
    local_returns: torch.Tensor,
    global_returns: torch.Tensor,
    response_mask: torch.Tensor,
    start_mask: torch.Tensor,
    *,
    old_local_values: torch.Tensor | None = None,
    old_global_values: torch.Tensor | None = None,
    cliprange_value: float | None = None,
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
    local_loss, local_clipfrac = value_loss(
        local_values, local_returns, response_mask, old_values=old_local_values, cliprange_value=cliprange_value
    )
    global_loss, global_clipfrac = value_loss(
        global_values, global_returns, start_mask, old_values=old_global_values, cliprange_value=cliprange_value
    )
    metrics = {
        "local_loss": local_loss.detach(),
        "global_loss": global_loss.detach(),
        "local_clipfrac": local_clipfrac,
        "global_clipfrac": global_clipfrac,
    }
    return local_loss + global_loss, metrics


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
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0.0 <= coef < float("inf"):
        raise ValueError(f"`coef` must be a finite float >= 0, got {coef!r}")
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
    if num_tokens is not None and not num_tokens > 0:
        raise ValueError(f"`num_tokens` must be > 0 or None, got {num_tokens!r}")
    w = weights.to(log_probs.device, log_probs.dtype)[:, None]  # (B, 1)
    counted = mask & (w != 0)  # (B, T); a -inf log-prob outside it never meets a zero weight (no NaN)
    if num_tokens is None:
        num_tokens = (mask & (w > 0)).sum().clamp_min(1)
    # -sum_{b,t} w_b * log pi(y_bt) * m_bt / N
    return -torch.where(counted, log_probs * w, 0.0).sum() / num_tokens
