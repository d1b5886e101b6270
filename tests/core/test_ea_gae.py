"""ea_gae_lambda against the float64 loop reference (SPEC "EA-GAE"; docs/core_api.md)."""

import pytest
import torch
from hypothesis import given

from synapo_ext.core import EA_GAE_EPS, ea_gae_lambda

from .reference import ref_ea_gae_lambda
from .strategies import (
    DEFAULT,
    SLOW,
    assert_close_valid,
    assert_equal_valid,
    atol_for,
    ea_lambda_cases,
    generators,
    scramble,
)


def _call(case, **overrides):
    kwargs = dict(alpha=case.alpha, beta=case.beta, lambda_min=case.lambda_min, lambda_max=case.lambda_max)
    kwargs.update(overrides)
    return ea_gae_lambda(case.response_mask, case.entropy, **kwargs)


def check_against_reference(case):
    lam = _call(case)
    expected_dtype = case.entropy.dtype if case.entropy is not None else torch.float32
    assert lam.dtype == expected_dtype
    assert lam.shape == case.response_mask.shape
    ref = ref_ea_gae_lambda(
        case.response_mask,
        case.entropy,
        alpha=case.alpha,
        beta=case.beta,
        lambda_min=case.lambda_min,
        lambda_max=case.lambda_max,
    )
    assert_close_valid(lam, ref, case.response_mask, atol=atol_for(expected_dtype))
    valid = lam[case.response_mask.bool()]
    assert bool(torch.isfinite(valid).all())
    assert bool(((valid >= case.lambda_min) & (valid <= case.lambda_max)).all())


@DEFAULT
@given(case=ea_lambda_cases())
def test_ea_gae_lambda_matches_reference(case):
    check_against_reference(case)


@pytest.mark.slow
@SLOW
@given(case=ea_lambda_cases())
def test_ea_gae_lambda_matches_reference_slow(case):
    check_against_reference(case)


def test_eps_constant():
    assert EA_GAE_EPS == 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------------


def test_hand_cases():
    # Row 0 has l = 40 valid tokens, row 1 has l = 10; alpha = 0.05, beta = 0.5.
    # Row 0, H = 0: alpha * l = 2 -> 1 - 1/2 = 0.5.   H = 2: 2 * (1 + 0.5*2) = 4 -> 1 - 1/4 = 0.75.
    # Row 1, H = 0: alpha * l = 0.5 -> 1 - 2 = -1 -> clipped to 0.   H = 6: 0.5 * 4 = 2 -> 0.5.
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0] = True
    mask[1, :10] = True
    entropy = torch.zeros(2, 40)
    entropy[0, 1] = 2.0
    entropy[1, 1] = 6.0
    lam = ea_gae_lambda(mask, entropy, alpha=0.05, beta=0.5)
    torch.testing.assert_close(lam[:, :2], torch.tensor([[0.5, 0.75], [0.0, 0.5]]))


def test_negative_beta_floors_at_eps():
    # beta = -1, H = 2: 1 + beta*H = -1 -> floored at 1e-6: 1 - 1/(2 * 1e-6) << 0 -> lambda_min (never negative, NaN).
    # beta = -1, H = 0.5: 1 + beta*H = 0.5: alpha*l*0.5 = 1 -> 1 - 1 = 0.   H = 0.25: 2 * 0.75 = 1.5 -> 1/3.
    mask = torch.ones(1, 40)
    entropy = torch.zeros(1, 40)
    entropy[0, :3] = torch.tensor([2.0, 0.5, 0.25])
    lam = ea_gae_lambda(mask, entropy, alpha=0.05, beta=-1.0)
    torch.testing.assert_close(lam[0, :4], torch.tensor([0.0, 0.0, 1.0 / 3.0, 0.5]))
    lam = ea_gae_lambda(mask, entropy, alpha=0.05, beta=-1.0, lambda_min=0.2, lambda_max=0.4)
    torch.testing.assert_close(lam[0, :4], torch.tensor([0.2, 0.2, 1.0 / 3.0, 0.4]))


def test_interior_zeros_count_only_valid_tokens():
    # l = 3 valid tokens (interior zeros do not count), alpha = 1: lambda = 1 - 1/3 = 2/3 at every valid token.
    mask = torch.tensor([[1, 0, 1, 0, 0, 1, 0]])
    lam = ea_gae_lambda(mask, alpha=1.0)
    torch.testing.assert_close(lam[mask.bool()], torch.full((3,), 2.0 / 3.0))


