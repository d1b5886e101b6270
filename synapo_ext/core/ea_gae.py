"""EA-GAE: a GAE lambda that adapts to response length and policy entropy (docs/spec.md "EA-GAE").

    lambda[b, t] = clip(1 - 1 / (alpha * l_b * max(1 + beta * H[b, t], eps)), lambda_min, lambda_max)

beta = 0 (or no entropy) is VAPO's length-adaptive lambda, 1 - 1 / (alpha * l). beta > 0 is the write-up's
formula (high entropy -> larger lambda, more Monte-Carlo); beta < 0 is its prose (high entropy -> lean on
the critic). The floor eps keeps 1 + beta * H positive when beta < 0.
"""

from __future__ import annotations

import torch

from ._checks import check_finite, check_mask, check_same_shape, check_tensor, float_dtype

__all__ = ["EA_GAE_EPS", "check_ea_gae_args", "ea_gae_lambda"]

EA_GAE_EPS = 1e-6


def check_ea_gae_args(
    mask: torch.Tensor, entropy: object, *, alpha: float, lambda_min: float, lambda_max: float, finite: bool = True
) -> torch.Tensor | None:
    """`ea_gae_lambda`'s checks on a validated bool `mask`; returns `entropy` (or None). `finite=False` leaves out
    the pass over the data (a caller that checks it in its own pass)."""
    if not alpha > 0:
        raise ValueError(f"`alpha` must be > 0, got {alpha}")
    if not 0.0 <= lambda_min <= lambda_max <= 1.0:
        raise ValueError(f"need 0 <= `lambda_min` <= `lambda_max` <= 1, got {lambda_min} and {lambda_max}")
    if entropy is not None:
        entropy = check_tensor(entropy, "entropy", ndim=2)
        check_same_shape(entropy, "entropy", mask.shape, "response_mask")
        if finite:
            check_finite(entropy, "entropy")
    return entropy


def ea_gae_lambda(
    response_mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    *,
    alpha: float,
    beta: float = 0.0,
    lambda_min: float = 0.0,
    lambda_max: float = 1.0,
) -> torch.Tensor:
    """Per-token GAE lambda for the actor.

    Args:
        response_mask: bool/int/float (B, T) of 0 and 1; l_b is the number of valid tokens of row b.
        entropy: float (B, T), H in nats of the rollout policy at s_t; None means H = 0.
        alpha: length scale, > 0 (VAPO: 0.05).
        beta: entropy scale (any sign).
        lambda_min, lambda_max: clip range, 0 <= lambda_min <= lambda_max <= 1.

    Returns:
        lambda: float (B, T) in [lambda_min, lambda_max] (finite at masked positions too).

    Raises:
        ValueError: alpha <= 0, a bad clip range, NaN/inf entropy, or a bad mask.
    """
    mask = check_mask(response_mask)
    entropy = check_ea_gae_args(mask, entropy, alpha=alpha, lambda_min=lambda_min, lambda_max=lambda_max)
    dtype = float_dtype(entropy)
    lengths = mask.sum(dim=1, keepdim=True).to(dtype)  # l_b, (B, 1)
    scale = alpha * lengths
    if entropy is not None:
        # alpha * l * max(1 + beta * H, eps)
        scale = scale * (1.0 + beta * entropy.to(dtype)).clamp_min(EA_GAE_EPS)
    lam = (1.0 - scale.reciprocal()).clamp(lambda_min, lambda_max)
    return lam.expand(mask.shape).contiguous()
