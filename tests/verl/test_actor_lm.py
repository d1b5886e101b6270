"""VAPO's positive-example LM loss around verl's `ppo_loss`: added only for rows carrying `synapo_lm_weight`."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")

from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils import losses  # noqa: E402

from synapo_ext.verl.actor import LM_TOKENS, LM_WEIGHT, wrap_forward_backward_batch, wrap_ppo_loss  # noqa: E402

pytestmark = pytest.mark.verl


def micro_batch(weight: torch.Tensor | None):
    B, P, R = 3, 2, 4
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), response_mask], dim=1)
    fields = {"prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.ones(B, R, dtype=torch.long),
              "attention_mask": attention, "response_mask": response_mask}  # fmt: skip
    if weight is not None:
        fields[LM_WEIGHT] = weight
    td = TensorDict(fields, batch_size=[B])
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=int(response_mask.sum()))
    if weight is not None:  # what the engine's count gives (tested below): the correct rows' response tokens
        tu.assign_non_tensor(td, **{LM_TOKENS: float(response_mask[weight > 0].sum())})
    log_probs = -torch.arange(1.0, int(attention.sum()) + 1) / 10  # packed (total_nnz,), prompt + response
    return td, log_probs, response_mask


def stock(config, model_output, data, dp_group=None):
    return torch.tensor(0.5), {"actor/pg_loss": 0.5}


def test_positive_lm_term_on_weighted_rows_only():
    weight = torch.tensor([0.1, 0.0, 0.1])  # rows 0 and 2 are correct, positive_lm_coef 0.1
    data, log_probs, mask = micro_batch(weight)
    loss, metrics = wrap_ppo_loss(stock)(None, {"log_probs": log_probs}, data)
    from verl.workers.utils.padding import no_padding_2_padding

    lp = no_padding_2_padding(log_probs, data)
    expected = 0.5 - (lp * weight[:, None] * mask).sum() / mask[weight > 0].sum()  # VAPO: mean over correct tokens
    torch.testing.assert_close(loss, expected)
    assert "actor/synapo/positive_lm_loss" in metrics


def test_no_weight_field_is_verl_unchanged():
    data, log_probs, _ = micro_batch(None)
    loss, metrics = wrap_ppo_loss(stock)(None, {"log_probs": log_probs}, data)
    assert loss == torch.tensor(0.5) and metrics == {"actor/pg_loss": 0.5}


def test_installed_on_verl_losses():
    assert getattr(losses.ppo_loss, "__synapo_wraps__", None) is not None


def test_missing_token_count_fails_loudly():
    data, log_probs, _ = micro_batch(torch.tensor([0.1, 0.0, 0.1]))
    del data[LM_TOKENS]
    with pytest.raises(RuntimeError, match="did not count"):
        wrap_ppo_loss(stock)(None, {"log_probs": log_probs}, data)


def test_engine_counts_correct_tokens_of_the_mini_batch(monkeypatch):
    """The count before verl's micro-batch split: correct rows' response tokens, nested mask as TransferQueue gives."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op=None, group=None: tensor)
    monkeypatch.setattr("verl.utils.device.get_device_id", lambda: "cpu")
    lengths = [4, 2, 3, 1]
    mask = torch.nested.as_nested_tensor([torch.ones(n) for n in lengths], layout=torch.jagged)
    weights = torch.nested.as_nested_tensor([torch.tensor([w]) for w in (0.1, 0.0, 0.1, 0.1)], layout=torch.jagged)
    data = TensorDict({"response_mask": mask, LM_WEIGHT: weights}, batch_size=[4])
    seen = {}

    class Engine:
        def get_data_parallel_group(self):
            return None

    def original(self, data, loss_function, forward_only=False):
        seen["tokens"] = tu.get_non_tensor_data(data, LM_TOKENS, None)

    wrap_forward_backward_batch(original)(Engine(), data, None)
    assert seen["tokens"] == 4 + 3 + 1
