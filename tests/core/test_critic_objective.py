"""`critic_objective`: the critic's whole loss and the metrics both hosts log (the core half of the cross-host check;
the design is in tests/critic_case.py's docstring)."""

from __future__ import annotations

import pytest
import torch

from synapo_ext.core import METRICS, SCVLSides, critic_objective, hvm_critic_loss, scvl_loss
from tests.critic_case import CLIPRANGE_VALUE, EXPECTED, LOSS, PARAMS, critic_batch


def _objective(case: dict, rows: torch.Tensor | None = None, **counts) -> object:
    """`critic_objective` on `rows` of the fixed batch (all rows if None), its sides re-indexed to them."""
    rows = torch.arange(case["values"].shape[0]) if rows is None else rows
    sides = case["sides"]
    position = torch.full((case["values"].shape[0],), -1)
    position[rows] = torch.arange(rows.numel())
    here = position[sides.rows] >= 0
    mine = SCVLSides(position[sides.rows[here]], *(x[here] for x in sides[1:]))
    return critic_objective(
        case["values"][rows],
        case["returns"][rows],
        case["response_mask"][rows],
        old_values=case["old_values"][rows],
        cliprange_value=CLIPRANGE_VALUE,
        global_values=case["global_values"][rows],
        global_returns=case["global_returns"][rows],
        start_mask=case["start_mask"][rows],
        old_global_values=case["old_global_values"][rows],
        scvl_sides=mine,
        scvl_weight=PARAMS.scvl_weight,
        scvl_margin=PARAMS.scvl_margin,
        **counts,
    )


def _reference(case: dict) -> dict[str, float]:
    """The formulas of docs/spec.md, token by token in float64 (an independent oracle for `EXPECTED`)."""
    c = {k: v.double() for k, v in case.items() if k != "sides"}
    out = {}
    for head, (v, old, g, m) in {
        "vf": (c["values"], c["old_values"], c["returns"], c["response_mask"]),
        "global": (c["global_values"], c["old_global_values"], c["global_returns"], c["start_mask"]),
    }.items():
        errors, clipped, n = 0.0, 0, 0
        for b in range(v.shape[0]):
            for t in range(v.shape[1]):
                if m[b, t]:
                    near = old[b, t] + (v[b, t] - old[b, t]).clamp(-CLIPRANGE_VALUE, CLIPRANGE_VALUE)
                    plain, clip = float((v[b, t] - g[b, t]) ** 2), float((near - g[b, t]) ** 2)
                    errors, clipped, n = errors + max(plain, clip), clipped + (clip > plain), n + 1
        out[head] = (0.5 * errors / n, clipped / n)
    sides, hinge = case["sides"], 0.0
    for row, d, partner, positive in zip(*sides, strict=True):
        own = float(c["values"][row, d + 1])
        gap = own - float(partner) if positive else float(partner) - own
        hinge += max(0.0, PARAMS.scvl_margin - gap)
    pairs = sides.rows.numel() / 2
    return {
        METRICS.vf_loss: out["vf"][0],
        METRICS.vf_clipfrac: out["vf"][1],
        METRICS.global_loss: out["global"][0],
        METRICS.global_clipfrac: out["global"][1],
        METRICS.scvl_loss: hinge / pairs / 2,  # both sides of a pair hold the hinge: mean over pairs
    }


def test_pinned_numbers_of_the_fixed_batch():
    out = _objective(critic_batch())
    assert set(out.metrics) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert float(out.metrics[name]) == pytest.approx(value, rel=1e-6), name
    assert float(out.loss) == pytest.approx(LOSS, rel=1e-6)
    # the loss is the sum of the logged terms, SCVL's counted over both sides (twice the logged hinge)
    m = out.metrics
    composed = m[METRICS.vf_loss] + m[METRICS.global_loss] + PARAMS.scvl_weight * 2 * m[METRICS.scvl_loss]
    assert float(out.loss) == pytest.approx(float(composed), rel=1e-6)


def test_pinned_numbers_match_the_formulas():
    reference = _reference(critic_batch())
    for name, value in EXPECTED.items():
        assert reference[name] == pytest.approx(value, rel=1e-5), name
    assert 0 < EXPECTED[METRICS.vf_clipfrac] < 1 and 0 < EXPECTED[METRICS.global_clipfrac] < 1  # clipping is tested


