"""The critic's weights in its training layout, never whole on a rank: built without memory, seeded from the policy,
saved and restored shard by shard, gathered for a plain export (the wrapping and stepping: `distributed`).

- Built: `init_critic_meta` on the meta device (FSDP2: `distributed.prepare_critic` materialises it shard by shard),
  `init_critic_zero3` inside `deepspeed.zero.Init` with `critic_deepspeed_config` (each rank its partition).
- Seeded: `load_critic_from_policy` (ZeRO-3: `_copy_policy_zero3`) copies the policy's backbone parameter by parameter.
- Checkpoints: FSDP2 via accelerate's `save_fsdp_model` / `save_fsdp_optimizer` (DCP, one shard per rank, the layout
  of the policy's checkpoint), DeepSpeed via `engine.save_checkpoint`, DDP as plain files; `export_critic` writes a
  plain safetensors model on the main process from any layout.

No relative imports at run time: `benchmarks/gpu_fsdp2_step.py` loads this file alone.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForTokenClassification, PretrainedConfig, PreTrainedModel

if TYPE_CHECKING:
    from .distributed import PreparedCritic

__all__ = [
    "SHARDED_DIR",
    "critic_config",
    "critic_deepspeed_config",
    "export_critic",
    "full_critic_state_dict",
    "init_critic_meta",
    "init_critic_zero3",
    "load_critic_from_policy",
    "load_critic_sharded",
    "local_numel",
    "save_critic_sharded",
]

SHARDED_DIR = "critic_sharded"  # inside a checkpoint, next to the plain `critic/` export


def critic_config(policy_config: PretrainedConfig, *, num_heads: int) -> PretrainedConfig:
    """The policy's config with `num_heads` regression outputs per token (transformers 5 refuses `num_labels=`)."""
    config = copy.deepcopy(policy_config)
    config.num_labels = num_heads
    config.problem_type = "regression"
    # GenericForTokenClassification falls back to dropout 0.1 before the head: a noisy value target; verl sets 0 too
    config.classifier_dropout = 0.0
    config.tie_word_embeddings = False  # the critic has no LM head; nothing to tie (FSDP2 maps names 1:1)
    return config


def _build(config: PretrainedConfig) -> PreTrainedModel:
    """`critic_arch.critic_class(config)` built from `config` (a value head on `AutoModel`'s backbone where the model
    type has no token-classification class); this file loaded alone (no package): transformers' token classifier."""
    try:
        from synapo_ext.trl.critic_arch import critic_class
    except ImportError:
        return AutoModelForTokenClassification.from_config(config)
    return critic_class(config)._from_config(config)


