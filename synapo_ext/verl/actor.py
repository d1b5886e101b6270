"""VAPO's positive-example LM loss on verl's actor: `ppo_loss` + NLL on the tokens of correct responses.

verl's policy-loss registry (`register_policy_loss`) gives a loss function no way to know which rows are correct,
so the term is added around verl's `ppo_loss` instead. The rows carry the weight themselves: `synapo_lm_weight`
(`positive_lm_coef` on correct rows, 0 elsewhere; written at advantage time by `synapo_ext.verl.trainer`). Without
that field (any run that is not `synapo`, or `positive_lm_coef=0`) this is verl's `ppo_loss` unchanged.

    lm_loss = -sum_{b,t} w_b * log pi(y_bt) * mask_bt / (tokens in the mini-batch)   (verl's token-mean scaling)
"""

from __future__ import annotations

import functools
from typing import Any

from .fields import LM_WEIGHT, dense_rows

__all__ = ["LM_WEIGHT", "wrap_ppo_loss"]


def wrap_ppo_loss(original: Any) -> Any:
    """verl's actor loss callable with the positive-example LM term added when the rows carry `synapo_lm_weight`."""

    @functools.wraps(original)
    def ppo_loss(config, model_output, data, dp_group=None):
        loss, metrics = original(config, model_output, data, dp_group)
        if LM_WEIGHT not in data.keys():
            return loss, metrics
        from verl.trainer.ppo.core_algos import agg_loss
        from verl.utils.metric import AggregationType, Metric
        from verl.workers.utils.padding import no_padding_2_padding

        from synapo_ext.core import METRICS

        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        mask = data.select("response_mask").to_padded_tensor()["response_mask"].to(log_prob.device).bool()
        weight = dense_rows(data[LM_WEIGHT]).reshape(-1, 1).to(log_prob)
        lm_loss = agg_loss(
            loss_mat=-log_prob * weight,
            loss_mask=mask,
            loss_agg_mode="token-mean",
            dp_size=data["dp_size"],
            batch_num_tokens=data["batch_num_tokens"],
        )
        metrics[METRICS.positive_lm_loss] = Metric(value=lm_loss, aggregation=AggregationType.SUM)
        return loss + lm_loss, metrics

    ppo_loss.__synapo_wraps__ = original
    return ppo_loss
