"""The V1 trainer's `_compute_advantage` for `synapo`: verl's own method, run inside a `StepContext`.

Before: fetch from TransferQueue what verl's method does not (`entropy`, `responses`, the global head's values).
After: write back what the critic and the actor need beyond `advantages`/`returns`, one row per sample, so they
travel with the rows through verl's length-balancing reorder, mini-batch shuffle and micro-batch split:

    values_global          (bs, response_length)  rollout-time global-head values            (HVM)
    synapo_global_returns  (bs, response_length)  the global head's target                   (HVM)
    synapo_start_mask      (bs, response_length)  1 at each segment's first token            (HVM)
    synapo_scvl_diverge    (bs, K) long           d of each pair side of this row, -1: none  (SCVL)
    synapo_scvl_partner    (bs, K)                the partner's rollout-time V[d + 1]        (SCVL)
    synapo_scvl_sign       (bs, K)                +1 positive side, -1 negative side, 0 none (SCVL)
    synapo_lm_weight       (bs,)                  positive_lm_coef on correct rows, else 0   (positive-example LM)
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from synapo_ext.core import SynAPOAdvantages

from .config import is_synapo, params_from_algorithm
from .estimator import StepContext, step_context

__all__ = ["row_fields", "wrap_v1_compute_advantage"]

logger = logging.getLogger(__name__)


def _scvl_sides(result: SynAPOAdvantages, rows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Both sides of every SCVL pair, packed per row into (bs, K) (K = most sides any row has, >= 1)."""
    pairs = result.scvl
    side_rows = rows[torch.cat([pairs.pos_index, pairs.neg_index])]
    diverge = torch.cat([pairs.diverge_index, pairs.diverge_index])
    partner = torch.cat([result.scvl_neg_values, result.scvl_pos_values]).float()
    sign = torch.cat([torch.ones_like(pairs.pos_index), -torch.ones_like(pairs.neg_index)]).float()
    counts = torch.bincount(side_rows, minlength=batch_size)
    order = torch.sort(side_rows, stable=True).indices
    first = torch.cumsum(counts, 0) - counts  # first side of each row in `order`
    slot = torch.arange(order.numel()) - first[side_rows[order]]
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    out = {
        "synapo_scvl_diverge": torch.full((batch_size, width), -1, dtype=torch.long),
        "synapo_scvl_partner": torch.zeros(batch_size, width),
        "synapo_scvl_sign": torch.zeros(batch_size, width),
    }
    for key, src in zip(out, (diverge, partner, sign), strict=True):
        out[key][side_rows[order], slot] = src[order].to(out[key].dtype)
    return out


def row_fields(ctx: StepContext, params: Any, batch_size: int, width: int) -> dict[str, torch.Tensor]:
    """The per-row fields of the module docstring, padded to (bs, width) / (bs, K) / (bs,)."""
    result, live = ctx.result, ctx.live
    rows = torch.nonzero(live).squeeze(-1)
    out: dict[str, torch.Tensor] = {}
    if params.hvm_enabled:
        for key, src in (("synapo_global_returns", result.global_returns), ("synapo_start_mask", result.start_mask)):
            full = torch.zeros(batch_size, width)
            full[rows] = src.float()
            out[key] = full
        out["values_global"] = ctx.extras["values_global"].float()
    if params.scvl_enabled:
        out.update(_scvl_sides(result, rows, batch_size))
    if params.positive_lm_coef > 0:
        scores = ctx.extras["synapo_scores"]
        out["synapo_lm_weight"] = params.positive_lm_coef * ((scores >= params.scvl_threshold) & live).float()
    return out


def _fetch_extras(tb: Any, batch: Any, params: Any) -> dict[str, torch.Tensor]:
    """Padded (bs, response_length) fields verl's `_compute_advantage` does not fetch."""
    from tensordict import TensorDict
    from verl.workers.utils.padding import response_from_nested

    fields = ["response_mask", "rm_scores", "responses"]
    if params.ea_gae_enabled:
        fields.append("entropy")
    if params.hvm_enabled:
        fields.append("values_global")
    data = tb.tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
    missing = [f for f in fields if f not in data.keys()]
    if missing:
        raise RuntimeError(f"synapo: TransferQueue holds no {missing} for this batch (see synapo_ext.verl.trainer)")
    if params.hvm_enabled:  # the critic wrote (prompt + response) values; keep the response part, as verl does
        data["values_global"] = response_from_nested(data["values_global"], data["response_mask"])
    padded = TensorDict(dict(data.items()), batch_size=len(batch)).to_padded_tensor()
    extras = {k: padded[k] for k in fields if k not in ("response_mask", "rm_scores")}
    extras["synapo_scores"] = (padded["rm_scores"] * padded["response_mask"]).sum(dim=-1)
    return extras


def wrap_v1_compute_advantage(original: Any) -> Any:
    """`PPOTrainer._compute_advantage` (verl V1): unchanged unless `algorithm.adv_estimator=synapo`."""

    @functools.wraps(original)
    def _compute_advantage(self, batch, metrics):
        if not is_synapo(self.config):
            return original(self, batch, metrics)
        import verl.trainer.ppo.v1.trainer_base as tb
        from tensordict import TensorDict
        from verl.workers.utils.padding import response_to_nested

        params = params_from_algorithm(self.config.algorithm)
        ctx = StepContext(tokenizer=getattr(self, "tokenizer", None), extras=_fetch_extras(tb, batch, params))
        with step_context(ctx):
            batch = original(self, batch, metrics)
        if ctx.result is None:
            raise RuntimeError("synapo: verl's `_compute_advantage` did not call the synapo estimator")
        mask = tb.tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["response_mask"])
        mask = mask["response_mask"]
        fields = row_fields(ctx, params, len(batch), ctx.result.advantages.shape[1])
        out = {k: response_to_nested(v, mask) if v.dim() == 2 and k in _TOKEN_FIELDS else v for k, v in fields.items()}
        if out:
            batch = tb.tq.kv_batch_put(
                keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(out, batch_size=len(batch))
            )
        metrics.update(ctx.result.metrics)
        return batch

    _compute_advantage.__synapo_wraps__ = original
    return _compute_advantage


_TOKEN_FIELDS = ("values_global", "synapo_global_returns", "synapo_start_mask")