def _policy_names(policy: nn.Module, named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{the plain model's name: tensor} of a policy's `named` parameters / buffers (a PEFT policy: base weights under
    their plain names, adapters left out; `critic_arch.base_parameter_name`)."""
    try:
        from peft import PeftModel
    except ImportError:
        return dict(named)
    if not isinstance(policy, PeftModel):
        return dict(named)
    from synapo_ext.trl.critic_arch import base_parameter_name

    prefix = getattr(policy.base_model, "prefix", "lora_")
    return {plain: t for name, t in named if (plain := base_parameter_name(name, prefix)) is not None}


def init_critic_meta(policy_config: PretrainedConfig, *, num_heads: int) -> PreTrainedModel:
    """A critic on the meta device (no memory): materialise it with `prepare_critic(..., policy=...)`."""
    with torch.device("meta"):
        return _build(critic_config(policy_config, num_heads=num_heads))


def local_numel(model: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model) over the parameters (DTensor- and ZeRO-3-aware)."""
    held = full = 0
    for p in model.parameters():
        if hasattr(p, "to_local"):
            held, full = held + p.to_local().numel(), full + p.numel()
        elif hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3 partition
            held, full = held + p.ds_tensor.numel(), full + p.ds_numel
        else:
            held, full = held + p.numel(), full + p.numel()
    return held, full


def _head(critic: nn.Module) -> nn.Module | None:
    return getattr(critic, "score", None) or getattr(critic, "classifier", None)


@torch.no_grad()
def load_critic_from_policy(critic: nn.Module, policy: nn.Module) -> list[str]:
    """Copy the policy's backbone into the critic one parameter at a time; zero the value head.

    Both may be plain, FSDP2-sharded (DTensor) or not yet materialised: a critic parameter whose DTensor placement
    matches the policy's is copied shard to shard (no communication, no full tensor); otherwise the policy's parameter
    is gathered alone (`full_tensor`) and re-distributed, so at most one full parameter exists at a time. Buffers
    (e.g. rotary `inv_freq`, which FSDP2 does not shard) are copied as they are.

    Returns:
        the critic's parameter names with no counterpart in the policy (the value head).
    """
    source = _policy_names(policy, [*policy.named_parameters(), *policy.named_buffers()])
    fresh = []
    for name, param in [*critic.named_parameters(), *critic.named_buffers()]:
        src = source.get(name)
        if src is None or tuple(src.shape) != tuple(param.shape):
            fresh.append(name)
            continue
        if hasattr(param, "to_local"):
            same = (
                hasattr(src, "to_local")
                and src.placements == param.placements
                and src.device_mesh == param.device_mesh
            )
            if same:
                param.to_local().copy_(src.to_local())
            else:
                from torch.distributed.tensor import distribute_tensor

                full = src.full_tensor() if hasattr(src, "to_local") else src
                local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements).to_local()
                param.to_local().copy_(local)
        else:
            param.copy_(src.full_tensor() if hasattr(src, "to_local") else src)
    head = _head(critic)
    for p in head.parameters() if head is not None else ():
        (p.to_local() if hasattr(p, "to_local") else p).zero_()
    return fresh


def init_critic_zero3(
    accelerator, policy_config: PretrainedConfig, *, num_heads: int, micro_batch_size: int, max_grad_norm: float | None
) -> PreTrainedModel:
    """A critic built inside `deepspeed.zero.Init` (ZeRO-3: each rank allocates only its partition); seed it with
    `prepare_critic(..., policy=...)`."""
    import deepspeed

    config = critic_deepspeed_config(accelerator, micro_batch_size, max_grad_norm)
    with deepspeed.zero.Init(config_dict_or_path=config):
        return _build(critic_config(policy_config, num_heads=num_heads))


def critic_deepspeed_config(accelerator, micro_batch_size: int, max_grad_norm: float | None) -> dict:
    """The policy's DeepSpeed config for the critic's own engine: own batch sizes, no accumulation, no scheduler.

    Build a ZeRO-3 critic inside `deepspeed.zero.Init(config_dict_or_path=critic_deepspeed_config(...))` (after
    `deepspeed.init_distributed()`), so no rank holds it whole."""
    plugin = accelerator.state.deepspeed_plugin
    config = copy.deepcopy(plugin.deepspeed_config)
    config.pop("scheduler", None)
    config.pop("optimizer", None)  # the client AdamW below
    config["gradient_accumulation_steps"] = 1  # the critic steps per mini-batch (engine.backward divides by GA)
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["train_batch_size"] = micro_batch_size * accelerator.num_processes
    config["gradient_clipping"] = float(max_grad_norm or 0.0)
    for key in ("bf16", "fp16"):
        if config.get(key, {}).get("enabled") == "auto":
            config[key]["enabled"] = accelerator.mixed_precision == key
    zero = config.setdefault("zero_optimization", {})
    for key, value in list(zero.items()):
        if value == "auto":
            zero.pop(key)
    return config


@torch.no_grad()
def _copy_policy_zero3(critic: nn.Module, policy: nn.Module) -> None:
    """ZeRO-3: gather one critic/policy parameter pair at a time and copy (never a full model on a rank)."""
    import deepspeed

    source = _policy_names(policy, list(policy.named_parameters()))
    for name, param in critic.named_parameters():
        src = source.get(name)
        with deepspeed.zero.GatheredParameters([param] + ([src] if src is not None else []), modifier_rank=0):
            if _rank() == 0:
                if src is not None and src.shape == param.shape:
                    param.copy_(src)
                elif name.startswith(("score.", "classifier.")):
                    param.zero_()


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _sharded_io(accelerator, prepared: PreparedCritic, path: str, *, save: bool) -> None:
    """Write (`save`) or read the weights and optimizer of `prepared` in its training layout at `path`."""
    if prepared.backend == "fsdp2":
        from accelerate.utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer

        model_io, optimizer_io = (
            (save_fsdp_model, save_fsdp_optimizer) if save else (load_fsdp_model, load_fsdp_optimizer)
        )
        plugin = accelerator.state.fsdp_plugin
        model_io(plugin, accelerator, prepared.model, path)
        optimizer_io(plugin, accelerator, prepared.optimizer, prepared.model, path)
    elif prepared.backend == "deepspeed":
        (prepared.engine.save_checkpoint if save else prepared.engine.load_checkpoint)(path, tag="critic")
    else:
        parts = ((prepared.unwrapped, "model.pt"), (prepared.optimizer, "optimizer.pt"))
        for obj, name in parts:
            if not save:
                obj.load_state_dict(torch.load(os.path.join(path, name), map_location="cpu", weights_only=True))
            elif accelerator.is_main_process:
                torch.save(obj.state_dict(), os.path.join(path, name))


def save_critic_sharded(accelerator, prepared: PreparedCritic, checkpoint: str) -> str:
    """Write the critic's weights and optimizer in its training layout to `checkpoint/critic_sharded/`; returns it.

    FSDP2: accelerate's `save_fsdp_model` / `save_fsdp_optimizer` (DCP, each rank writes its shards; the plugin's
    `state_dict_type` decides sharded or full, as for the policy). DeepSpeed: `engine.save_checkpoint` (tag
    `critic`). DDP / single: the unwrapped `state_dict()`s on the main process (`model.pt`, `optimizer.pt`). The
    scheduler is not part of it (tiny, main process: `critic.save_critic_state`). Collective: call on every rank.
    """
    path = os.path.join(checkpoint, SHARDED_DIR)
    os.makedirs(path, exist_ok=True)
    _sharded_io(accelerator, prepared, path, save=True)
    accelerator.wait_for_everyone()
    return path


def load_critic_sharded(accelerator, prepared: PreparedCritic, checkpoint: str) -> None:
    """Restore what `save_critic_sharded` wrote (same backend; DDP: same world size; FSDP2/DCP reshards).

    Raises:
        FileNotFoundError: `checkpoint` has no `critic_sharded/` part.
    """
    path = os.path.join(checkpoint, SHARDED_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{checkpoint} has no sharded critic part ({SHARDED_DIR}/)")
    _sharded_io(accelerator, prepared, path, save=False)
    accelerator.wait_for_everyone()


def full_critic_state_dict(prepared: PreparedCritic) -> dict[str, torch.Tensor]:
    """The critic's full state dict on the main process (other ranks may get an empty one), from any layout.

    FSDP2 gathers it to the main process's CPU (`full_state_dict`, `cpu_offload`); ZeRO-3 gathers 16-bit weights
    (`_zero3_consolidated_16bit_state_dict`). Collective under FSDP2 and ZeRO-3: call on every rank.
    """
    if prepared.backend == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(prepared.model, options=options)
    if prepared.backend == "deepspeed" and prepared.engine.zero_optimization_partition_weights():
        return prepared.engine._zero3_consolidated_16bit_state_dict() or {}  # None off the main process
    return prepared.unwrapped.state_dict()


def export_critic(accelerator, prepared: PreparedCritic, output_dir: str) -> None:
    """A plain `from_pretrained`-loadable safetensors critic in `output_dir` (main process), from any layout.
    Collective (`full_critic_state_dict`): call on every rank."""
    state_dict = full_critic_state_dict(prepared)
    if accelerator.is_main_process:
        prepared.unwrapped.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    accelerator.wait_for_everyone()
