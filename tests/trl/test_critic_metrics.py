"""TRL's half of the cross-host critic metric check: `update_critic` on the fixed batch of tests/critic_case.py logs
the numbers the core pins there, name by name (the verl half is tests/verl/test_critic_metrics.py; the design is in
tests/critic_case.py's docstring).

The critic is a stub whose outputs are the fixed batch's current values (row i's prompt token is i), the optimizer
has learning rate 0, and the whole batch is one mini-batch: the logged metrics are the batch's, unmoved.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("trl")

from synapo_ext.core import METRICS  # noqa: E402
from synapo_ext.trl.update import CriticBatch, update_critic  # noqa: E402
from tests.critic_case import CLIPRANGE_VALUE, EXPECTED, PARAMS, B, T, critic_batch  # noqa: E402

pytestmark = pytest.mark.trl


class FixedCritic(nn.Module):
    """logits[i] = the fixed batch's current (local, global) values of row `input_ids[i, 0]`, one step ahead (the
    value of completion token t is read at position t of prompt + completion, as `critic_values` does)."""

    def __init__(self, values: torch.Tensor, global_values: torch.Tensor) -> None:
        super().__init__()
        heads = torch.stack([values, global_values], dim=-1)  # (B, T, 2)
        self.table = nn.Parameter(torch.cat([heads, torch.zeros(B, 1, 2)], dim=1))  # (B, 1 + T, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_trl_critic_update_logs_the_core_numbers():
    case = critic_batch()
    critic = FixedCritic(case["values"], case["global_values"])
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.0)
    sides = case["sides"]
    batch = CriticBatch(
        input_ids=torch.cat([torch.arange(B)[:, None], torch.ones(B, T, dtype=torch.long)], dim=1),
        attention_mask=torch.ones(B, 1 + T, dtype=torch.long),
        response_mask=case["response_mask"],
        returns=case["returns"],
        old_values=torch.stack([case["old_values"], case["old_global_values"]], dim=-1),
        global_returns=case["global_returns"],
        start_mask=case["start_mask"],
        sides=sides,
        num_pairs=sides.rows.numel() / 2,  # one process: its own P
    )
    metrics = update_critic(
        critic, optimizer, None, batch, PARAMS, epochs=1, mini_batch_size=B, cliprange_value=CLIPRANGE_VALUE,
        max_grad_norm=None, generator=torch.Generator().manual_seed(0), backend="single",
    )  # fmt: skip
    assert metrics["critic/updates"] == 1.0
    for name, value in EXPECTED.items():
        assert metrics[name] == pytest.approx(value, rel=1e-6), name
    assert not ({n for n in metrics if n.startswith("critic/synapo/")} - set(EXPECTED))  # no unchecked SynAPO term
    assert METRICS.scvl_loss in EXPECTED
