"""The value warm-up in the trainer: its stopping rule, its own progress lines and log entries."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("trl")

from synapo_ext.core import METRICS  # noqa: E402
from synapo_ext.trl.update import HELDOUT_VF_LOSS  # noqa: E402

pytestmark = pytest.mark.trl


def test_warmup_metrics_stay_out_of_the_first_step(make_trainer, rollout_inputs, caplog):
    trainer = make_trainer("vapo", value_warmup_steps=2)
    trainer.model.train()
    with caplog.at_level(logging.INFO, logger="synapo_ext.trl.warmup"):
        trainer._generate_and_score_completions(rollout_inputs(trainer))
    # the step's own rollout only: one value each (the warm-up's two batches went to their own log entries)
    assert len(trainer._metrics["train"][METRICS.vf_loss]) == 1
    assert len(trainer._metrics["train"]["reward"]) == 1
    warmup = [entry for entry in trainer.state.log_history if "warmup/step" in entry]
    assert [entry["warmup/step"] for entry in warmup] == [1.0, 2.0]
    # on the global-step axis: batch k at step k (a curve in TensorBoard / W&B), the step back at 0 afterwards
    assert [entry["step"] for entry in warmup] == [1, 2] and trainer.state.global_step == 0
    for entry in warmup:
        assert {f"warmup/{METRICS.vf_loss}", f"warmup/{METRICS.explained_variance}", "warmup/reward"} <= set(entry)
    # warmup_done is a 0/1 flag and warmup_batches a count, as on verl (tests/verl/test_warmup.py)
    assert [entry[f"warmup/{METRICS.warmup_done}"] for entry in warmup] == [0.0, 0.0]
    assert [entry[f"warmup/{METRICS.warmup_batches}"] for entry in warmup] == [1.0, 2.0]
    assert trainer._metrics["train"][METRICS.warmup_done] == [1.0]
    assert trainer._metrics["train"][METRICS.warmup_batches] == [2.0]
    # progress: INFO through accelerate's logger, as TRL's trainers log ("[RANK 0] " before each line)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    louder = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "warm-up" in r.getMessage()]
    assert not [line for line in louder if "<= 0" not in line]  # only the warning of a critic that explains nothing
    progress = [line for line in lines if line.startswith("[RANK 0] SynAPO value warm-up ") and "explained" in line]
    assert [line.split()[5] for line in progress] == ["1/2", "2/2"], lines
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


def test_warmup_steps_reach_the_reporters_as_a_curve(make_trainer):
    """What TensorBoard / W&B get: every `on_log` call's global step; the warm-up's are 1..N, training's 1..max."""
    from transformers import TrainerCallback

    seen = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append((state.global_step, "warmup" if any(k.startswith("warmup/") for k in logs) else "train"))

    trainer = make_trainer("vapo", value_warmup_steps=3, max_steps=2)
    trainer.add_callback(Record())
    trainer.train()
    assert [s for s, kind in seen if kind == "warmup"] == [1, 2, 3]
    assert [s for s, kind in seen if kind == "train"][:2] == [1, 2]


@pytest.mark.parametrize(("mini_batch", "heldout_logged"), [(None, False), (4, True)])
def test_one_name_per_quantity(make_trainer, rollout_inputs, mini_batch, heldout_logged):
    """One critic step: its `critic/vf_loss` is the held-out loss, logged once; two steps: two numbers, two names."""
    trainer = make_trainer("vapo", critic_mini_batch_size=mini_batch)
    trainer.model.train()
    trainer._generate_and_score_completions(rollout_inputs(trainer))
    logged = trainer._metrics["train"]
    assert (HELDOUT_VF_LOSS in logged) == heldout_logged and METRICS.vf_loss in logged


def test_undefined_explained_variance_is_left_out_and_said(make_trainer, rollout_inputs, caplog):
    """All-zero rewards and a critic at 0: the returns have no variance, the explained variance is undefined (the
    formula would say 1.0)."""

    def zero(completions, **kwargs):
        return [0.0] * len(completions)

    trainer = make_trainer("vapo", reward_funcs=[zero], value_warmup_steps=1)
    trainer.model.train()
    with caplog.at_level(logging.INFO, logger="synapo_ext.trl.warmup"):
        trainer._generate_and_score_completions(rollout_inputs(trainer))
    (warmup,) = [entry for entry in trainer.state.log_history if "warmup/step" in entry]
    assert f"warmup/{METRICS.explained_variance}" not in warmup
    assert "warmup/explained_variance_window_mean" not in warmup
    assert f"warmup/{METRICS.explained_variance_outcome}" not in warmup
    assert any("of the outcome undefined (every row's return is the same)" in r.getMessage() for r in caplog.records)
    assert METRICS.explained_variance not in trainer._metrics["train"]
    assert METRICS.explained_variance_outcome not in trainer._metrics["train"]


