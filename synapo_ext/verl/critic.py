"""SynAPO's critic on verl's engine path: a two-output value engine and the critic loss.

critic loss = verl's clipped value loss on the local head            (`verl.workers.utils.losses.value_loss`)
            + the same clipped loss on the global head at segment starts   (HVM; verl's `compute_value_loss`)
            + scvl_weight * SCVL's split hinge                        (`synapo_ext.core.scvl_split_loss`)

Every term is normalised over the whole mini-batch, as verl does for the local head, so the critic's gradient does
not depend on how verl splits the mini-batch into micro-batches: `SynAPOValueEngine.forward_backward_batch` counts
the mini-batch's segment starts and SCVL pair sides before the split.

Both the engine and the loss read the parameters from the critic's `hf_config.synapo_params` (set by
`synapo_ext.verl.config.prepare_config`); without them they are verl's stock engine and loss, unchanged.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import torch
from verl.trainer.ppo.core_algos import compute_value_loss
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithValueHead
from verl.workers.utils import losses as verl_losses
from verl.workers.utils.padding import no_padding_2_padding

from synapo_ext.core import scvl_split_loss

from .config import params_from_hf_config

__all__ = ["SynAPOValueEngine", "synapo_value_loss"]

logger = logging.getLogger(__name__)

GLOBAL_VALUES = "values_global"
NUM_SEGMENTS = "synapo_num_segments"
NUM_SCVL_SIDES = "synapo_num_scvl_sides"


def _two_heads(module: torch.nn.Module) -> None:
    """Replace the 1-output token-classification head by a 2-output one (both rows start as the old row)."""
    for name in ("score", "classifier"):
        head = getattr(module, name, None)
        if isinstance(head, torch.nn.Linear):
            break
    else:
        raise TypeError(
            f"HVM needs a token-classification critic with a `score` or `classifier` Linear head; "
            f"{type(module).__name__} has neither (trl's value-head fallback is not supported)"
        )
    if head.out_features == 2:
        return
    new = torch.nn.Linear(head.in_features, 2, bias=head.bias is not None, device=head.weight.device)
    new.to(head.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(head.weight.expand(2, -1))
        if head.bias is not None:
            new.bias.copy_(head.bias.expand(2))
    setattr(module, name, new)
    module.config.num_labels = 2


def _nested_sum(t: torch.Tensor) -> torch.Tensor:
    return (t.values() if t.is_nested else t).float().sum()


class SynAPOValueEngine(FSDPEngineWithValueHead):
    """verl's FSDP value engine with HVM's second (global) output when the critic is a SynAPO one."""

    def _synapo(self):
        return params_from_hf_config(self.model_config.hf_config)

    def _hvm(self) -> bool:
        params = self._synapo()
        return params is not None and params.hvm_enabled

    def _build_module(self):
        module = super()._build_module()
        if self._hvm():
            _two_heads(module)
            self.model_config.hf_config.num_labels = 2
        return module

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        if not self._hvm():
            return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        logits = output.logits  # (..., 2): local, global
        heads = {}
        for key, col in (("values", 0), (GLOBAL_VALUES, 1)):
            one = SimpleNamespace(logits=logits[..., col : col + 1])
            heads[key] = super().prepare_model_outputs(one, output_args, micro_batch, logits_processor_func)["values"]
        return heads

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        if not forward_only and self._synapo() is not None:
            counts = torch.zeros(2)
            if "synapo_start_mask" in data.keys():
                counts[0] = _nested_sum(data["synapo_start_mask"])
            if "synapo_scvl_sign" in data.keys():
                counts[1] = data["synapo_scvl_sign"].abs().sum()
            group = self.get_data_parallel_group()
            if torch.distributed.is_initialized():
                from verl.utils.device import get_device_id

                counts = counts.to(get_device_id())
                torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=group)
            tu.assign_non_tensor(data, **{NUM_SEGMENTS: float(counts[0]), NUM_SCVL_SIDES: float(counts[1])})
        return super().forward_backward_batch(data, loss_function, forward_only=forward_only)


def synapo_value_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None):
    """verl's critic loss callable (`TrainingWorker.set_loss_fn`), with HVM's global head and SCVL added.

    Args:
        config: verl's `CriticConfig`; `config.model.hf_config.synapo_params` holds the SynAPO parameters.
        model_output: `values` (and `values_global` with HVM), nested (bs, prompt + response).
        data: the micro-batch TensorDict, carrying the per-row fields of `synapo_ext.verl.trainer`.

    Returns:
        (loss, metrics), as verl's `value_loss`.
    """
    loss, metrics = verl_losses.value_loss(config, model_output, data, dp_group)
    params = params_from_hf_config(getattr(config.model, "hf_config", None))
    if params is None:
        return loss, metrics
    dp_size = data["dp_size"]
    if params.hvm_enabled:
        padded = data.select(GLOBAL_VALUES, "synapo_global_returns", "synapo_start_mask").to_padded_tensor()
        vpreds = no_padding_2_padding(model_output[GLOBAL_VALUES], data)
        start_mask = padded["synapo_start_mask"].to(vpreds.device).bool()
        global_loss, global_clipfrac = compute_value_loss(
            vpreds=vpreds,
            returns=padded["synapo_global_returns"].to(vpreds),
            values=padded[GLOBAL_VALUES].to(vpreds),
            response_mask=start_mask,
            cliprange_value=config.cliprange_value,
            loss_agg_mode="token-mean",
            dp_size=dp_size,
            batch_num_tokens=max(tu.get_non_tensor_data(data, NUM_SEGMENTS, 0.0), 1.0),
        )
        loss = loss + global_loss
        metrics["critic/synapo/global_loss"] = Metric(value=global_loss, aggregation=AggregationType.SUM)
        metrics["critic/synapo/global_clipfrac"] = global_clipfrac.detach().item()
    if params.scvl_enabled and params.scvl_weight > 0 and "synapo_scvl_sign" in data.keys():
        vpreds = no_padding_2_padding(model_output["values"], data)
        sign = data["synapo_scvl_sign"].to(vpreds.device)
        rows, slots = torch.nonzero(sign, as_tuple=True)
        sides = max(tu.get_non_tensor_data(data, NUM_SCVL_SIDES, 0.0), 1.0)
        hinge = scvl_split_loss(
            vpreds,
            rows,
            data["synapo_scvl_diverge"].to(vpreds.device)[rows, slots],
            data["synapo_scvl_partner"].to(vpreds)[rows, slots],
            sign[rows, slots] > 0,
            margin=params.scvl_margin,
            num_pairs=sides / 2,  # the mini-batch's pairs: each pair has two sides
        )
        scvl = hinge * dp_size  # FSDP averages gradients over dp ranks, as in verl's agg_loss
        loss = loss + params.scvl_weight * scvl
        metrics["critic/synapo/scvl_loss"] = Metric(value=scvl, aggregation=AggregationType.SUM)
    return loss, metrics
