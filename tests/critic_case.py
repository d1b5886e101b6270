"""One fixed critic batch and the critic metrics it must give, shared by the core test and both hosts' tests.

The cross-host metric check (issue 22): TRL and verl cannot share one environment, so no test can run both hosts'
critic-loss paths side by side, and a test that writes a file another environment reads depends on the CI's
order. Instead every environment builds this same batch (arithmetic only: no random generator, no file) and checks
its own path against the same numbers:

- tests/core/test_critic_objective.py: `critic_objective` on the whole batch gives `EXPECTED` (the pinned,
  composed numbers), and any split into micro-batches with the whole batch's counts sums to them;
- tests/trl/test_critic_metrics.py: TRL's `update_critic` (one mini-batch, learning rate 0) logs `EXPECTED`;
- tests/verl/test_critic_metrics.py: verl's `synapo_value_loss` on the batch as verl's engine hands it over (one
  micro-batch, then two whose SUM-aggregated metrics verl adds up) logs `EXPECTED`.

So a metric name in `EXPECTED` that meant different quantities on the two hosts (a hinge counted over both sides on
one host, over pairs on the other) fails one of the host tests.

Shapes: B = 4 rows (two groups of two: rows 0, 1 and rows 2, 3), T = 6 tokens, lengths 6, 4, 5, 6.
"""

from __future__ import annotations

import torch

from synapo_ext.core import METRICS, SCVLSides, params_from_preset

B, T = 4, 6
LENGTHS = (6, 4, 5, 6)
CLIPRANGE_VALUE = 0.2
PARAMS = params_from_preset("synapo", scvl_weight=0.3, scvl_margin=0.5)

# The metrics the fixed batch gives (float32 arithmetic, compared with rel=1e-5); written from `critic_objective`
# when this case was made and pinned since: a change of them is a change of the critic's math.
EXPECTED = {
    METRICS.vf_loss: 0.3528654873371124,
    METRICS.vf_clipfrac: 0.2857142984867096,  # 6 of 21 tokens
    METRICS.global_loss: 0.12364502251148224,
    METRICS.global_clipfrac: 0.1428571492433548,  # 1 of 7 segment starts
    METRICS.scvl_loss: 0.3846518397331238,
}
LOSS = 0.7073016166687012  # vf + global + scvl_weight * 2 * scvl_loss


def _wave(phase: float, scale: float) -> torch.Tensor:
    """A fixed (B, T) float32 pattern: scale * sin(0.7 * (t + 1.3 b) + phase)."""
    b = torch.arange(B, dtype=torch.float64)[:, None]
    t = torch.arange(T, dtype=torch.float64)[None, :]
    return (scale * torch.sin(0.7 * (t + 1.3 * b) + phase)).float()


def critic_batch() -> dict[str, torch.Tensor]:
    """The fixed batch: masks, rollout-time ("old_") and current values of both heads, targets, SCVL sides.

    Returns a dict of (B, T) float32 tensors (`response_mask` and `start_mask` float 0/1) and `sides`
    (`SCVLSides`, rows indexing the batch: pairs (0, 1) and (3, 2), the positive row first).
    """
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).float()
    start = torch.zeros(B, T)
    start[:, 0] = 1.0
    start[0, 3] = start[2, 2] = start[3, 4] = 1.0  # segment starts: 2, 1, 2, 2 segments
    old_values = _wave(0.0, 0.6)
    old_global = _wave(0.4, 0.5)
    pos_rows, neg_rows, diverge = torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([1, 2])
    sides = SCVLSides(
        rows=torch.cat([pos_rows, neg_rows]),
        diverge_index=torch.cat([diverge, diverge]),
        partner_values=torch.cat([old_values[neg_rows, diverge + 1], old_values[pos_rows, diverge + 1]]),
        is_positive=torch.tensor([True, True, False, False]),
    )
    return {
        "response_mask": mask,
        "start_mask": start * mask,
        "old_values": old_values,
        "values": old_values + _wave(1.1, 0.35),  # some moves past the clip range 0.2, some inside it
        "returns": _wave(2.0, 0.8) + 0.5,
        "old_global_values": old_global,
        "global_values": old_global + _wave(2.5, 0.3),
        "global_returns": _wave(0.9, 0.7) + 0.4,
        "sides": sides,
    }