def test_log_level_info_shows_the_progress_lines(make_trainer):
    """`log_level="info"`, as a TRL user passes `--log_level info`: synapo_ext's loggers follow it."""
    package = logging.getLogger("synapo_ext")
    saved = package.level, package.propagate, list(package.handlers)
    try:
        make_trainer("vapo", log_level="info")
        assert logging.getLogger("synapo_ext.trl.warmup").isEnabledFor(logging.INFO)
    finally:
        package.setLevel(saved[0])
        package.propagate = saved[1]
        package.handlers[:] = saved[2]


@pytest.mark.parametrize("preset", ["ppo", "vapo", "synapo"])
def test_explained_variance_of_the_outcome_is_logged_for_every_preset(
    make_trainer, rollout_inputs, critic_batches, preset
):
    """The value (head 0) against the row's Monte-Carlo return (gamma 1: its score on every valid token)."""
    from synapo_ext.core import explained_variance

    trainer = make_trainer(preset)
    trainer.model.train()
    trainer._generate_and_score_completions(rollout_inputs(trainer))
    batch = critic_batches[-1]
    scores = (trainer._rewards_per_func * trainer.reward_weights).nansum(dim=1)
    outcome = scores[:, None] * batch.response_mask
    expected = float(explained_variance(batch.old_values[..., 0], outcome, batch.response_mask))
    logged = trainer._metrics["train"][METRICS.explained_variance_outcome]
    assert logged == [pytest.approx(expected, abs=1e-6)]
    if preset == "synapo":  # HVM: the local head's own target is bootstrapped, so the two figures differ
        assert trainer._metrics["train"][METRICS.explained_variance] != pytest.approx(logged)


def test_warmup_rule_judges_the_explained_variance_of_the_outcome(make_trainer, monkeypatch):
    from synapo_ext.core import warmup as core_warmup

    seen = []
    real_update = core_warmup.ValueWarmupRule.update

    def spy(self, loss, explained_variance):
        seen.append(explained_variance)
        return real_update(self, loss, explained_variance)

    monkeypatch.setattr(core_warmup.ValueWarmupRule, "update", spy)
    trainer = make_trainer("synapo", value_warmup_steps=2, max_steps=1)
    trainer.train()
    warmup = [entry for entry in trainer.state.log_history if "warmup/step" in entry]
    assert seen == [entry[f"warmup/{METRICS.explained_variance_outcome}"] for entry in warmup]
    assert seen != [entry[f"warmup/{METRICS.explained_variance}"] for entry in warmup]


@pytest.mark.parametrize(("ev_mean", "loud"), [(-0.02, True), (0.0, True), (0.3, False)])
def test_a_warmup_stop_with_no_explained_variance_says_so(make_trainer, caplog, ev_mean, loud):
    from synapo_ext.core.warmup import WarmupDecision

    trainer = make_trainer("vapo", value_warmup_steps=6, value_warmup_patience=1)
    trainer._warmup_done = 3
    logs = {HELDOUT_VF_LOSS: 0.1, METRICS.vf_loss: 0.1, METRICS.explained_variance: ev_mean}
    logs[METRICS.explained_variance_outcome] = ev_mean
    decision = WarmupDecision(step=3, stop=True, reason="plateau", ev_mean=ev_mean, loss_mean=0.1)
    with caplog.at_level(logging.WARNING, logger="synapo_ext.trl.warmup"):
        trainer._warmup_line(logs, decision, "plateau")
    poor = [r.getMessage() for r in caplog.records if "<= 0" in r.getMessage()]
    assert len(poor) == (1 if loud else 0), [r.getMessage() for r in caplog.records]
    if loud:
        assert "value_warmup_patience" in poor[0] and "value_warmup_steps" in poor[0] and f"{ev_mean:.3f}" in poor[0]
