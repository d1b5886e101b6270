"""Faults a training run survives: batches with nothing to learn from, rows without a score."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("trl")

from synapo_ext.core import METRICS, PRESETS  # noqa: E402
from synapo_ext.trl.stage import LM_WEIGHT  # noqa: E402

from .tiny import first_char_reward  # noqa: E402

pytestmark = pytest.mark.trl

REWARDS_NONFINITE = "synapo/rewards_nonfinite"  # the stage's count of +-inf rewards


def _logged(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def test_all_completions_truncated_and_masked_is_skipped_and_counted(make_trainer, tokenizer):
    # EOS suppressed and 2 tokens: every completion is truncated, so mask_truncated_completions empties every row
    trainer = make_trainer(
        "synapo",
        mask_truncated_completions=True,
        max_completion_length=2,
        generation_kwargs={"suppress_tokens": [tokenizer.eos_token_id]},
        value_warmup_steps=2,
    )
    critic_before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    trainer.train()  # used to raise RuntimeError: aminmax() on an empty batch
    assert _logged(trainer, METRICS.batches_skipped) == [1.0, 1.0]
    assert _logged(trainer, METRICS.rows_empty) == [8.0, 8.0]
    assert _logged(trainer, f"warmup/{METRICS.batches_skipped}") == [1.0, 1.0]  # warm-up batches skipped, capped at 2
    assert trainer._critic_updates == 0
    assert all(torch.equal(v, critic_before[k]) for k, v in trainer.critic.state_dict().items())
    assert torch.equal(
        trainer._buffered_inputs[0]["advantages"], torch.zeros_like(trainer._buffered_inputs[0]["advantages"])
    )


@pytest.mark.parametrize("missing", [None, math.nan])
def test_rows_without_a_score_are_left_out_and_counted(make_trainer, rollout_inputs, critic_batches, missing):
    def reward(completions, **kwargs):  # rows 0, 3, 6: no score; the others: 1 if the completion starts with a digit
        return [missing if i % 3 == 0 else float(c[:1].isdigit()) for i, c in enumerate(completions)]

    trainer = make_trainer("synapo", reward_funcs=[reward])
    trainer.model.train()
    output = trainer._generate_and_score_completions(rollout_inputs(trainer))
    B = output["completion_ids"].size(0)
    unscored = torch.arange(B) % 3 == 0
    mask = output["completion_mask"].bool()
    assert (output["advantages"][unscored] == 0).all()  # no advantage
    assert (output[LM_WEIGHT][unscored] == 0).all()  # no positive-LM loss
    batch = critic_batches[-1]
    assert (batch.response_mask[unscored] == 0).all()  # no critic target
    assert batch.sides.rows.numel() > 0  # pairs exist (seeded rollout) ...
    assert not torch.isin(batch.sides.rows, unscored.nonzero().squeeze(1)).any()  # ... but none with these rows
    scored_tokens = mask & ~unscored.unsqueeze(1)
    assert output["advantages"][scored_tokens].mean().abs() < 1e-5  # whitened over the scored rows only
    assert trainer._metrics["train"][METRICS.rows_unscored] == [float(unscored.sum())]
    assert trainer._metrics["train"][METRICS.batches_skipped] == [0.0]


def _with_mask(output, mask):
    """A copy of TRL's rollout `output` whose completion mask is `mask` (B, T) (0/1)."""
    copy = dict(output)
    copy["completion_mask"] = mask.to(output["completion_mask"].dtype)
    return copy


@pytest.fixture
def rolled_out(make_trainer, rollout_inputs):
    """`rolled_out(preset)` -> (trainer in train mode, one real rollout `output` of it, TRL's raw rewards)."""

    def make(preset):
        trainer = make_trainer(preset)
        trainer.model.train()
        output = trainer._rollout(rollout_inputs(trainer))
        return trainer, output, trainer._rewards_per_func

    return make


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_batch_with_one_learnable_token_is_skipped_and_counted(rolled_out, preset):
    # e.g. mask_truncated_completions with short completions: one row keeps a 1-token completion
    trainer, output, _ = rolled_out(preset)
    mask = torch.zeros_like(output["completion_mask"])
    mask[3, 0] = 1
    critic_before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    means, totals = trainer._synapo_stage(_with_mask(output, mask), "train")  # used to raise: whitening needs 2
    assert totals[METRICS.batches_skipped] == 1.0
    assert totals[METRICS.rows_empty] == float(mask.size(0) - 1)
    assert trainer._critic_updates == 0
    assert all(torch.equal(v, critic_before[k]) for k, v in trainer.critic.state_dict().items())


