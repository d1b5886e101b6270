"""SynAPO's value engine: verl's FSDP value engine with HVM's second (global) output.

The class subclasses verl's `FSDPEngineWithValueHead`, so it is built on first use (`value_engine_class()`, or the
module attribute `SynAPOValueEngine`), not at import: `synapo_ext.patches.verl` registers it from an import hook on
`verl.workers.engine`, and a module that imported verl's engines at its top would close an import cycle.

Without SynAPO parameters on the critic's `hf_config` (any run that is not `synapo`) it is verl's engine, unchanged.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch

from .fields import SCVL_SIGN, START_MASK

__all__ = ["NUM_SCVL_SIDES", "NUM_SEGMENTS", "value_engine_class"]

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


def _total(t: torch.Tensor) -> float:
    return float((t.values() if t.is_nested else t).abs().float().sum())


class _SynAPOValueMixin:
    """The overrides; mixed into verl's `FSDPEngineWithValueHead` by `value_engine_class`."""

    def _synapo(self):
        from .config import params_from_hf_config

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
        from .fields import GLOBAL_VALUES

        logits = output.logits  # (..., 2): local, global
        heads = {}
        for key, col in (("values", 0), (GLOBAL_VALUES, 1)):
            one = SimpleNamespace(logits=logits[..., col : col + 1])
            heads[key] = super().prepare_model_outputs(one, output_args, micro_batch, logits_processor_func)["values"]
        return heads

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        """Count the mini-batch's segment starts and SCVL pair sides (over all dp ranks) before verl splits it into
        micro-batches, so every SynAPO term is normalised by the mini-batch, as verl's token-mean is."""
        if not forward_only and self._synapo() is not None:
            from verl.utils import tensordict_utils as tu

            keys = data.keys()
            counts = torch.tensor([_total(data[k]) if k in keys else 0.0 for k in (START_MASK, SCVL_SIGN)])
            if torch.distributed.is_initialized():
                from verl.utils.device import get_device_id

                counts = counts.to(get_device_id())
                group = self.get_data_parallel_group()
                torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=group)
            tu.assign_non_tensor(data, **{NUM_SEGMENTS: float(counts[0]), NUM_SCVL_SIDES: float(counts[1])})
        return super().forward_backward_batch(data, loss_function, forward_only=forward_only)


@functools.cache
def value_engine_class() -> type:
    """`SynAPOValueEngine`: `_SynAPOValueMixin` over verl's `FSDPEngineWithValueHead` (built once)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithValueHead

    cls = type("SynAPOValueEngine", (_SynAPOValueMixin, FSDPEngineWithValueHead), {"__module__": __name__})
    cls.__doc__ = "verl's FSDP value engine with HVM's second (global) output when the critic is a SynAPO one."
    return cls


def __getattr__(name: str) -> Any:
    if name == "SynAPOValueEngine":
        return value_engine_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
