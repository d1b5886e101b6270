"""The value warm-up's stopping rule on verl's V1 trainer, and its state across a checkpoint (a stub trainer; the
real run in test_real_run.py drives the same code through verl)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from synapo_ext.core import METRICS, SynAPOAdvantages  # noqa: E402
from synapo_ext.verl.estimator import StepContext  # noqa: E402
from synapo_ext.verl.warmup import STATE_FILE, warmup_step, wrap_load_checkpoint, wrap_save_checkpoint  # noqa: E402

pytestmark = pytest.mark.verl


class Trainer:
    def __init__(self, root: str, **synapo) -> None:
        self.config = OmegaConf.create(
            {
                "algorithm": {"adv_estimator": "synapo", "synapo": {"value_warmup_steps": 10, **synapo}},
                "trainer": {"critic_warmup": 11, "default_local_dir": root, "resume_mode": "auto"},
            }
        )
        self.global_steps = 0

    def step(self, values: torch.Tensor, returns: torch.Tensor) -> dict:
        from synapo_ext.verl.config import params_from_algorithm

        self.global_steps += 1
        mask = torch.ones_like(values, dtype=torch.bool)
        ctx = StepContext(values=values, response_mask=mask, result=SynAPOAdvantages(returns, returns, 1.0))
        metrics: dict = {}
        warmup_step(self, ctx, params_from_algorithm(self.config.algorithm), metrics)
        return metrics


def test_rule_ends_warmup_at_the_step_it_is_met(tmp_path):
    trainer = Trainer(str(tmp_path), value_warmup_target_ev=0.6, value_warmup_window=2)
    returns = torch.arange(8.0).reshape(2, 4)
    assert trainer.step(torch.zeros(2, 4), returns)[METRICS.warmup_done] == 0.0  # EV 0
    assert trainer.step(returns, returns)[METRICS.warmup_done] == 0.0  # window mean EV 0.5 < 0.6
    last = trainer.step(returns, returns)
    assert last[METRICS.warmup_done] == 1.0  # window mean 1.0
    assert trainer.config.trainer.critic_warmup == 3  # verl moves the actor once critic_warmup <= step
    assert last[METRICS.warmup_batches] == 2.0  # steps 1 and 2 trained only the critic


def test_fixed_count_without_a_rule(tmp_path):
    trainer = Trainer(str(tmp_path))
    returns = torch.arange(8.0).reshape(2, 4)
    steps = [trainer.step(returns, returns) for _ in range(12)]
    assert [m[METRICS.warmup_done] for m in steps] == [0.0] * 10 + [1.0] * 2
    assert [m[METRICS.warmup_batches] for m in steps] == [float(s) for s in range(1, 11)] + [10.0, 10.0]
    assert trainer.config.trainer.critic_warmup == 11


def test_state_is_saved_and_restored(tmp_path):
    synapo = {"value_warmup_patience": 3, "value_warmup_window": 1}
    trainer = Trainer(str(tmp_path), **synapo)
    for loss in (4.0, 3.0, 2.5):
        trainer.step(torch.zeros(1, 1) + loss**0.5 * 2**0.5, torch.zeros(1, 1))
    os.makedirs(tmp_path / "global_step_3")
    wrap_save_checkpoint(lambda self: None)(trainer)
    resumed = Trainer(str(tmp_path), **synapo)

    def load(self):
        self.global_steps = 3

    wrap_load_checkpoint(load)(resumed)
    assert resumed._synapo_warmup_rule.state_dict() == trainer._synapo_warmup_rule.state_dict()
    assert resumed.config.trainer.critic_warmup == trainer.config.trainer.critic_warmup

    os.remove(tmp_path / "global_step_3" / STATE_FILE)
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        wrap_load_checkpoint(load)(Trainer(str(tmp_path), **synapo))
