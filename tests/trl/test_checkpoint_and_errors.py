"""Critic checkpoint / resume / export, and bad input naming the argument."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("trl")

from transformers import AutoModelForTokenClassification  # noqa: E402

from .tiny import make_policy, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.trl


def _state(trainer):
    weights = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    return weights, copy.deepcopy(trainer.critic_optimizer.state_dict()), trainer.critic_scheduler.state_dict()


def _assert_same_optimizer(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][key][name])), (key, name)


def test_resume_restores_the_critic_exactly(make_trainer, tmp_path):
    trainer = make_trainer("synapo", save_strategy="steps", save_steps=2, max_steps=2, value_warmup_steps=1)
    trainer.train()
    weights, optimizer, scheduler = _state(trainer)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "critic" / "model.safetensors").exists()
    assert (checkpoint / "critic" / "critic_optimizer.pt").exists()

    resumed = make_trainer("synapo", save_strategy="steps", save_steps=2, max_steps=3, value_warmup_steps=1)
    loaded = {}
    real_load = resumed._load_optimizer_and_scheduler

    def load_and_snapshot(path):
        real_load(path)
        loaded["state"] = _state(resumed)
        loaded["counters"] = (resumed._warmup_done, resumed._critic_updates)

    resumed._load_optimizer_and_scheduler = load_and_snapshot
    resumed.train(resume_from_checkpoint=str(checkpoint))  # loads, then trains on from step 2
    got_weights, got_optimizer, got_scheduler = loaded["state"]
    for name, value in got_weights.items():
        assert torch.equal(value, weights[name]), name
    _assert_same_optimizer(got_optimizer, optimizer)
    assert got_scheduler == scheduler
    assert loaded["counters"] == (1, trainer._critic_updates)
    assert resumed._critic_updates == trainer._critic_updates + 1  # no second warm-up after resuming


def test_save_model_exports_the_critic_beside_the_policy(make_trainer, tmp_path):
    trainer = make_trainer("vapo", max_steps=1)
    trainer.train()
    out = tmp_path / "export"
    trainer.save_model(str(out))
    assert (out / "model.safetensors").exists()
    critic = AutoModelForTokenClassification.from_pretrained(out / "critic")
    assert critic.config.num_labels == 1
    for name, value in trainer.critic.state_dict().items():
        torch.testing.assert_close(critic.state_dict()[name], value, rtol=0, atol=0)
    assert not any(name.endswith(".pt") for name in os.listdir(out / "critic"))  # export: weights only


def test_critic_from_a_path_and_from_a_model(make_trainer, tmp_path):
    trainer = make_trainer("vapo", max_steps=1)
    trainer.save_model(str(tmp_path / "export"))
    from_path = make_trainer("vapo", critic_model=str(tmp_path / "export" / "critic"))
    assert from_path.critic.config.num_labels == 1
    from_model = make_trainer("vapo", critic_model=trainer.critic)
    assert from_model.critic is trainer.critic


def test_reward_list_of_the_wrong_length(make_trainer):
    def short_reward(completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    trainer = make_trainer("vapo", reward_funcs=[short_reward], max_steps=1)
    with pytest.raises(ValueError, match="reward function 'short_reward' returned 7 rewards"):
        trainer.train()


def test_critic_vocabulary_must_match(make_trainer):
    other = make_policy(make_tokenizer(with_delimiter=False))  # one token fewer
    with pytest.raises(ValueError, match="critic_model"):
        make_trainer("vapo", critic_model=str(_save_critic(other)))


def _save_critic(policy):
    import tempfile

    from synapo_ext.trl.critic import build_critic

    path = tempfile.mkdtemp()
    build_critic(None, policy, num_heads=1).save_pretrained(path)
    return path


def test_critic_with_the_wrong_number_of_heads(make_trainer, tokenizer):
    from synapo_ext.trl.critic import build_critic

    one_head = build_critic(None, make_policy(tokenizer), num_heads=1)
    with pytest.raises(ValueError, match="critic_model"):
        make_trainer("synapo", critic_model=one_head)  # HVM needs 2 outputs


def test_tokenizer_without_a_delimiter_token_with_hvm_on(make_trainer):
    with pytest.raises(ValueError, match="hvm_delimiters"):
        make_trainer("synapo", processing_class=make_tokenizer(with_delimiter=False))


def test_args_must_be_a_synapo_config(tokenizer):
    from trl import GRPOConfig

    from synapo_ext.trl import SynAPOTrainer

    from .tiny import first_char_reward, make_dataset

    with pytest.raises(TypeError, match="args"):
        SynAPOTrainer(
            model=make_policy(tokenizer),
            reward_funcs=[first_char_reward],
            args=GRPOConfig(output_dir="unused", use_cpu=True, report_to=[], num_generations=4),
            train_dataset=make_dataset(),
            processing_class=tokenizer,
        )
