"""The value warm-up in the trainer: its stopping rule, its own progress lines and log entries."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("trl")

from synapo_ext.core import METRICS  # noqa: E402

pytestmark = pytest.mark.trl


def test_warmup_metrics_stay_out_of_the_first_step(make_trainer, rollout_inputs, caplog):
    trainer = make_trainer("vapo", value_warmup_steps=2)
    trainer.model.train()
    with caplog.at_level(logging.WARNING, logger="synapo_ext.trl.warmup"):
        trainer._generate_and_score_completions(rollout_inputs(trainer))
    # the step's own rollout only: one value each (the warm-up's two batches went to their own log entries)
    assert len(trainer._metrics["train"][METRICS.vf_loss]) == 1
    assert len(trainer._metrics["train"]["reward"]) == 1
    warmup = [entry for entry in trainer.state.log_history if "warmup/step" in entry]
    assert [entry["warmup/step"] for entry in warmup] == [1.0, 2.0]
    for entry in warmup:
        assert {f"warmup/{METRICS.vf_loss}", f"warmup/{METRICS.explained_variance}", "warmup/reward"} <= set(entry)
    # warmup_done is a 0/1 flag and warmup_batches a count, as on verl (tests/verl/test_warmup.py)
    assert [entry[f"warmup/{METRICS.warmup_done}"] for entry in warmup] == [0.0, 0.0]
    assert [entry[f"warmup/{METRICS.warmup_batches}"] for entry in warmup] == [1.0, 2.0]
    assert trainer._metrics["train"][METRICS.warmup_done] == [1.0]
    assert trainer._metrics["train"][METRICS.warmup_batches] == [2.0]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    progress = [line for line in lines if line.startswith("SynAPO value warm-up ") and "explained variance" in line]
    assert [line.split()[3] for line in progress] == ["1/2", "2/2"], lines
    assert any("done after 2 rollout batches (reached value_warmup_steps)" in line for line in lines), lines
    assert trainer._warmup_stop_reason == "cap"
    # a strongly negative explained variance is explained once, where it is printed
    trainer._ev_explained = False
    assert "nearly constant" in trainer._explain_ev_once(-177.5)
    assert trainer._explain_ev_once(-177.5) == "" and trainer._explain_ev_once(0.2) == ""


@pytest.mark.parametrize(
    ("rule", "done", "reason"),
    [
        ({"value_warmup_target_ev": -1e9, "value_warmup_window": 1}, 1, "target_ev"),  # any critic meets it
        ({"value_warmup_patience": 1, "value_warmup_window": 1, "value_warmup_min_delta": 1.0}, 2, "plateau"),
    ],
)
def test_stopping_rule_ends_the_warmup_before_the_cap(make_trainer, rule, done, reason):
    trainer = make_trainer("vapo", value_warmup_steps=6, max_steps=1, **rule)
    trainer.train()
    assert (trainer._warmup_done, trainer._warmup_stop_reason) == (done, reason)
    assert trainer._critic_updates == done + 1
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 1 and not any(key.startswith("warmup/") for key in steps[0])
