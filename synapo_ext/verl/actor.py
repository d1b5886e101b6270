"""VAPO's positive-example LM loss on verl's actor: `ppo_loss` + mu * NLL on the tokens of correct responses.

verl's policy-loss registry (`register_policy_loss`) gives a loss function no way to know which rows are correct,
so the term is added around verl's `ppo_loss` instead. The rows carry their weight themselves: `synapo_lm_weight`
(mu on correct rows, 0 elsewhere; `synapo_ext.core.positive_lm_weights`, written at advantage time). Without that
field (any run that is not `synapo`, or `positive_lm_coef=0`) this is verl's `ppo_loss` unchanged.

    lm_loss = -sum_{b,t} w_b * log pi(y_bt) * m_bt / N     (`synapo_ext.core.positive_lm_loss`)

N is the number of response tokens of the correct rows in the whole mini-batch (all dp ranks), counted by
`wrap_forward_backward_batch` before verl splits the mini-batch into micro-batches, so the micro-batch terms add up
to VAPO's mean NLL over correct responses, as on TRL.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from synapo_ext.core import METRICS, positive_lm_loss

from .fields import LM_WEIGHT, dense_rows

__all__ = ["LM_TOKENS", "LM_WEIGHT", "wrap_forward_backward_batch", "wrap_ppo_loss"]

LM_TOKENS = "synapo_lm_tokens"


def _row_tokens(mask: torch.Tensor) -> torch.Tensor:
    """Valid tokens per row of a (bs, T) mask, nested (jagged) or dense: (bs,)."""
    if not mask.is_nested:
        return mask.float().sum(dim=-1)
    lengths = mask.offsets().diff()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    return torch.zeros(lengths.numel(), device=mask.device).index_add_(0, rows, mask.values().float())


def wrap_forward_backward_batch(original: Any) -> Any:
    """verl's `FSDPEngine.forward_backward_batch`, counting N (module docstring) when the rows carry LM weights."""

    @functools.wraps(original)
    def forward_backward_batch(self, data, loss_function, forward_only=False):
        if not forward_only and LM_WEIGHT in data.keys():
            from verl.utils import tensordict_utils as tu
            from verl.utils.device import get_device_id

            correct = dense_rows(data[LM_WEIGHT]).reshape(-1) > 0
            tokens = (_row_tokens(data["response_mask"]).to(correct.device) * correct).sum().to(get_device_id())
            torch.distributed.all_reduce(
                tokens, op=torch.distributed.ReduceOp.SUM, group=self.get_data_parallel_group()
            )
            tu.assign_non_tensor(data, **{LM_TOKENS: float(tokens)})
        return original(self, data, loss_function, forward_only=forward_only)

    forward_backward_batch.__synapo_wraps__ = original
    return forward_backward_batch


def wrap_ppo_loss(original: Any) -> Any:
    """verl's actor loss callable with the positive-example LM term added when the rows carry `synapo_lm_weight`."""

    @functools.wraps(original)
    def ppo_loss(config, model_output, data, dp_group=None):
        loss, metrics = original(config, model_output, data, dp_group)
        if LM_WEIGHT not in data.keys():
            return loss, metrics
        from verl.utils import tensordict_utils as tu
        from verl.utils.metric import AggregationType, Metric
        from verl.workers.utils.padding import no_padding_2_padding

        tokens = tu.get_non_tensor_data(data, LM_TOKENS, None)
        if tokens is None:
            raise RuntimeError(
                "synapo: the actor's mini-batch carries positive-LM weights but its engine did not count the "
                "correct responses' tokens (synapo_ext.patches.verl patches FSDPEngine.forward_backward_batch only)"
            )
        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        mask = data.select("response_mask").to_padded_tensor()["response_mask"].to(log_prob.device)
        weight = dense_rows(data[LM_WEIGHT]).reshape(-1)
        # FSDP averages gradients over the dp ranks: each rank's share of N is N / dp_size (as verl's agg_loss)
        lm_loss = positive_lm_loss(log_prob, mask, weight, num_tokens=max(tokens, 1.0) / data["dp_size"])
        metrics[METRICS.positive_lm_loss] = Metric(value=lm_loss, aggregation=AggregationType.SUM)
        return loss + lm_loss, metrics

    ppo_loss.__synapo_wraps__ = original
    return ppo_loss
