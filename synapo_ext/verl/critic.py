"""SynAPO's critic loss on verl's engine path (the engine with HVM's second output is `synapo_ext.verl.engine`).

critic loss = the core's `critic_objective`: the clipped value loss on the local head + the same on the global head at
segment starts (HVM) + scvl_weight * SCVL's split hinge, each normalised by the whole mini-batch's count, as verl's
`agg_loss` in "token-mean" mode is (`batch_num_tokens` tokens, the engine's count of segment starts and SCVL pair
sides), and scaled by `dp_size` (FSDP averages gradients over dp ranks). So the critic's gradient does not depend on
how verl splits the mini-batch into micro-batches, and the metrics (the terms as added) sum over micro-batches.

The loss reads the parameters from the critic's `hf_config.synapo_params` (set by
`synapo_ext.verl.config.prepare_config`); without them it is verl's stock loss, unchanged. With them, a part that is
on but whose row fields did not reach the critic is an error, never a quietly missing term.
"""

from __future__ import annotations

from typing import Any

import torch

from synapo_ext.core import METRICS, SCVLSides, critic_objective

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


def _scvl_sides(data: Any, device: torch.device) -> SCVLSides:
    """The SCVL pair sides of this micro-batch's rows, from the (bs, K) row fields (`synapo_ext.verl.fields`)."""
    _require(data, SCVL_FIELDS, "SCVL")
    sign, diverge, partner = (dense_rows(data[k], k).to(device) for k in SCVL_FIELDS)
    rows, slots = torch.nonzero(sign, as_tuple=True)
    return SCVLSides(rows, diverge[rows, slots].long(), partner[rows, slots].float(), sign[rows, slots] > 0)


def synapo_value_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None):
    """verl's critic loss callable (`TrainingWorker.set_loss_fn`): the core's `critic_objective` on SynAPO critics.

    Args:
        config: verl's `CriticConfig`; `config.model.hf_config.synapo_params` holds the SynAPO parameters.
        model_output: `values` (and `values_global` with HVM), nested (bs, prompt + response).
        data: the micro-batch TensorDict, carrying the row fields of `synapo_ext.verl.fields`.

    Returns:
        (loss, metrics), as verl's `value_loss`.

    Raises:
        ValueError: `loss_agg_mode` is not "token-mean" (SynAPO's critic terms are token means).
    """
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils import losses as verl_losses
    from verl.workers.utils.padding import no_padding_2_padding

    params = params_from_hf_config(getattr(config.model, "hf_config", None))
    if params is None:
        return verl_losses.value_loss(config, model_output, data, dp_group)
    if config.loss_agg_mode != "token-mean":
        raise ValueError(
            f"synapo: critic.loss_agg_mode must be 'token-mean' for a SynAPO critic, got {config.loss_agg_mode!r}"
        )
    if params.hvm_enabled:  # every part's row fields arrived, before anything reads the batch
        _require(data, (GLOBAL_VALUES, *HVM_FIELDS), "HVM")
    if params.scvl_enabled:
        _require(data, SCVL_FIELDS, "SCVL")
    # float32 (bs, response_length): the terms are computed in float32 whatever the critic's dtype (as verl's
    # value loss is, whose float32 returns promote its bf16 predictions)
    vpreds = no_padding_2_padding(model_output["values"], data).float()
    padded = data.select("values", "returns", "response_mask").to_padded_tensor()
    mask = padded["response_mask"].to(vpreds.device).bool()
    hvm = {}
    if params.hvm_enabled:
        _require(data, (GLOBAL_VALUES, *HVM_FIELDS), "HVM")
        heads = data.select(GLOBAL_VALUES, GLOBAL_RETURNS, START_MASK).to_padded_tensor()
        global_vpreds = no_padding_2_padding(model_output[GLOBAL_VALUES], data).float()
        hvm = {
            "global_values": global_vpreds,
            "global_returns": heads[GLOBAL_RETURNS].to(global_vpreds),
            "old_global_values": heads[GLOBAL_VALUES].to(global_vpreds),
            "start_mask": heads[START_MASK].to(vpreds.device).bool(),
            "num_starts": max(tu.get_non_tensor_data(data, NUM_SEGMENTS, 0.0), 1.0),
        }
    scvl = {}
    if params.scvl_enabled:
        sides = _scvl_sides(data, vpreds.device)
        scvl = {
            "scvl_sides": sides._replace(partner_values=sides.partner_values.to(vpreds)),
            "scvl_weight": params.scvl_weight,
            "scvl_margin": params.scvl_margin,
            "num_pairs": tu.get_non_tensor_data(data, NUM_SCVL_SIDES, 0.0) / 2,  # the mini-batch's pairs
        }
    num_tokens = data["batch_num_tokens"]
    out = critic_objective(
        vpreds,
        padded["returns"].to(vpreds),
        mask,
        old_values=padded["values"].to(vpreds),
        cliprange_value=config.cliprange_value,
        num_tokens=None if num_tokens is None else float(num_tokens),
        scale=float(data["dp_size"]),
        **hvm,
        **scvl,
    )
    # terms normalised by the mini-batch sum over its micro-batches; a micro-batch's own mean is averaged
    summed = AggregationType.SUM if num_tokens is not None or data["dp_size"] > 1 else AggregationType.MEAN
    metrics: dict[str, Any] = {"critic/vpred_mean": verl_masked_mean(vpreds, mask)}
    for name, value in out.metrics.items():
        if name in (METRICS.vf_clipfrac, METRICS.global_clipfrac):
            metrics[name] = value.item()  # as verl logs its clip fraction: a micro-batch's own
        else:
            metrics[name] = Metric(value=value, aggregation=summed)
    return out.loss, metrics


def verl_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """verl's `critic/vpred_mean`: the mean current value over `mask`'s tokens."""
    return float(values[mask].mean()) if mask.any() else 0.0
