"""SynAPO's critic loss on verl's engine path (the engine with HVM's second output is `synapo_ext.verl.engine`).

critic loss = verl's clipped value loss on the local head            (`verl.workers.utils.losses.value_loss`)
            + the same clipped loss on the global head at segment starts   (HVM; verl's `compute_value_loss`)
            + scvl_weight * SCVL's split hinge                        (`synapo_ext.core.scvl_split_loss`)

Every term is normalised over the whole mini-batch, as verl does for the local head, so the critic's gradient does
not depend on how verl splits the mini-batch into micro-batches: the engine counts the mini-batch's segment starts
and SCVL pair sides before the split.

The loss reads the parameters from the critic's `hf_config.synapo_params` (set by
`synapo_ext.verl.config.prepare_config`); without them it is verl's stock loss, unchanged. With them, a part that is
on but whose row fields did not reach the critic is an error, never a quietly missing term.
"""

from __future__ import annotations

from typing import Any

import torch

from synapo_ext.core import METRICS, scvl_split_loss

from .config import params_from_hf_config
from .engine import NUM_SCVL_SIDES, NUM_SEGMENTS
from .fields import (
    GLOBAL_RETURNS,
    GLOBAL_VALUES,
    HVM_FIELDS,
    SCVL_FIELDS,
    START_MASK,
    dense_rows,
)

__all__ = ["synapo_value_loss"]


def _require(data: Any, names: tuple[str, ...], part: str) -> None:
    missing = [n for n in names if n not in data.keys()]
    if missing:
        raise RuntimeError(
            f"synapo: {part} is on but the critic's mini-batch has no {missing}: the advantage step's fields did not "
            "reach the critic (check the TaskRunner log for TransferQueue errors)"
        )


def _hvm_loss(config: Any, model_output: dict, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's clipped value loss on the global head, over segment starts, normalised by the mini-batch's starts."""
    from verl.trainer.ppo.core_algos import compute_value_loss
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    _require(data, (GLOBAL_VALUES, *HVM_FIELDS), "HVM")
    padded = data.select(GLOBAL_VALUES, GLOBAL_RETURNS, START_MASK).to_padded_tensor()
    vpreds = no_padding_2_padding(model_output[GLOBAL_VALUES], data)
    return compute_value_loss(
        vpreds=vpreds,
        returns=padded[GLOBAL_RETURNS].to(vpreds),
        values=padded[GLOBAL_VALUES].to(vpreds),
        response_mask=padded[START_MASK].to(vpreds.device).bool(),
        cliprange_value=config.cliprange_value,
        loss_agg_mode="token-mean",
        dp_size=data["dp_size"],
        batch_num_tokens=max(tu.get_non_tensor_data(data, NUM_SEGMENTS, 0.0), 1.0),
    )


def _scvl_loss(params: Any, model_output: dict, data: Any) -> torch.Tensor:
    """SCVL's split hinge over the pair sides of this micro-batch's rows, normalised by the mini-batch's pairs."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    _require(data, SCVL_FIELDS, "SCVL")
    vpreds = no_padding_2_padding(model_output["values"], data)
    sign, diverge, partner = (dense_rows(data[k], k).to(vpreds.device) for k in SCVL_FIELDS)
    rows, slots = torch.nonzero(sign, as_tuple=True)
    sides = max(tu.get_non_tensor_data(data, NUM_SCVL_SIDES, 0.0), 1.0)
    hinge = scvl_split_loss(
        vpreds,
        rows,
        diverge[rows, slots].long(),
        partner[rows, slots].to(vpreds),
        sign[rows, slots] > 0,
        margin=params.scvl_margin,
        num_pairs=sides / 2,  # the mini-batch's pairs: each pair has two sides
    )
    return hinge * data["dp_size"]  # FSDP averages gradients over dp ranks, as in verl's agg_loss


def synapo_value_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None):
    """verl's critic loss callable (`TrainingWorker.set_loss_fn`), with HVM's global head and SCVL added.

    Args:
        config: verl's `CriticConfig`; `config.model.hf_config.synapo_params` holds the SynAPO parameters.
        model_output: `values` (and `values_global` with HVM), nested (bs, prompt + response).
        data: the micro-batch TensorDict, carrying the row fields of `synapo_ext.verl.fields`.

    Returns:
        (loss, metrics), as verl's `value_loss`.
    """
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils import losses as verl_losses

    loss, metrics = verl_losses.value_loss(config, model_output, data, dp_group)
    params = params_from_hf_config(getattr(config.model, "hf_config", None))
    if params is None:
        return loss, metrics
    if params.hvm_enabled:
        global_loss, global_clipfrac = _hvm_loss(config, model_output, data)
        loss = loss + global_loss
        metrics[METRICS.global_loss] = Metric(value=global_loss, aggregation=AggregationType.SUM)
        metrics[METRICS.global_clipfrac] = global_clipfrac.detach().item()
    if params.scvl_enabled and params.scvl_weight > 0:
        scvl = _scvl_loss(params, model_output, data)
        loss = loss + params.scvl_weight * scvl
        metrics[METRICS.scvl_loss] = Metric(value=scvl, aggregation=AggregationType.SUM)
    return loss, metrics
