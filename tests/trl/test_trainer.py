"""SynAPOTrainer end to end on a tiny Qwen2: every preset trains, advantages are (B, T), PPO equals a GAE reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402

from synapo_ext.core import METRICS, PRESETS  # noqa: E402
from synapo_ext.trl.stage import LM_WEIGHT  # noqa: E402

pytestmark = pytest.mark.trl


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before, model):
    return [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]


def ref_gae(rewards, values, mask, gamma, lam):
    """float64 loop GAE (verl's compute_gae_advantage_return) on right-padded rows."""
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_value = next_advantage = 0.0
        for t in reversed(range(T)):
            if mask[b, t] == 0:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[b, t], next_value = next_advantage, values[b, t]
    returns = advantages + values
    m = mask.bool()
    mean, var = advantages[m].mean(), advantages[m].var()  # verl's masked_whiten (unbiased variance)
    return (advantages - mean) * torch.rsqrt(var + 1e-8), returns


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_train_every_preset(make_trainer, preset):
    trainer = make_trainer(preset, value_warmup_steps=1 if preset != "ppo" else 0)
    policy_before, critic_before = _snapshot(trainer.model), _snapshot(trainer.critic)
    trainer.train()
    assert _changed(critic_before, trainer.critic), "the critic did not move"
    assert _changed(policy_before, trainer.model), "the policy did not move"
    batch = trainer._buffered_inputs[0]
    advantages = batch["advantages"]
    assert advantages.shape == batch["completion_ids"].shape and torch.isfinite(advantages).all()
    logged = {k for entry in trainer.state.log_history for k in entry}
    expected = {METRICS.vf_loss, METRICS.explained_variance, METRICS.grad_norm, "loss"}
    if preset != "ppo":
        expected |= {METRICS.lambda_mean}
    if PRESETS[preset].get("hvm_enabled", True):
        expected |= {METRICS.global_loss, METRICS.global_clipfrac, METRICS.segments_mean}
    if PRESETS[preset].get("scvl_enabled", True):
        expected |= {METRICS.scvl_loss, METRICS.scvl_pairs, METRICS.scvl_groups_mixed}
    if PRESETS[preset].get("positive_lm_coef", 0.1) > 0:
        expected |= {METRICS.positive_lm_loss}
    assert expected <= logged, expected - logged


def test_ppo_advantages_equal_a_float64_gae_reference(make_trainer, rollout_inputs, critic_batches):
    trainer = make_trainer("ppo")
    trainer.model.train()
    output = trainer._generate_and_score_completions(rollout_inputs(trainer))
    batch = critic_batches[-1]
    mask = batch.response_mask.double()
    scores = trainer._rewards_per_func[:, 0].double()  # one reward function of weight 1: the score
    last = mask.size(1) - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(mask.size(0)), last] = scores
    values = batch.old_values[..., 0].double()
    assert values.abs().sum() == 0  # fresh zero head: make the values non-trivial below
    advantages, returns = ref_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    m = mask.bool()
    torch.testing.assert_close(output["advantages"].double()[m], advantages[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.returns.double()[m], returns[m], rtol=1e-5, atol=1e-5)
    # TRL's completions table shows these advantages (each row's mean over valid tokens), not GRPO's
    logged = list(trainer._logs["advantages"])[-mask.size(0) :]
    expected_rows = (advantages * mask).sum(1) / mask.sum(1).clamp(min=1)
    torch.testing.assert_close(torch.tensor(logged, dtype=torch.float64), expected_rows, rtol=1e-5, atol=1e-5)
    # second rollout: the critic has moved, values are non-zero
    output = trainer._generate_and_score_completions(rollout_inputs(trainer))
    batch = critic_batches[-1]
    mask, values = batch.response_mask.double(), batch.old_values[..., 0].double()
    assert values.abs().sum() > 0
    last = mask.size(1) - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(mask.size(0)), last] = trainer._rewards_per_func[:, 0].double()
    advantages, _ = ref_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    m = mask.bool()
    torch.testing.assert_close(output["advantages"].double()[m], advantages[m], rtol=1e-4, atol=1e-4)


