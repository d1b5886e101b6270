"""compute_synapo_advantages composes the core API exactly as each preset says."""

import pytest
import torch

from synapo_ext.core import (
    PRESETS,
    compute_gae,
    compute_synapo_advantages,
    ea_gae_lambda,
    hvm_advantages,
    params_from_preset,
    scvl_pairs,
    segment_ids,
)


def _batch(gen: torch.Generator, B: int = 8, T: int = 40):
    lengths = torch.randint(5, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None] < lengths[:, None]
    scores = (torch.rand(B, generator=gen) > 0.5).float()
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scores
    ids = torch.randint(0, 6, (B, T), generator=gen)
    ids[:, :3] = 1  # shared prefix, so SCVL pairs diverge later
    table = torch.zeros(6, dtype=torch.bool)
    table[0] = True
    return {
        "rewards": rewards,
        "values": torch.rand(B, T, generator=gen) * 2 - 1,
        "response_mask": mask,
        "global_values": torch.rand(B, T, generator=gen) * 2 - 1,
        "entropy": torch.rand(B, T, generator=gen) * 3,
        "response_ids": ids,
        "boundary_table": table,
        "scores": scores,
        "group_ids": [f"uid{b // 4}" for b in range(B)],
    }


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_stage_equals_the_api_calls(preset, gen):
    x = _batch(gen)
    p = params_from_preset(preset, ea_gae_alpha=0.2)
    out = compute_synapo_advantages(p, **x)
    mask = x["response_mask"]
    if not p.length_adaptive_lambda:
        lam = p.gae_lambda
    else:
        lam = ea_gae_lambda(
            mask,
            x["entropy"] if p.ea_gae_enabled else None,
            alpha=0.2,
            beta=p.ea_gae_beta if p.ea_gae_enabled else 0.0,
        )
    if p.hvm_enabled:
        seg = segment_ids(x["response_ids"], mask, x["boundary_table"], fallback_len=p.hvm_fallback_len)
        hvm = hvm_advantages(
            x["rewards"], x["values"], x["global_values"], mask, seg, gamma=1.0, lam=lam, global_lam=0.95,
            global_weight=1.0, whiten=True,
        )  # fmt: skip
        expected_adv, expected_ret = hvm.advantages, hvm.local_returns
        torch.testing.assert_close(out.global_returns[mask], hvm.global_returns[mask])
    else:
        expected_adv, _ = compute_gae(x["rewards"], x["values"], mask, gamma=1.0, lam=lam, whiten=True)
        _, expected_ret = compute_gae(x["rewards"], x["values"], mask, gamma=1.0, lam=p.critic_lambda)
        assert out.global_returns is None and out.seg_ids is None
    torch.testing.assert_close(out.advantages[mask], expected_adv[mask])
    torch.testing.assert_close(out.returns[mask], expected_ret[mask])
    if p.scvl_enabled:
        pairs = scvl_pairs(x["response_ids"], mask, x["scores"], x["group_ids"])
        assert all(torch.equal(a, b) for a, b in zip(out.scvl, pairs, strict=True))
        torch.testing.assert_close(out.scvl_pos_values, x["values"][pairs.pos_index, pairs.diverge_index + 1])
        assert out.metrics["synapo/scvl/pairs"] == pairs.pos_index.numel()
    else:
        assert out.scvl is None
    if p.length_adaptive_lambda:
        assert 0.0 <= out.metrics["ea_gae/lambda_min"] <= out.metrics["ea_gae/lambda_mean"] <= 1.0


def test_vapo_critic_targets_are_monte_carlo(gen):
    x = _batch(gen)
    out = compute_synapo_advantages(params_from_preset("vapo"), **x)
    # critic_lambda = 1, gamma = 1: the target is the sum of rewards from t to the end, whatever the values
    mc = x["rewards"].flip(1).cumsum(1).flip(1)
    mask = x["response_mask"]
    torch.testing.assert_close(out.returns[mask], mc[mask])


@pytest.mark.parametrize(
    ("preset", "missing"),
    [
        ("synapo", "entropy"),
        ("synapo", "global_values"),
        ("synapo", "boundary_table"),
        ("synapo", "scores"),
        ("synapo", "group_ids"),
        ("synapo-no-hvm", "response_ids"),
    ],
)
def test_missing_inputs_name_the_argument(preset, missing, gen):
    x = _batch(gen)
    x[missing] = None
    with pytest.raises(ValueError, match=missing):
        compute_synapo_advantages(params_from_preset(preset), **x)
