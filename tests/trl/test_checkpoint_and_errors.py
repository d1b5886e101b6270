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


class _Killed(BaseException):
    """Stands in for a kill -9 during a save: nothing after it runs (not caught by `except Exception`)."""


def _kill_at(monkeypatch, trainer, owner, name, *, step, when=None):
    """Make `owner.name` raise `_Killed` once the trainer is saving the checkpoint of `step` (and `when(args)`)."""
    real = getattr(owner, name)

    def killer(*args, **kwargs):
        if trainer.state.global_step == step and (when is None or when(args)):
            raise _Killed(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, killer)


def _in_critic_part(args):
    return any("critic" in str(a) for a in args[:2])


# (where the kill lands, what to patch, which calls) -> a kill before the critic part is complete must be refused
SAVE_STAGES = {
    "trl_model_written": ("transformers.Trainer", "_save_optimizer_and_scheduler", None),
    "trl_state": ("transformers.TrainerState", "save_to_json", None),
    "critic_not_started": ("synapo_ext.trl.checkpoint", "save_critic_state", None),
    "critic_weights_written": ("torch", "save", _in_critic_part),
    "critic_before_manifest": ("synapo_ext.trl.critic", "_write_json", lambda a: "manifest" in str(a[0])),
    "critic_before_rename": ("os", "replace", _in_critic_part),
}


def _resolve(path):
    import importlib

    module, _, attr = path.rpartition(".")
    try:
        return importlib.import_module(path)
    except ImportError:
        return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("stage", sorted(SAVE_STAGES))
def test_kill_while_saving_leaves_a_checkpoint_that_resume_refuses(make_trainer, tmp_path, monkeypatch, stage):
    from synapo_ext.trl.critic import IncompleteCheckpointError, check_critic_state

    # no warm-up here: only the saving matters
    settings = {"save_strategy": "steps", "save_steps": 1, "save_total_limit": 1, "max_steps": 2,
                "value_warmup_steps": 0}  # fmt: skip
    trainer = make_trainer("synapo", **settings)
    owner, name, when = SAVE_STAGES[stage]
    _kill_at(monkeypatch, trainer, _resolve(owner), name, step=2, when=when)
    with pytest.raises(_Killed):
        trainer.train()
    monkeypatch.undo()
    out = tmp_path / "out"
    check_critic_state(str(out / "checkpoint-1"))  # the previous checkpoint survived (rotation waits) and is whole
    resumed = make_trainer("synapo", **settings)
    with pytest.raises(IncompleteCheckpointError, match=r"cannot resume from .*checkpoint-2.*checkpoint-1"):
        resumed.train(resume_from_checkpoint=True)


def test_kill_after_the_critic_part_resumes_exactly(make_trainer, tmp_path, monkeypatch):
    from synapo_ext.trl import checkpoint as checkpoint_module

    settings = {"save_strategy": "steps", "save_steps": 1, "save_total_limit": 1, "max_steps": 2,
                "value_warmup_steps": 1}  # fmt: skip
    trainer = make_trainer("synapo", **settings)
    _kill_at(monkeypatch, trainer, checkpoint_module, "rotate_checkpoints", step=2)  # last stage: old ones not deleted
    with pytest.raises(_Killed):
        trainer.train()
    monkeypatch.undo()
    weights, optimizer, scheduler = _state(trainer)
    resumed = make_trainer("synapo", **settings)
    loaded = {}
    real_load = resumed._load_optimizer_and_scheduler

    def load_and_snapshot(path):
        real_load(path)
        loaded["path"], loaded["state"] = path, _state(resumed)
        loaded["counters"] = (resumed._warmup_done, resumed._warmup_finished, resumed._critic_updates)

    resumed._load_optimizer_and_scheduler = load_and_snapshot
    resumed.train(resume_from_checkpoint=True)
    assert loaded["path"].endswith("checkpoint-2")
    got_weights, got_optimizer, got_scheduler = loaded["state"]
    for key, value in got_weights.items():
        assert torch.equal(value, weights[key]), key
    _assert_same_optimizer(got_optimizer, optimizer)
    assert got_scheduler == scheduler
    assert loaded["counters"] == (1, True, trainer._critic_updates)


def _checkpoint(make_trainer, tmp_path):
    trainer = make_trainer("vapo", save_strategy="steps", save_steps=1, max_steps=1)
    trainer.train()
    return trainer, tmp_path / "out" / "checkpoint-1"


def test_a_partial_or_mismatched_critic_part_is_refused(make_trainer, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from synapo_ext.trl.critic import IncompleteCheckpointError, load_critic_state

    trainer, checkpoint = _checkpoint(make_trainer, tmp_path)
    critic_dir = checkpoint / "critic"
    manifest = json.loads((critic_dir / "critic_manifest.json").read_text())
    weights = load_file(critic_dir / "model.safetensors")
    # weights without one key, the manifest updated to match: complete, but not this critic's -> strict load refuses
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, critic_dir / "model.safetensors")
    manifest["files"]["model.safetensors"] = (critic_dir / "model.safetensors").stat().st_size
    (critic_dir / "critic_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"missing keys.*{dropped}"):
        load_critic_state(str(checkpoint), trainer.critic)
    # a file cut short -> incomplete
    optimizer_file = critic_dir / "critic_optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    with pytest.raises(IncompleteCheckpointError, match="critic_optimizer.pt"):
        load_critic_state(str(checkpoint), trainer.critic)
    (critic_dir / "critic_manifest.json").unlink()
    with pytest.raises(IncompleteCheckpointError, match="critic_manifest.json"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_critic_values_are_deterministic_and_the_head_has_no_dropout(tokenizer):
    """Rollout-time values are the critic's prediction, not a dropout sample (its last update leaves it in train
    mode); a critic built here regresses without dropout before its head."""
    import torch

    from synapo_ext.trl.critic import build_critic, critic_values

    critic = build_critic(None, make_policy(tokenizer), num_heads=2)
    assert all(m.p == 0.0 for m in critic.modules() if isinstance(m, torch.nn.Dropout))
    with torch.no_grad():
        for m in critic.modules():  # a critic with dropout (e.g. passed in by the user), left in train mode
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.5
        torch.nn.init.normal_(critic.score.weight)
    critic.train()
    ids = torch.randint(2, len(tokenizer), (2, 7))
    first = critic_values(critic, ids, torch.ones_like(ids), 4)
    assert torch.equal(first, critic_values(critic, ids, torch.ones_like(ids), 4))
    assert critic.training  # its mode is restored
