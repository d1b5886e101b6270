"""The V1 trainer's `_compute_advantage` for `synapo`: verl's own method, run inside a `StepContext`.

Before: fetch from TransferQueue what verl's method does not (`entropy`, `responses`, the global head's values).
After: write back what the critic and the actor need beyond `advantages`/`returns` (`synapo_ext.verl.fields`), one
row per sample, so they travel with the rows through verl's length-balancing reorder, mini-batch shuffle and
micro-batch split. A field the store already holds (`values_global`, written by the critic) goes back in the dtype
the store holds (TransferQueue refuses a dtype change and then drops the metadata of every later field); the rest
are new fields. TransferQueue traffic beyond verl's own: one read (the extra inputs and the response mask), one write,
and one read of the last written field, so a write the store did not take fails here, at the step.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from synapo_ext.core import SCVLSides, SynAPOParams

from .config import is_synapo, params_from_algorithm
from .estimator import StepContext, step_context
from .fields import (
    GLOBAL_RETURNS,
    GLOBAL_VALUES,
    LM_WEIGHT,
    SCVL_DIVERGE,
    SCVL_PARTNER,
    SCVL_SIGN,
    START_MASK,
    TOKEN_FIELDS,
)
from .warmup import warmup_step

__all__ = ["row_fields", "wrap_v1_compute_advantage"]

logger = logging.getLogger(__name__)


def _pack_sides(sides: SCVLSides, batch_size: int) -> dict[str, torch.Tensor]:
    """The core's SCVL pair sides (S,), packed per row into (bs, K) (K = most sides any row has, >= 1)."""
    counts = torch.bincount(sides.rows, minlength=batch_size)
    order = torch.sort(sides.rows, stable=True).indices
    first = torch.cumsum(counts, 0) - counts  # first side of each row in `order`
    rows = sides.rows[order]
    slot = torch.arange(order.numel()) - first[rows]
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    out = {
        SCVL_DIVERGE: torch.full((batch_size, width), -1, dtype=torch.long),
        SCVL_PARTNER: torch.zeros(batch_size, width),
        SCVL_SIGN: torch.zeros(batch_size, width),
    }
    out[SCVL_DIVERGE][rows, slot] = sides.diverge_index[order]
    out[SCVL_PARTNER][rows, slot] = sides.partner_values[order].float()
    out[SCVL_SIGN][rows, slot] = torch.where(sides.is_positive[order], 1.0, -1.0)
    return out


def row_fields(ctx: StepContext, params: SynAPOParams) -> dict[str, torch.Tensor]:
    """The row fields of `synapo_ext.verl.fields`: (bs, response_length) / (bs, K) / (bs,)."""
    result = ctx.result
    out: dict[str, torch.Tensor] = {}
    if params.hvm_enabled:
        out[GLOBAL_RETURNS] = result.global_returns.float()
        out[START_MASK] = result.start_mask.float()
        out[GLOBAL_VALUES] = ctx.extras[GLOBAL_VALUES]  # response-only, in the dtype the critic stored
    if params.scvl_enabled:
        out.update(_pack_sides(result.scvl_sides, result.advantages.shape[0]))
    if params.positive_lm_coef > 0:
        out[LM_WEIGHT] = result.positive_lm_weights.float()
    return out


def _fetch_extras(tq: Any, batch: Any, params: SynAPOParams) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Padded (bs, response_length) fields verl's `_compute_advantage` does not fetch, and the nested response mask
    (one read; the mask is reused to write the row fields back)."""
    from tensordict import TensorDict
    from verl.workers.utils.padding import response_from_nested

    fields = ["response_mask", "responses"]
    if params.ea_gae_enabled:
        fields.append("entropy")
    if params.hvm_enabled:
        fields.append(GLOBAL_VALUES)
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
    missing = [f for f in fields if f not in data.keys()]
    if missing:
        raise RuntimeError(f"synapo: TransferQueue holds no {missing} for this batch (see synapo_ext.verl.trainer)")
    mask = data["response_mask"]
    if params.hvm_enabled:  # the critic wrote (prompt + response) values; keep the response part, as verl does
        data[GLOBAL_VALUES] = response_from_nested(data[GLOBAL_VALUES], mask)
    padded = TensorDict(dict(data.items()), batch_size=len(batch)).to_padded_tensor()
    return {k: padded[k] for k in fields if k != "response_mask"}, mask


def _put_and_check(tq: Any, batch: Any, fields: dict[str, torch.Tensor], mask: torch.Tensor) -> Any:
    """Write the row fields (per-token ones nested by the response `mask`), then read the last one back.

    TransferQueue's controller updates a put's fields in order and, at the first one it refuses (a dtype change),
    logs an error and drops the metadata of that field and every later one (transfer_queue/controller.py:556). The
    field already in the store (`values_global`) goes first and the last field is a small new one, so reading the
    last field back is the one check that every field arrived.
    """
    from tensordict import TensorDict
    from verl.workers.utils.padding import response_to_nested

    names = sorted(fields, key=lambda k: (k != GLOBAL_VALUES, k not in TOKEN_FIELDS))  # stable: table order
    out = {k: response_to_nested(fields[k], mask) if k in TOKEN_FIELDS else fields[k] for k in names}
    batch = tq.kv_batch_put(
        keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(out, batch_size=len(batch))
    )
    last = names[-1]
    try:
        back = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=[last])
        arrived = last in back.keys()
    except Exception as exc:  # the store lost the field's metadata
        raise RuntimeError(f"synapo: TransferQueue did not take the advantage step's fields {names}") from exc
    if not arrived:
        raise RuntimeError(f"synapo: TransferQueue did not take the advantage step's fields {names}")
    return batch


def wrap_v1_compute_advantage(original: Any) -> Any:
    """`PPOTrainer._compute_advantage` (verl V1): unchanged unless `algorithm.adv_estimator=synapo`."""

    @functools.wraps(original)
    def _compute_advantage(self, batch, metrics):
        if not is_synapo(self.config):
            return original(self, batch, metrics)
        import verl.trainer.ppo.v1.trainer_base as tb

        params = params_from_algorithm(self.config.algorithm)
        extras, mask = _fetch_extras(tb.tq, batch, params)
        ctx = StepContext(tokenizer=getattr(self, "tokenizer", None), extras=extras)
        with step_context(ctx):
            batch = original(self, batch, metrics)
        if ctx.result is None:
            raise RuntimeError("synapo: verl's `_compute_advantage` did not call the synapo estimator")
        fields = row_fields(ctx, params)
        if fields:
            batch = _put_and_check(tb.tq, batch, fields, mask)
        metrics.update(ctx.result.metrics)
        warmup_step(self, ctx, params, metrics)
        return batch

    _compute_advantage.__synapo_wraps__ = original
    return _compute_advantage
