"""EA-GAE: a GAE lambda that adapts to response length and policy entropy (docs/spec.md "EA-GAE").

    lambda[b, t] = clip(1 - 1 / (alpha * l_b * max(1 + beta * H[b, t], eps)), lambda_min, lambda_max)

beta = 0 (or no entropy) is VAPO's length-adaptive lambda, 1 - 1 / (alpha * l). beta > 0 is the write-up's
formula (high entropy -> larger lambda, more Monte-Carlo); beta < 0 is its prose (high entropy -> lean on
the critic). The floor eps keeps 1 + beta * H positive when beta < 0.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_finite, check_mask, check_same_shape, check_tensor, float_dtype
from ._hparams import check_hparam, check_lambda_clip

__all__ = ["EA_GAE_EPS", "ENTROPY_ROUNDING", "check_ea_gae_args", "check_entropy", "ea_gae_lambda"]

EA_GAE_EPS = 1e-6
# An entropy is >= 0; one computed from low-precision logits (bf16: logsumexp - sum p * logits) can come out slightly
# below 0. Values down to -ENTROPY_ROUNDING nats are taken as that rounding; lower ones (e.g. log-probs passed by
# mistake) are an error.
ENTROPY_ROUNDING = 1.0


def check_ea_gae_args(
    mask: torch.Tensor,
    entropy: object,
    *,
    alpha: float,
    lambda_min: float,
    lambda_max: float,
    beta: float = 0.0,
    finite: bool = True,
) -> torch.Tensor | None:
    """`ea_gae_lambda`'s checks on a validated bool `mask` (hyper-parameters by the rules of `SynAPOParams`'
    `ea_gae_*` fields); returns `entropy` (or None). `finite=False` leaves out the pass over the data (a caller that
    checks it in its own pass)."""
    check_hparam("ea_gae_alpha", alpha, "alpha")
    check_hparam("ea_gae_beta", beta, "beta")
    check_lambda_clip(lambda_min, lambda_max)
    if entropy is not None:
        entropy = check_tensor(entropy, "entropy", ndim=2)
        check_same_shape(entropy, "entropy", mask.shape, "response_mask")
        if finite:
            check_entropy(entropy, mask)
    return entropy


def check_entropy(entropy: torch.Tensor, mask: torch.Tensor) -> None:
    """Finite everywhere and >= -ENTROPY_ROUNDING at valid tokens (one pass: a NaN/inf makes min or max non-finite)."""
    if entropy.numel() == 0:
        return
    low, high = (float(x) for x in torch.aminmax(entropy))
    if not (math.isfinite(low) and math.isfinite(high)):
        check_finite(entropy, "entropy")
    if low < -ENTROPY_ROUNDING:  # masked positions may hold anything finite: look at the valid ones only
        valid = entropy[mask]
        low = float(valid.min()) if valid.numel() else 0.0
        if low < -ENTROPY_ROUNDING:
            raise ValueError(
                f"`entropy` must be >= 0 (nats) at valid tokens, got {low:.4g} (values down to "
                f"-{ENTROPY_ROUNDING} are taken as rounding): is it the policy's entropy, not log-probabilities?"
            )


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
        beta: entropy scale (any sign, finite).
        lambda_min, lambda_max: clip range, 0 <= lambda_min <= lambda_max <= 1.

    Returns:
        lambda: float (B, T) in [lambda_min, lambda_max] (finite at masked positions too).

    Raises:
        TypeError: a hyper-parameter of the wrong type (e.g. a string), naming it.
        ValueError: alpha <= 0, NaN/inf beta, a bad clip range, NaN/inf entropy or entropy below -ENTROPY_ROUNDING
            at a valid token, or a bad mask.
    """
    mask = check_mask(response_mask)
    entropy = check_ea_gae_args(mask, entropy, alpha=alpha, beta=beta, lambda_min=lambda_min, lambda_max=lambda_max)
    dtype = float_dtype(entropy)
    lengths = mask.sum(dim=1, keepdim=True).to(dtype)  # l_b, (B, 1)
    scale = alpha * lengths
    if entropy is not None:
        # alpha * l * max(1 + beta * H, eps)
        scale = scale * (1.0 + beta * entropy.to(dtype)).clamp_min(EA_GAE_EPS)
    lam = (1.0 - scale.reciprocal()).clamp(lambda_min, lambda_max)
    return lam.expand(mask.shape).contiguous()
