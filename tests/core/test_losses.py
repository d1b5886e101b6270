"""Critic losses: clipped value loss, HVM's two-head loss, SCVL's split form."""

import pytest
import torch

from synapo_ext.core import hvm_critic_loss, scvl_loss, scvl_split_loss, value_loss


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 2.0, 5.0]])
    returns = torch.tensor([[0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # 0.5 * mean over valid of (V - G)^2 = 0.5 * (1 + 0) / 2 = 0.25 (the masked 25 never counts)
    loss, clipfrac = value_loss(values, returns, mask)
    assert loss.item() == pytest.approx(0.25) and clipfrac.item() == 0.0


def test_value_loss_clipping_takes_the_larger_error():
    values = torch.tensor([[1.0, 0.1]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0]])
    # token 0: unclipped (1-0)^2 = 1, clipped V = 0.2 -> 0.04: max = 1
    # token 1: unclipped (0.1-1)^2 = 0.81, clipped V = 0.1 (inside the range) -> 0.81
    loss, clipfrac = value_loss(values, returns, torch.ones(1, 2), old_values=old, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.81) / 2)
    assert clipfrac.item() == 0.0  # the clipped error is never the larger one here
    # V moved towards G beyond the range: old 0, V = 1 = G: unclipped 0, clipped (0.2 - 1)^2 = 0.64 wins
    loss, clipfrac = value_loss(
        torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1), old_values=torch.zeros(1, 1), cliprange_value=0.2
    )
    assert loss.item() == pytest.approx(0.5 * 0.64) and clipfrac.item() == 1.0
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, returns, torch.ones(1, 2), cliprange_value=0.2)


def test_hvm_critic_loss_trains_global_head_at_starts_only():
    local_values = torch.zeros(1, 4, requires_grad=True)
    global_values = torch.zeros(1, 4, requires_grad=True)
    local_returns = torch.ones(1, 4)
    global_returns = torch.full((1, 4), 2.0)
    mask = torch.ones(1, 4)
    starts = torch.tensor([[True, False, True, False]])
    loss, metrics = hvm_critic_loss(local_values, global_values, local_returns, global_returns, mask, starts)
    # local: 0.5 * mean(1) = 0.5; global: 0.5 * mean over 2 starts of 4 = 2.0
    assert metrics["local_loss"].item() == pytest.approx(0.5)
    assert metrics["global_loss"].item() == pytest.approx(2.0)
    loss.backward()
    assert torch.equal(global_values.grad[0, [1, 3]], torch.zeros(2))
    assert (global_values.grad[0, [0, 2]] != 0).all()


def test_scvl_split_form_gradient_equals_joint_hinge_at_rollout_weights():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, 9, generator=gen) * 0.3
    pos = torch.tensor([0, 0, 2, 4])
    neg = torch.tensor([1, 3, 3, 5])
    d = torch.tensor([2, 5, 0, 7])
    joint = values.clone().requires_grad_(True)
    scvl_loss(joint, pos, neg, d, margin=0.5).backward()

    old = values.clone()
    # each side lives in its own "micro-batch": positives then negatives, partner values from rollout time
    split = values.clone().requires_grad_(True)
    rows = torch.cat([pos, neg])
    partner = torch.cat([old[neg, d + 1], old[pos, d + 1]])
    is_positive = torch.cat([torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)])
    scvl_split_loss(split, rows, torch.cat([d, d]), partner, is_positive, margin=0.5, num_pairs=4).backward()
    torch.testing.assert_close(split.grad, joint.grad)


def test_scvl_split_loss_without_sides_is_zero():
    values = torch.zeros(2, 3, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    loss = scvl_split_loss(
        values, empty, empty, torch.zeros(0), torch.zeros(0, dtype=torch.bool), margin=0.5, num_pairs=0
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(values.grad, torch.zeros(2, 3))
