"""Fixtures for the TRL adapter tests: a tiny policy, a local tokenizer and a trainer factory (no hub), one
generation batch, a spy on the critic's updates, and a two-rank torchrun launcher."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("trl")

from .tiny import first_char_reward, make_dataset, make_policy, make_tokenizer  # noqa: E402


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def make_trainer(tmp_path, tokenizer):
    """`make_trainer(preset=..., **config_overrides)` -> an untrained SynAPOTrainer on the tiny task; `model`,
    `train_dataset` and `trainer_kwargs` (more SynAPOTrainer keywords) replace the tiny task's parts."""
    return trainer_factory(tmp_path, tokenizer)


def trainer_factory(tmp_path, tokenizer):
    """`make_trainer`'s factory, writing to `tmp_path / "out"` (for fixtures of a wider scope)."""
    from synapo_ext.trl import SynAPOConfig, SynAPOTrainer

    def factory(
        preset="synapo",
        reward_funcs=None,
        critic_model=None,
        processing_class=None,
        *,
        model=None,
        train_dataset=None,
        trainer_kwargs=None,
        **overrides,
    ):
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
            model=make_policy(tok) if model is None else model,
            reward_funcs=reward_funcs or [first_char_reward],
            args=SynAPOConfig(**config),
            train_dataset=make_dataset() if train_dataset is None else train_dataset,
            processing_class=tok,
            critic_model=critic_model,
            **(trainer_kwargs or {}),
        )

    return factory


@pytest.fixture
def rollout_inputs():
    """`rollout_inputs(trainer, n_prompts=2)` -> one generation batch as TRL's sampler yields it: each prompt of
    the tiny task `trainer.num_generations` times in a row (rows of `make_dataset(n_prompts, seed=1)`)."""

    def inputs(trainer, n_prompts: int = 2) -> list[dict]:
        rows = make_dataset(n_prompts, seed=1).to_list()
        return [dict(row) for row in rows for _ in range(trainer.num_generations)]

    return inputs


@pytest.fixture
def critic_batches(monkeypatch):
    """Every batch the trainer's stage hands to `update_critic` (the real update still runs), oldest first."""
    from synapo_ext.trl import stage

    seen = []
    real_update = stage.update_critic

    def spy(critic, optimizer, scheduler, batch, params, **kwargs):
        seen.append(batch)
        return real_update(critic, optimizer, scheduler, batch, params, **kwargs)

    monkeypatch.setattr(stage, "update_critic", spy)
    return seen


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun():
    """`torchrun(script, *args, timeout=..., env=...)` -> the finished 2-rank `torch.distributed.run` of
    tests/trl/`script` (CPU, one thread per rank), run from the repository root; fails the test on a non-zero exit,
    with the end of both outputs."""

    def run(script: str, *args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(_free_port()), os.path.join(ROOT, "tests", "trl", script), *args]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc

    return run