def test_value_warmup_trains_only_the_critic(make_trainer, rollout_inputs):
    trainer = make_trainer("vapo", value_warmup_steps=2)
    trainer.model.train()
    policy_before, critic_before = _snapshot(trainer.model), _snapshot(trainer.critic)
    trainer._generate_and_score_completions(rollout_inputs(trainer))
    assert trainer._warmup_done == 2 and trainer._critic_updates == 3  # 2 warm-up rollouts + this one
    assert _changed(critic_before, trainer.critic)
    assert not _changed(policy_before, trainer.model)


def test_critic_moves_under_gradient_accumulation(make_trainer):
    # notes/trl.md pitfall 1: an accelerate-prepared optimizer skips steps on non-sync micro-steps under GA
    trainer = make_trainer("vapo", gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=1)
    critic_before = _snapshot(trainer.critic)
    trainer.train()
    changed = _changed(critic_before, trainer.critic)
    assert len(changed) == len(critic_before), f"only {len(changed)}/{len(critic_before)} critic tensors moved"


@pytest.mark.parametrize("trl_runs_old_logps", [True, False])
def test_rollout_entropy_comes_from_trl_old_logprob_pass(
    make_trainer, rollout_inputs, monkeypatch, trl_runs_old_logps
):
    # steps_per_generation 4 > gradient_accumulation_steps 2: TRL runs its old-log-prob pass; we reuse it
    overrides = {"steps_per_generation": 4, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}
    trainer = make_trainer("synapo-no-hvm", **(overrides if trl_runs_old_logps else {}))
    trainer.model.train()
    calls = []
    real = GRPOTrainer._get_per_token_logps_and_entropies

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("compute_entropy", False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", spy)
    output = trainer._generate_and_score_completions(rollout_inputs(trainer, n_prompts=2))
    assert calls == [True], calls  # exactly one policy forward, with entropy (TRL's own, or our extra one)
    assert ("old_per_token_logps" in output) == trl_runs_old_logps


def test_positive_lm_loss_adds_coef_times_nll(make_trainer, rollout_inputs):
    # VAPO's normalisation: coef * the mean NLL over the correct responses' tokens of the micro-batch
    trainer = make_trainer("vapo")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    inputs = trainer._generate_and_score_completions(rollout_inputs(trainer))
    positive = torch.tensor([True, False] * (len(inputs[LM_WEIGHT]) // 2))
    inputs[LM_WEIGHT] = 0.1 * positive.float()  # the core's weights: coef on correct rows
    with_lm = trainer._compute_loss(trainer.model, inputs).detach()  # with grad: the LM term uses the loss pass
    trainer.synapo.positive_lm_coef = 0.0
    without = trainer._compute_loss(trainer.model, inputs).detach()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].size(1),
        )
    mask = inputs["completion_mask"] * positive.unsqueeze(1)
    nll = -(logps * mask).sum() / mask.sum()
    torch.testing.assert_close(with_lm - without, 0.1 * nll / trainer.current_gradient_accumulation_steps)


def test_positive_lm_weights_follow_their_own_threshold(make_trainer, rollout_inputs):
    # "correct" for the positive-example LM loss is score >= positive_lm_threshold, whatever scvl_threshold says
    trainer = make_trainer("synapo", positive_lm_threshold=0.5, scvl_threshold=2.0)
    trainer.model.train()
    output = trainer._generate_and_score_completions(rollout_inputs(trainer))
    scores = trainer._rewards_per_func[:, 0]  # first_char_reward: 0 or 1
    has_tokens = output["completion_mask"].any(dim=1)
    expected = 0.1 * ((scores >= 0.5) & has_tokens).float()  # coef 0.1 on correct rows with a token
    assert expected.sum() > 0
    torch.testing.assert_close(output[LM_WEIGHT], expected)