def test_scvl_metric_is_the_joint_hinge_at_rollout_time_values():
    """At the rollout-time values the split form's logged value is `scvl_loss` of the pairs (mean over pairs)."""
    case = critic_batch()
    case["values"] = case["old_values"].clone()
    sides = case["sides"]
    pairs = sides.rows.numel() // 2
    joint = scvl_loss(
        case["values"], sides.rows[:pairs], sides.rows[pairs:], sides.diverge_index[:pairs], margin=PARAMS.scvl_margin
    )
    assert float(_objective(case).metrics[METRICS.scvl_loss]) == pytest.approx(float(joint), rel=1e-6)


@pytest.mark.parametrize("split", [[[0, 1], [2, 3]], [[3], [0, 2], [1]], [[2, 0, 3, 1]]])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_micro_batches_with_the_batch_counts_sum_to_the_batch(split, scale):
    """With the whole batch's counts, the terms of any split sum to the whole batch's (times `scale`, verl's
    `dp_size`); this is how verl's SUM-aggregated metrics equal the batch's."""
    case = critic_batch()
    counts = {
        "num_tokens": float(case["response_mask"].sum()),
        "num_starts": float(case["start_mask"].sum()),
        "num_pairs": case["sides"].rows.numel() / 2,
        "scale": scale,
    }
    parts = [_objective(case, torch.tensor(rows), **counts) for rows in split]
    for name in (METRICS.vf_loss, METRICS.global_loss, METRICS.scvl_loss):
        total = sum(float(p.metrics[name]) for p in parts)
        assert total == pytest.approx(scale * EXPECTED[name], rel=1e-6), name
    assert sum(float(p.loss) for p in parts) == pytest.approx(scale * LOSS, rel=1e-6)


def test_gradient_of_micro_batches_equals_the_batch():
    case = critic_batch()
    counts = {"num_tokens": 21.0, "num_starts": 7.0, "num_pairs": 2.0}
    grads = []
    for split in ([[0, 1, 2, 3]], [[0, 3], [1, 2]]):
        for key in ("values", "global_values"):
            case[key] = case[key].detach().requires_grad_(True)
        sum(_objective(case, torch.tensor(rows), **counts).loss for rows in split).backward()
        grads.append(torch.cat([case["values"].grad.flatten(), case["global_values"].grad.flatten()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_hvm_critic_loss_is_the_objective_without_scvl():
    case = critic_batch()
    loss, parts = hvm_critic_loss(
        case["values"],
        case["global_values"],
        case["returns"],
        case["global_returns"],
        case["response_mask"],
        case["start_mask"],
        old_local_values=case["old_values"],
        old_global_values=case["old_global_values"],
        cliprange_value=CLIPRANGE_VALUE,
    )
    assert float(parts["local_loss"]) == pytest.approx(EXPECTED[METRICS.vf_loss], rel=1e-6)
    assert float(parts["global_loss"]) == pytest.approx(EXPECTED[METRICS.global_loss], rel=1e-6)
    assert float(loss) == pytest.approx(EXPECTED[METRICS.vf_loss] + EXPECTED[METRICS.global_loss], rel=1e-6)


def test_single_head_without_hvm_and_scvl():
    case = critic_batch()
    out = critic_objective(case["values"], case["returns"], case["response_mask"])
    assert set(out.metrics) == {METRICS.vf_loss, METRICS.vf_clipfrac}
    assert float(out.loss) == float(out.metrics[METRICS.vf_loss]) > 0


def test_no_pairs_gives_a_zero_scvl_term():
    case = critic_batch()
    empty = SCVLSides(*(x[:0] for x in case["sides"]))
    values = case["values"].requires_grad_(True)
    out = critic_objective(values, case["returns"], case["response_mask"], scvl_sides=empty, scvl_weight=1.0)
    assert float(out.metrics[METRICS.scvl_loss]) == 0.0
    out = critic_objective(
        values, case["returns"], case["response_mask"], scvl_sides=case["sides"], scvl_weight=1.0, num_pairs=0
    )
    assert float(out.metrics[METRICS.scvl_loss]) == 0.0 and torch.isfinite(out.loss)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_tokens": -1.0}, "num_tokens"),
        ({"num_starts": float("nan")}, "num_starts"),
        ({"num_pairs": True}, "num_pairs"),
        ({"scale": 0.0}, "scale"),
        ({"scvl_weight": -0.1}, "scvl_weight"),
        ({"global_values": torch.zeros(4, 6)}, "global_values"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    case = critic_batch()
    with pytest.raises((TypeError, ValueError), match=name):
        critic_objective(case["values"], case["returns"], case["response_mask"], **kwargs)
