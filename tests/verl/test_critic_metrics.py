"""verl's half of the cross-host critic metric check: `synapo_value_loss` on the fixed batch of tests/critic_case.py,
laid out as verl's engine hands a micro-batch to its loss (no-padding layout, the row fields of
`synapo_ext.verl.fields`, the mini-batch's counts as non-tensor data), logs the numbers the core pins there, name by
name (the TRL half is tests/trl/test_critic_metrics.py; the design is in tests/critic_case.py's docstring).

One micro-batch: every metric is the batch's. Two micro-batches: verl adds the SUM-aggregated terms over them
(`Metric.aggregate`), which give the batch's again.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("verl")

from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.metric import Metric  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from synapo_ext.core import METRICS  # noqa: E402
from synapo_ext.verl.config import HF_CONFIG_KEY, params_to_json  # noqa: E402
from synapo_ext.verl.critic import synapo_value_loss  # noqa: E402
from synapo_ext.verl.engine import NUM_SCVL_SIDES, NUM_SEGMENTS  # noqa: E402
from synapo_ext.verl.fields import GLOBAL_RETURNS, GLOBAL_VALUES, START_MASK  # noqa: E402
from synapo_ext.verl.trainer import _pack_sides  # noqa: E402
from tests.critic_case import CLIPRANGE_VALUE, EXPECTED, LOSS, PARAMS, T, critic_batch  # noqa: E402

pytestmark = pytest.mark.verl

P = 2  # prompt tokens


def _config(loss_agg_mode: str = "token-mean") -> SimpleNamespace:
    """The parts of verl's `CriticConfig` the loss reads; the parameters travel as `prepare_config` sends them."""
    hf_config = SimpleNamespace(**{HF_CONFIG_KEY: params_to_json(PARAMS)})
    return SimpleNamespace(
        cliprange_value=CLIPRANGE_VALUE, loss_agg_mode=loss_agg_mode, model=SimpleNamespace(hf_config=hf_config)
    )


def _micro_batch(case: dict, rows: list[int], counts: dict) -> tuple[TensorDict, dict]:
    """Rows `rows` of the fixed batch as verl's critic loss receives them, and the model output for them."""
    idx = torch.tensor(rows)
    n = len(rows)
    mask = case["response_mask"][idx].long()
    attention = torch.cat([torch.ones(n, P, dtype=torch.long), mask], dim=1)
    sides = case["sides"]
    here = torch.isin(sides.rows, idx)
    position = torch.full((case["values"].shape[0],), -1)
    position[idx] = torch.arange(n)
    packed = _pack_sides(type(sides)(position[sides.rows[here]], *(x[here] for x in sides[1:])), n)
    td = TensorDict(
        {
            "prompts": torch.ones(n, P, dtype=torch.long),
            "responses": torch.ones(n, T, dtype=torch.long),
            "input_ids": torch.ones(n, P + T, dtype=torch.long),
            "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp_min(0),
            "response_mask": mask,
            "values": case["old_values"][idx],
            "returns": case["returns"][idx],
            GLOBAL_VALUES: case["old_global_values"][idx],
            GLOBAL_RETURNS: case["global_returns"][idx],
            START_MASK: case["start_mask"][idx],
            **packed,
        },
        batch_size=[n],
    )
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, dp_size=1, global_batch_size=case["values"].shape[0], **counts)

    def nested(current: torch.Tensor) -> torch.Tensor:
        """(n, T) current values of the response tokens -> verl's model output: one value per prompt + response
        token, the value of response token t read at position P - 1 + t."""
        per_row = []
        for r in range(n):
            length = int(mask[r].sum())
            out = torch.zeros(P + length)
            out[P - 1 : P - 1 + length] = current[r, :length]
            per_row.append(out)
        return torch.nested.as_nested_tensor(per_row, layout=torch.jagged)

    output = {"values": nested(case["values"][idx]), GLOBAL_VALUES: nested(case["global_values"][idx])}
    return td, output


def _counts(case: dict) -> dict:
    """The mini-batch's counts, as verl's engine sets them before the split (`batch_num_tokens`) and ours does
    (`SynAPOValueEngine.forward_backward_batch`: segment starts and SCVL pair sides)."""
    return {
        "batch_num_tokens": int(case["response_mask"].sum()),
        NUM_SEGMENTS: float(case["start_mask"].sum()),
        NUM_SCVL_SIDES: float(case["sides"].rows.numel()),
    }


def _loss(case: dict, rows: list[int]):
    td, output = _micro_batch(case, rows, _counts(case))
    return synapo_value_loss(_config(), output, td)


def _value(metric) -> float:
    return float(metric.aggregate()) if isinstance(metric, Metric) else float(metric)


def test_verl_critic_loss_logs_the_core_numbers():
    loss, metrics = _loss(critic_batch(), [0, 1, 2, 3])
    for name, value in EXPECTED.items():
        assert _value(metrics[name]) == pytest.approx(value, rel=1e-5), name
    assert float(loss) == pytest.approx(LOSS, rel=1e-5)
    assert not ({n for n in metrics if n.startswith("critic/synapo/")} - set(EXPECTED))  # no unchecked SynAPO term


def test_two_micro_batches_add_up_to_the_batch():
    case = critic_batch()
    parts = [_loss(case, rows) for rows in ([2, 0], [3, 1])]
    for name in (METRICS.vf_loss, METRICS.global_loss, METRICS.scvl_loss):
        merged = parts[0][1][name]
        merged.extend(parts[1][1][name])  # as verl merges the micro-batches' metrics
        assert merged.aggregate() == pytest.approx(EXPECTED[name], rel=1e-5), name
    assert sum(float(loss) for loss, _ in parts) == pytest.approx(LOSS, rel=1e-5)


def test_only_token_mean_for_a_synapo_critic():
    case = critic_batch()
    td, output = _micro_batch(case, [0, 1], _counts(case))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        synapo_value_loss(_config("seq-mean-token-sum"), output, td)