# ---------------------------------------------------------------------------------------------------------------
# Exact reductions, dtypes, invariance
# ---------------------------------------------------------------------------------------------------------------


@DEFAULT
@given(case=ea_lambda_cases())
def test_beta_zero_is_vapo_length_adaptive_lambda(case):
    # SPEC: beta = 0 -> VAPO's lambda = clip(1 - 1/(alpha * l), 0, 1), whatever the entropy.
    lam = _call(case, beta=0.0, lambda_min=0.0, lambda_max=1.0)
    lengths = case.response_mask.bool().sum(dim=1, keepdim=True).to(lam.dtype)
    vapo = (1.0 - 1.0 / (case.alpha * lengths)).clamp(0.0, 1.0).expand_as(lam)
    valid = case.response_mask.bool()
    torch.testing.assert_close(lam[valid], vapo[valid])
    no_entropy = ea_gae_lambda(case.response_mask, None, alpha=case.alpha)
    torch.testing.assert_close(no_entropy[valid], lam[valid].to(no_entropy.dtype))


@DEFAULT
@given(case=ea_lambda_cases(), gen=generators())
def test_masked_entropy_does_not_matter(case, gen):
    if case.entropy is None:
        return
    expected = _call(case)
    scrambled = scramble(case.entropy, case.response_mask, gen, 1e3)
    actual = ea_gae_lambda(
        case.response_mask,
        scrambled,
        alpha=case.alpha,
        beta=case.beta,
        lambda_min=case.lambda_min,
        lambda_max=case.lambda_max,
    )
    assert_equal_valid(actual, expected, case.response_mask)


def test_dtypes():
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert ea_gae_lambda(mask, alpha=0.05).dtype == torch.float32
    assert ea_gae_lambda(mask.long(), torch.zeros(2, 3), alpha=0.05).dtype == torch.float32
    assert ea_gae_lambda(mask, torch.zeros(2, 3, dtype=torch.float64), alpha=0.05).dtype == torch.float64


def test_long_row(gen):
    mask = torch.ones(2, 16384, dtype=torch.bool)
    mask[1, 3000:] = False
    mask[1, 100:200] = False
    entropy = torch.rand(2, 16384, generator=gen) * 5
    lam = ea_gae_lambda(mask, entropy, alpha=0.05, beta=0.05)
    ref = ref_ea_gae_lambda(mask, entropy, alpha=0.05, beta=0.05)
    assert_close_valid(lam, ref, mask, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, -0.05, float("nan")])
def test_alpha_not_positive(alpha):
    with pytest.raises(ValueError, match="alpha"):
        ea_gae_lambda(torch.ones(1, 3), alpha=alpha)


@pytest.mark.parametrize(
    "lambda_min, lambda_max, argument",
    [(-0.1, 1.0, "lambda_min"), (0.0, 1.1, "lambda_max"), (0.8, 0.2, "lambda_m(in|ax)")],
)
def test_lambda_bounds(lambda_min, lambda_max, argument):
    with pytest.raises(ValueError, match=argument):
        ea_gae_lambda(torch.ones(1, 3), alpha=0.05, lambda_min=lambda_min, lambda_max=lambda_max)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_entropy(bad):
    entropy = torch.zeros(1, 3)
    entropy[0, 2] = bad  # at a masked position: checked all the same
    with pytest.raises(ValueError, match="entropy"):
        ea_gae_lambda(torch.tensor([[1, 1, 0]]), entropy, alpha=0.05)


def test_entropy_shape_mismatch():
    with pytest.raises(ValueError, match="entropy"):
        ea_gae_lambda(torch.ones(2, 3), torch.zeros(2, 4), alpha=0.05)


def test_all_masked_row():
    with pytest.raises(ValueError, match="response_mask"):
        ea_gae_lambda(torch.tensor([[1, 1], [0, 0]]), alpha=0.05)


@pytest.mark.parametrize("mask", [torch.tensor([[1, 2]]), torch.tensor([[1.0, 0.5]])])
def test_mask_values(mask):
    with pytest.raises(ValueError, match="response_mask"):
        ea_gae_lambda(mask, alpha=0.05)


def test_non_tensor():
    with pytest.raises(TypeError, match="response_mask"):
        ea_gae_lambda([[1, 1, 0]], alpha=0.05)
    with pytest.raises(TypeError, match="entropy"):
        ea_gae_lambda(torch.ones(1, 3), [[0.0, 0.0, 0.0]], alpha=0.05)
