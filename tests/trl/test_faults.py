"""Faults a training run survives: batches with nothing to learn from, rows without a score."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from synapo_ext.core import METRICS  # noqa: E402
from synapo_ext.trl.stage import LM_WEIGHT  # noqa: E402

pytestmark = pytest.mark.trl


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
