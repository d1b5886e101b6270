"""The shared-trunk critic (`critic_trunk="shared"`, synapo_ext/trl/trunk.py): value heads on the policy's hidden
states, the value gradient stopped at the trunk or scaled into it, its features, checkpoints and refusals."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from synapo_ext.core import METRICS  # noqa: E402

pytestmark = pytest.mark.trl


def _config(**overrides):
    from synapo_ext.trl import SynAPOConfig

    return SynAPOConfig(output_dir="unused", use_cpu=True, report_to=[], num_generations=4, **overrides)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"critic_trunk": "policy"}, "critic_trunk"),
        ({"critic_trunk": "shared", "critic_trunk_head": "deep"}, "critic_trunk_head"),
        ({"critic_trunk": "shared", "critic_trunk_grad_scale": -0.1}, "critic_trunk_grad_scale"),
        ({"critic_trunk": "shared", "critic_trunk_grad_scale": float("nan")}, "critic_trunk_grad_scale"),
        ({"critic_trunk": "shared", "critic_trunk_grad_scale": True}, "critic_trunk_grad_scale"),
        ({"critic_trunk_grad_scale": 0.5}, "critic_trunk_grad_scale"),  # needs the shared trunk
        ({"critic_trunk": "shared", "critic_model_name_or_path": "some/critic"}, "critic_model_name_or_path"),
    ],
)
def test_bad_trunk_settings_are_refused_by_name(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        _config(**overrides)


def test_scale_grad_and_heads():
    from synapo_ext.trl.trunk import ValueHeads, scale_grad

    x = torch.randn(3, 4, requires_grad=True)
    (scale_grad(x, 0.25) * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 4), 0.5))
    assert not scale_grad(x, 0.0).requires_grad  # 0: the gradient stops
    hidden = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    for head, params in (("linear", 8 * 2 + 2), ("mlp", 8 * 8 + 8 + 8 * 2 + 2)):
        heads = ValueHeads(8, 2, head)
        assert sum(p.numel() for p in heads.parameters()) == params
        out = heads(hidden)
        assert out.dtype == torch.float32 and out.shape == (2, 5, 2) and bool((out == 0).all())  # zero output layer


def _policy_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize(("preset", "fallback_forwards"), [("synapo", 0), ("vapo", 2)])
def test_heads_train_on_the_policy_features_and_the_policy_stays(
    make_trainer, rollout_inputs, critic_batches, preset, fallback_forwards
):
    """Warm-up batch + one rollout: the heads move, the policy does not; the values are the heads on the policy's
    hidden states; with EA-GAE the features come from the entropy pass (no extra forward), without it from one
    backbone forward per rollout."""
    from synapo_ext.trl.critic import critic_values
    from synapo_ext.trl.trunk import TrunkCritic

    trainer = make_trainer(preset, critic_trunk="shared", value_warmup_steps=1)
    assert isinstance(trainer.critic, TrunkCritic)
    heads = 2 if preset == "synapo" else 1  # HVM: local, global
    assert sum(p.numel() for p in trainer.critic.parameters()) == 32 * heads + heads  # Linear(32, heads): no 2nd model
    calls = []
    real = trainer.critic.hidden_states
    trainer.critic.hidden_states = lambda *a: calls.append(1) or real(*a)
    before, heads_before = _policy_state(trainer), trainer.critic.heads.net.weight.detach().clone()
    trainer.model.train()
    trainer._generate_and_score_completions(rollout_inputs(trainer))
    assert len(calls) == fallback_forwards  # warm-up batch + training batch
    after = _policy_state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the critic's update never touches the policy
    assert not torch.equal(heads_before, trainer.critic.heads.net.weight)
    assert len(critic_batches) == 2 and any("warmup/step" in entry for entry in trainer.state.log_history)
    batch = critic_batches[-1]
    trainer.critic.hidden_states = real
    with torch.no_grad(), trainer.accelerator.autocast():  # the kept features: the backbone's states of these tokens
        features = trainer._trunk_rollout_features
        assert features.shape == (*batch.response_mask.shape, 32)
        recomputed = critic_values(trainer.critic, batch.input_ids, batch.attention_mask, batch.response_mask.size(1))
        torch.testing.assert_close(recomputed, trainer.critic.heads(features), rtol=1e-5, atol=1e-5)
    assert METRICS.explained_variance_outcome in trainer._metrics["train"]


def test_grad_scale_puts_the_value_gradient_into_the_trunk(make_trainer):
    """grad_scale > 0: the heads train in the loss pass (their optimizer steps with the policy's) and the policy's
    update differs from the stopped-gradient run's by the value term only (same rollouts)."""
    finals = {}
    for scale in (0.0, 0.5):  # 2 steps: the heads start at 0, so step 1 sends no value gradient into the trunk
        trainer = make_trainer("vapo", critic_trunk="shared", critic_trunk_grad_scale=scale, max_steps=2)
        trainer.train()
        finals[scale] = (_policy_state(trainer), trainer.critic.heads.net.weight.detach().clone())
        assert trainer._critic_updates == 2
        assert all(METRICS.vf_loss in entry for entry in trainer.state.log_history[:2])
    (policy0, _), (policy1, heads1) = finals[0.0], finals[0.5]
    assert not torch.equal(heads1, torch.zeros_like(heads1))
    moved = [k for k in policy0 if not torch.equal(policy0[k], policy1[k])]
    assert any("layers" in k for k in moved), moved  # the trunk got the value gradient


def test_heads_checkpoint_and_resume(make_trainer, tmp_path):
    full = make_trainer("synapo", critic_trunk="shared", max_steps=2, save_strategy="steps", save_steps=1)
    full.train()
    checkpoint = os.path.join(full.args.output_dir, "checkpoint-1")
    weights = load_file(os.path.join(checkpoint, "critic", "model.safetensors"))
    assert sorted(weights) == ["heads.net.bias", "heads.net.weight"]  # the heads only: no second model
    resumed = make_trainer("synapo", critic_trunk="shared", max_steps=2, save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=checkpoint)
    for name, value in full.critic.state_dict().items():
        torch.testing.assert_close(resumed.critic.state_dict()[name], value, rtol=0, atol=0)


def test_trunk_refusals(make_trainer, monkeypatch):
    from synapo_ext.trl import trainer as trainer_module

    with pytest.raises(ValueError, match="critic_model"):
        make_trainer("synapo", critic_trunk="shared", critic_model=torch.nn.Linear(2, 2))
    monkeypatch.setattr(trainer_module, "critic_backend", lambda accelerator: "deepspeed")
    with pytest.raises(NotImplementedError, match="critic_trunk='shared'.*deepspeed"):
        make_trainer("synapo", critic_trunk="shared")
