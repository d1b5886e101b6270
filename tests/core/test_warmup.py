"""VAPO's value-pretraining stopping rule (synapo_ext.core.warmup): cap, target explained variance, plateau."""

from __future__ import annotations

import math

import pytest

from synapo_ext.core import SynAPOParams
from synapo_ext.core.warmup import ValueWarmupRule


def _run(rule, losses, evs):
    """Feed the batches until the rule stops; return the last decision."""
    for loss, ev in zip(losses, evs, strict=True):
        decision = rule.update(loss, ev)
        if decision.stop:
            return decision
    raise AssertionError("the rule never stopped")


def test_without_a_rule_it_is_the_fixed_count():
    rule = ValueWarmupRule(max_steps=4)
    decisions = [rule.update(1.0, 0.9) for _ in range(4)]  # a perfect critic still runs the whole count
    assert [d.stop for d in decisions] == [False, False, False, True]
    assert decisions[-1].reason == "cap" and decisions[-1].step == 4


def test_target_ev_waits_for_a_full_window_of_the_mean():
    rule = ValueWarmupRule(max_steps=100, target_ev=0.5, window=3)
    evs = [0.9, 0.0, 0.0, 0.4, 0.6, 0.8]  # window means from step 3: 0.3, 0.13, 0.33, 0.6
    decision = _run(rule, [1.0] * len(evs), evs)
    assert (decision.reason, decision.step) == ("target_ev", 6)
    assert decision.ev_mean == pytest.approx(0.6)


def test_plateau_after_patience_batches_without_improvement():
    rule = ValueWarmupRule(max_steps=100, patience=2, min_delta=0.1, window=2)
    losses = [4.0, 2.0, 1.0, 0.95, 0.95, 0.95, 0.95]  # window means from step 2: 3, 1.5, 0.975 (best), 0.95, 0.95
    decision = _run(rule, losses, [0.0] * len(losses))
    assert (decision.reason, decision.step) == ("plateau", 6)  # 0.95 is not 10 % below 0.975, twice
    assert decision.loss_mean == pytest.approx(0.95)


def test_cap_wins_when_neither_test_is_met():
    rule = ValueWarmupRule(max_steps=3, target_ev=0.99, patience=10, window=1)
    decision = _run(rule, [3.0, 2.0, 1.0], [0.1, 0.2, 0.3])
    assert (decision.reason, decision.step) == ("cap", 3)


def test_from_params_reads_the_core_fields():
    params = SynAPOParams(
        value_warmup_steps=7,
        value_warmup_target_ev=0.3,
        value_warmup_patience=4,
        value_warmup_min_delta=0.05,
        value_warmup_window=2,
    )
    rule = ValueWarmupRule.from_params(params)
    assert (rule.max_steps, rule.target_ev, rule.patience, rule.min_delta, rule.window) == (7, 0.3, 4, 0.05, 2)
    assert SynAPOParams().value_warmup_target_ev is None and SynAPOParams().value_warmup_patience is None


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"max_steps": -1}, "max_steps"),
        ({"max_steps": 3, "patience": 0}, "patience"),
        ({"max_steps": 3, "window": 0}, "window"),
        ({"max_steps": 3, "target_ev": math.nan}, "target_ev"),
        ({"max_steps": 3, "target_ev": 1.5}, "target_ev"),
        ({"max_steps": 3, "min_delta": -0.1}, "min_delta"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        ValueWarmupRule(**kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("value_warmup_target_ev", math.inf),
        ("value_warmup_target_ev", 2.0),
        ("value_warmup_patience", 0),
        ("value_warmup_min_delta", -0.5),
        ("value_warmup_window", 0),
    ],
)
def test_params_refuse_bad_warmup_fields(field, value):
    with pytest.raises(ValueError, match=field):
        SynAPOParams(**{field: value})


def test_non_finite_measurements_are_refused():
    rule = ValueWarmupRule(max_steps=3)
    with pytest.raises(ValueError, match="explained_variance"):
        rule.update(1.0, math.nan)


def test_an_undefined_explained_variance_counts_for_the_loss_and_the_cap_only():
    rule = ValueWarmupRule(max_steps=4, target_ev=0.5, window=2)
    first = rule.update(1.0, None)  # returns without variance
    assert not first.stop and math.isnan(first.ev_mean) and first.loss_mean == 1.0
    assert not rule.update(1.0, 0.9).stop  # one defined value: the window (2) is not full of them yet
    assert rule.update(1.0, 0.9).reason == "target_ev"
    capped = ValueWarmupRule(max_steps=2)
    assert [capped.update(1.0, None).reason for _ in range(2)] == [None, "cap"]
