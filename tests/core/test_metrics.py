"""The formulas the hosts shared and now take from the core: explained variance, the positive-example LM loss and
its weights, and the one metric-name table."""

import dataclasses

import pytest
import torch

from synapo_ext.core import (
    METRICS,
    compute_synapo_advantages,
    explained_variance,
    params_from_preset,
    positive_lm_loss,
    positive_lm_weights,
)

from .test_stage import _batch


def test_explained_variance_hand_computed():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    values = torch.tensor([[1.0, 2.0, 2.0, -5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # G = [1, 2, 3]: Var = 1; G - V = [0, 0, 1]: Var = ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3
    ev = explained_variance(values, returns, mask)
    assert ev.dtype == torch.float64
    assert float(ev) == pytest.approx(1.0 - (1 / 3) / (1.0 + 1e-5))


def test_explained_variance_matches_verl_formula(gen):
    values, returns = torch.randn(5, 9, generator=gen), torch.randn(5, 9, generator=gen)
    mask = torch.rand(5, 9, generator=gen) > 0.3
    mask[2] = False  # a row with no token is allowed
    g, v = returns[mask].double(), values[mask].double()
    # verl's compute_data_metrics: 1 - var(G - V) / (var(G) + 1e-5)
    expected = 1.0 - torch.var(g - v) / (torch.var(g) + 1e-5)
    torch.testing.assert_close(explained_variance(values, returns, mask), expected)


def test_explained_variance_degenerate_and_bad_input():
    one = torch.tensor([[1.0, 0.0]])
    assert explained_variance(one, one, torch.tensor([[1, 0]])) is None  # one valid token
    assert explained_variance(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3)) is None
    # returns without variance (all-zero rewards, critic at 0): undefined, not the formula's 1.0
    assert explained_variance(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)) is None
    assert explained_variance(torch.randn(2, 3), torch.full((2, 3), 0.5), torch.ones(2, 3)) is None
    tiny = torch.tensor([[0.0, 1e-3, 0.0]])  # some variance, however small: defined
    assert explained_variance(torch.zeros(1, 3), tiny, torch.ones(1, 3)) is not None
    with pytest.raises(ValueError, match="returns"):
        explained_variance(torch.zeros(2, 3), torch.full((2, 3), float("nan")), torch.ones(2, 3))
    with pytest.raises(ValueError, match="values"):
        explained_variance(torch.zeros(2, 4), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="response_mask"):
        explained_variance(torch.zeros(2, 3), torch.zeros(2, 3), torch.full((2, 3), 2))


def test_positive_lm_weights():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.49, float("nan")])
    w = positive_lm_weights(scores, coef=0.1, threshold=0.5)
    # correct iff score >= 0.5; a missing (NaN) score is not correct
    torch.testing.assert_close(w, torch.tensor([0.1, 0.0, 0.1, 0.0, 0.0]))
    with pytest.raises(ValueError, match="coef"):
        positive_lm_weights(scores, coef=float("nan"), threshold=0.5)
    with pytest.raises(ValueError, match="scores"):
        positive_lm_weights(torch.zeros(2, 2), coef=0.1, threshold=0.5)


def test_positive_lm_loss_hand_computed():
    log_probs = torch.tensor([[-1.0, -2.0, -float("inf")], [-3.0, -float("inf"), -5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    weights = torch.tensor([0.1, 0.0])
    # only row 0 counts: -0.1 * (-1 - 2) / 2 tokens = 0.15; the -inf entries are masked or weighted 0 (no NaN)
    loss = positive_lm_loss(log_probs, mask, weights)
    assert loss.item() == pytest.approx(0.15)
    loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([[-0.05, -0.05, 0.0], [0.0, 0.0, 0.0]]))
    # a host's own normaliser N: the micro-batch sums add up to the batch's loss
    assert positive_lm_loss(log_probs, mask, weights, num_tokens=6).item() == pytest.approx(0.05)


def test_positive_lm_loss_without_correct_rows_is_zero():
    log_probs = torch.randn(3, 4, requires_grad=True)
    loss = positive_lm_loss(log_probs, torch.ones(3, 4), torch.zeros(3))
    loss.backward()
    assert loss.item() == 0.0 and not log_probs.grad.any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": torch.zeros(2)}, "weights"),
        ({"response_mask": torch.ones(3, 5)}, "response_mask"),
        ({"num_tokens": 0}, "num_tokens"),
    ],
)
def test_positive_lm_loss_bad_input(kwargs, match):
    args = {"log_probs": torch.zeros(3, 4), "response_mask": torch.ones(3, 4), "weights": torch.zeros(3), **kwargs}
    with pytest.raises(ValueError, match=match):
        positive_lm_loss(**args)


def test_stage_gives_the_weights_with_their_own_threshold(gen):
    x = _batch(gen)
    x["scores"] = torch.linspace(0.0, 1.0, x["scores"].numel())
    params = params_from_preset("synapo", scvl_threshold=0.9, positive_lm_threshold=0.3, positive_lm_coef=0.2)
    out = compute_synapo_advantages(params, **x)
    expected = positive_lm_weights(x["scores"], coef=0.2, threshold=0.3)
    torch.testing.assert_close(out.positive_lm_weights, expected)
    assert int((expected > 0).sum()) != int((x["scores"] >= 0.9).sum())  # not SCVL's threshold


def test_metric_names_are_unique_and_the_stage_uses_them(gen):
    names = METRICS.names()
    assert len(set(names)) == len(names) == len(dataclasses.fields(METRICS))
    out = compute_synapo_advantages(params_from_preset("synapo"), **_batch(gen))
    assert set(out.metrics) <= set(names)
    with pytest.raises(dataclasses.FrozenInstanceError):
        METRICS.vf_loss = "x"


def test_stage_sides_give_the_joint_hinge_gradient(gen):
    from synapo_ext.core import scvl_loss, scvl_split_loss

    x = _batch(gen)
    x["response_mask"][5] = False  # a skipped row: the sides' rows are batch rows
    out = compute_synapo_advantages(params_from_preset("synapo"), **x)
    pairs, sides = out.scvl, out.scvl_sides
    P = pairs.pos_index.numel()
    assert P > 0 and sides.rows.numel() == 2 * P and int(sides.is_positive.sum()) == P
    joint_values = x["values"].clone().requires_grad_(True)
    joint = scvl_loss(joint_values, *pairs, margin=0.5)
    joint.backward()
    split_values = x["values"].clone().requires_grad_(True)
    split = scvl_split_loss(split_values, *sides, margin=0.5, num_pairs=P)
    split.backward()
    # at the rollout-time values each side holds the whole hinge: the sum is twice the joint mean, the gradient equal
    torch.testing.assert_close(split, 2 * joint)
    torch.testing.assert_close(split_values.grad, joint_values.grad)
    assert joint_values.grad.abs().sum() > 0
