"""Critic losses: PPO's clipped value loss and HVM's two-head loss (SPEC "HVM", "Critic loss").

value loss = 0.5 * mean_t max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2)
HVM loss   = value loss(V_loc, local target; all valid tokens)
           + value loss(V_glob, global target; segment starts s_k only)
"""

from __future__ import annotations

import torch

__all__ = ["hvm_critic_loss", "value_loss"]


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
