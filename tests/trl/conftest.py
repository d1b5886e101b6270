"""Fixtures for the TRL adapter tests: a tiny policy, a local tokenizer and a trainer factory (no hub)."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from .tiny import first_char_reward, make_dataset, make_policy, make_tokenizer  # noqa: E402


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def make_trainer(tmp_path, tokenizer):
    """`make_trainer(preset=..., **config_overrides)` -> an untrained SynAPOTrainer on the tiny task."""
    from synapo_ext.trl import SynAPOConfig, SynAPOTrainer

    def factory(preset="synapo", reward_funcs=None, critic_model=None, processing_class=None, **overrides):
        config = {
            "output_dir": str(tmp_path / "out"),
            "preset": preset,
            "use_cpu": True,
            "report_to": [],
            "save_strategy": "no",
            "disable_tqdm": True,
            "num_generations": 4,
            "per_device_train_batch_size": 8,
            "max_completion_length": 16,
            "max_steps": 2,
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "critic_learning_rate": 1e-2,
            "value_warmup_steps": 0,
            "seed": 0,
        }
        config.update(overrides)
        tok = processing_class or tokenizer
        return SynAPOTrainer(
            model=make_policy(tok),
            reward_funcs=reward_funcs or [first_char_reward],
            args=SynAPOConfig(**config),
            train_dataset=make_dataset(),
            processing_class=tok,
            critic_model=critic_model,
        )

    return factory