def test_a_batch_with_one_learnable_token_trains_when_whitening_is_off(rolled_out):
    trainer, output, rewards_per_func = rolled_out("vapo")
    trainer.synapo = dataclasses.replace(trainer.synapo, whiten_advantages=False)
    row = int(rewards_per_func[:, 0].nonzero()[0, 0])  # a row with a nonzero score
    mask = torch.zeros_like(output["completion_mask"])
    mask[row, 0] = 1
    copy = _with_mask(output, mask)
    means, totals = trainer._synapo_stage(copy, "train")
    assert totals[METRICS.batches_skipped] == 0.0
    assert trainer._critic_updates == 1
    # the critic's head starts at zero, so the one token's advantage is its score
    assert copy["advantages"][row, 0] == rewards_per_func[row, 0]
    assert (copy["advantages"].count_nonzero() == 1) and torch.isfinite(copy["advantages"]).all()


_PRESET_TRAINERS: dict = {}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_masks_with_0_1_or_2_valid_tokens_never_crash_the_stage(rolled_out, data):
    """Property: whatever the preset and wherever 0, 1 or 2 valid tokens fall, the TRL stage returns finite
    advantages and counts a skipped batch exactly when nothing can be learnt from it."""
    preset = data.draw(st.sampled_from(sorted(PRESETS)), label="preset")
    if preset not in _PRESET_TRAINERS:
        _PRESET_TRAINERS[preset] = rolled_out(preset)
    trainer, output, rewards_per_func = _PRESET_TRAINERS[preset]
    B, T = output["completion_mask"].shape
    n = data.draw(st.integers(0, 2), label="valid tokens")
    cells = data.draw(st.lists(st.integers(0, B * T - 1), min_size=n, max_size=n, unique=True), label="cells")
    mask = torch.zeros(B * T, dtype=output["completion_mask"].dtype)
    mask[cells] = 1
    mask = mask.view(B, T)
    mode = data.draw(st.sampled_from(["train", "eval"]), label="mode")
    trainer._rewards_per_func = rewards_per_func
    copy = _with_mask(output, mask)
    updates = trainer._critic_updates
    means, totals = trainer._synapo_stage(copy, mode)
    assert copy["advantages"].shape == (B, T) and torch.isfinite(copy["advantages"]).all()
    assert (copy["advantages"][mask == 0] == 0).all()
    assert totals[METRICS.batches_skipped] == float(n < 2)
    assert trainer._critic_updates == updates + (mode == "train" and n == 2)
    assert all(math.isfinite(v) for v in {**means, **totals}.values())


def test_infinite_rewards_are_treated_as_missing_counted_and_named(make_trainer, caplog):
    def spiky(completions, **kwargs):  # rows 0 and 5 of every batch: +inf and -inf
        return [
            math.inf if i == 0 else -math.inf if i == 5 else float(c[:1].isdigit()) for i, c in enumerate(completions)
        ]

    trainer = make_trainer("synapo", reward_funcs=[spiky], value_warmup_steps=1, max_steps=1)
    with caplog.at_level("WARNING", logger="synapo_ext.trl.trainer"):
        trainer.train()  # used to raise: `rewards` holds 2 NaN/inf entries
    warnings = [r.getMessage() for r in caplog.records if "infinite" in r.getMessage()]
    assert len(warnings) == 1 and "'spiky' returned 2 infinite" in warnings[0]  # once per reward function
    assert _logged(trainer, f"warmup/{REWARDS_NONFINITE}") == [2.0]
    assert _logged(trainer, REWARDS_NONFINITE) == [2.0]
    assert _logged(trainer, METRICS.rows_unscored) == [2.0]  # the two rows are left out, as with None
    assert all(math.isfinite(v) for entry in trainer.state.log_history for v in entry.values())


def test_an_infinite_reward_beside_a_finite_one_keeps_the_row_scored(make_trainer, rollout_inputs):
    def inf_first(completions, **kwargs):
        return [math.inf] * len(completions)

    trainer = make_trainer("vapo", reward_funcs=[inf_first, first_char_reward])
    trainer.model.train()
    trainer._generate_and_score_completions(rollout_inputs(trainer))
    assert trainer._rewards_per_func[:, 0].isnan().all()
    assert trainer._metrics["train"][METRICS.rows_unscored] == [0.0]


@pytest.mark.parametrize("value", [1e30, -1e30])
def test_a_reward_too_large_for_the_critic_is_an_error_naming_the_function(make_trainer, value):
    def huge(completions, **kwargs):
        return [value if i == 2 else 0.0 for i in range(len(completions))]

    trainer = make_trainer("synapo", reward_funcs=[first_char_reward, huge], value_warmup_steps=1)
    # used to fail in the warm-up with "`loss` must be a finite number, got inf"
    with pytest.raises(ValueError, match=rf"reward function 'huge' returned {re.escape(f'{value:g}')}.*float32"):
        trainer.train()
