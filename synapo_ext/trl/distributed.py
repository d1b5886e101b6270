"""The critic under the trainer's `accelerator`: DDP, FSDP2 or DeepSpeed ZeRO-2/3, as TRL runs the policy.

The critic keeps a raw torch optimizer stepped by hand (an accelerate-prepared optimizer skips steps on non-sync
micro-steps and freezes the critic under gradient accumulation, notes/trl.md 4.1); only the *model* is wrapped:

- single process: the module itself (a process group that accelerate does not manage is averaged by hand).
- DDP: `accelerator.prepare_model` (DDP averages the gradients; mixed precision as the policy's).
- FSDP2: `accelerator.prepare(critic, optimizer)`, a call of its own (accelerate refuses two models in one FSDP2
  `prepare`), so the critic gets the policy's wrap policy, `MixedPrecisionPolicy`, activation checkpointing and
  reshard settings; its parameters are `DTensor` shards. A critic built on the meta device is materialised shard by
  shard and copied from the (equally sharded) policy, so no rank ever holds a full critic.
- DeepSpeed: an engine of its own from `deepspeed.initialize` with a copy of the policy's config (accelerate keeps one
  `deepspeed_engine_wrapped`; a second `prepare` would re-route the *policy's* `accelerator.backward`).

Checkpoints: FSDP2 via accelerate's `save_fsdp_model` / `save_fsdp_optimizer` (DCP, one shard per rank, the layout of
the policy's checkpoint), DeepSpeed via `engine.save_checkpoint`, DDP as plain files; `export_critic` writes a plain
safetensors model on the main process from any layout.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForTokenClassification, PretrainedConfig, PreTrainedModel

__all__ = [
    "SHARDED_DIR",
    "PreparedCritic",
    "average_gradients",
    "critic_backend",
    "critic_config",
    "critic_deepspeed_config",
    "critic_step",
    "export_critic",
    "full_critic_state_dict",
    "init_critic_meta",
    "init_critic_zero3",
    "load_critic_from_policy",
    "load_critic_sharded",
    "local_numel",
    "prepare_critic",
    "save_critic_sharded",
    "zero_stage",
]

SHARDED_DIR = "critic_sharded"  # inside a checkpoint, next to the plain `critic/` export


@dataclass
class PreparedCritic:
    """The critic as the trainer uses it after `prepare_critic`.

    Attributes:
        model: what to call (DDP / FSDP2 module / DeepSpeed engine); `model(input_ids=..., attention_mask=...).logits`
            is float (B, P + T, H) on every backend.
        optimizer: the raw torch optimizer over the (sharded) parameters; under DeepSpeed the engine's optimizer.
        backend: "single", "ddp", "fsdp2" or "deepspeed".
        scheduler: optional LR scheduler over `optimizer` (stepped by `critic_step`).
        engine: the DeepSpeed engine (same object as `model`), else None.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    backend: str
    scheduler: Any = None
    engine: Any = None

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer whose `param_groups` the step reads: build LR schedulers on it (under DeepSpeed the
        client AdamW inside the engine's ZeRO optimizer, which torch's schedulers refuse: not an `Optimizer`)."""
        inner = getattr(self.optimizer, "optimizer", None)
        return inner if self.backend == "deepspeed" and isinstance(inner, torch.optim.Optimizer) else self.optimizer

    @property
    def unwrapped(self) -> nn.Module:
        """The `PreTrainedModel` inside the wrapper (FSDP2 wraps in place: the model itself)."""
        return getattr(self.model, "module", self.model)


def critic_backend(accelerator) -> str:
    """The critic's backend for `accelerator`: "single", "ddp", "fsdp2" or "deepspeed".

    Raises:
        NotImplementedError: FSDP1 (`fsdp_version: 1`): use `fsdp_version: 2`.
    """
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "DEEPSPEED":
        return "deepspeed"
    if kind == "FSDP":
        if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise NotImplementedError(
                "the SynAPO critic supports FSDP2 only; set `fsdp_version: 2` in the accelerate config "
                "(or fsdp_config={'version': 2})"
            )
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def critic_config(policy_config: PretrainedConfig, *, num_heads: int) -> PretrainedConfig:
    """The policy's config with `num_heads` regression outputs per token (transformers 5 refuses `num_labels=`)."""
    config = copy.deepcopy(policy_config)
    config.num_labels = num_heads
    config.problem_type = "regression"
    # GenericForTokenClassification falls back to dropout 0.1 before the head: a noisy value target; verl sets 0 too
    config.classifier_dropout = 0.0
    config.tie_word_embeddings = False  # the critic has no LM head; nothing to tie (FSDP2 maps names 1:1)
    return config


def init_critic_meta(policy_config: PretrainedConfig, *, num_heads: int) -> PreTrainedModel:
    """A critic on the meta device (no memory): materialise it with `prepare_critic(..., policy=...)`."""
    with torch.device("meta"):
        return AutoModelForTokenClassification.from_config(critic_config(policy_config, num_heads=num_heads))


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
    source = dict(policy.named_parameters())
    source.update(dict(policy.named_buffers()))
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


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _enable_checkpointing(critic: nn.Module, kwargs: dict | None) -> None:
    enable = getattr(critic, "activation_checkpointing_enable", None) or critic.gradient_checkpointing_enable
    if "activation" in enable.__name__:
        enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        enable(gradient_checkpointing_kwargs=kwargs or None)
    if hasattr(critic, "config"):
        critic.config.use_cache = False


def prepare_critic(
    accelerator,
    critic: PreTrainedModel,
    *,
    learning_rate: float,
    weight_decay: float = 0.0,
    policy: nn.Module | None = None,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict | None = None,
    micro_batch_size: int = 1,
    max_grad_norm: float | None = None,
    **optimizer_kwargs: Any,
) -> PreparedCritic:
    """Wrap the critic and build its optimizer as `accelerator` runs the policy.

    Args:
        accelerator: the trainer's `Accelerator` (its distributed type, mixed precision and FSDP / DeepSpeed plugin).
        critic: a token-classification model; on the meta device (`init_critic_meta`) it needs `policy`.
        policy: when given, the critic's backbone is copied from it and its head zeroed (required for a meta critic);
            under FSDP2 pass the policy *already prepared*, so shards copy to shards.
        gradient_checkpointing: the policy's `args.gradient_checkpointing` (FSDP2's own activation checkpointing is
            applied by accelerate to both models).
        micro_batch_size: the critic's mini-batch per rank (DeepSpeed's `train_micro_batch_size_per_gpu`).
        max_grad_norm: the critic's clip norm (DeepSpeed's `gradient_clipping`; elsewhere `critic_step` clips).
        **optimizer_kwargs: more `torch.optim.AdamW` arguments (`betas`, `eps`).

    Returns:
        `PreparedCritic`; its optimizer is raw torch (no accelerate wrapper).

    Raises:
        ValueError: a meta critic without `policy`.
        ImportError: DeepSpeed configured but not installed.
    """
    backend = critic_backend(accelerator)
    meta = _is_meta(critic)
    if meta and policy is None:
        raise ValueError("a critic on the meta device needs `policy=` to be materialised from")
    if gradient_checkpointing:
        _enable_checkpointing(critic, gradient_checkpointing_kwargs)

    def adamw(params):
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, **optimizer_kwargs)

    if backend == "deepspeed":
        return _prepare_deepspeed(accelerator, critic, adamw, policy, micro_batch_size, max_grad_norm)
    if backend == "fsdp2":
        # accelerate maps the optimizer's parameters to the shards; the AcceleratedOptimizer is left unused.
        critic, _ = accelerator.prepare(critic, adamw(critic.parameters()))
        if meta:
            critic.to_empty(device=accelerator.device)
        if policy is not None:
            load_critic_from_policy(critic, accelerator.unwrap_model(policy))
        return PreparedCritic(critic, adamw(critic.parameters()), backend)
    if meta:
        critic.to_empty(device=accelerator.device)
    if policy is not None:
        load_critic_from_policy(critic, accelerator.unwrap_model(policy))
    if backend == "single":  # the module itself (the trainer's forward passes run under accelerator.autocast)
        return PreparedCritic(critic.to(accelerator.device), adamw(critic.parameters()), backend)
    model = accelerator.prepare_model(critic)  # DDP (it broadcasts rank 0's weights); autocast for mixed precision
    return PreparedCritic(model, adamw(critic.parameters()), backend)


def init_critic_zero3(
    accelerator, policy_config: PretrainedConfig, *, num_heads: int, micro_batch_size: int, max_grad_norm: float | None
) -> PreTrainedModel:
    """A critic built inside `deepspeed.zero.Init` (ZeRO-3: each rank allocates only its partition); seed it with
    `prepare_critic(..., policy=...)`."""
    import deepspeed

    config = critic_deepspeed_config(accelerator, micro_batch_size, max_grad_norm)
    with deepspeed.zero.Init(config_dict_or_path=config):
        return AutoModelForTokenClassification.from_config(critic_config(policy_config, num_heads=num_heads))


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage of `accelerator` (0 without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage or 0) if plugin is not None else 0


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


def _prepare_deepspeed(accelerator, critic, adamw, policy, micro_batch_size, max_grad_norm) -> PreparedCritic:
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("the accelerate config uses DeepSpeed but `deepspeed` is not installed") from err
    config = critic_deepspeed_config(accelerator, micro_batch_size, max_grad_norm)
    if _is_meta(critic):
        raise ValueError(
            "under DeepSpeed build the critic inside `deepspeed.zero.Init` (transformers' `from_pretrained` / "
            "`from_config` do so when ZeRO-3 is configured) instead of on the meta device"
        )
    if policy is not None and config["zero_optimization"].get("stage", 0) == 3:
        _copy_policy_zero3(critic, accelerator.unwrap_model(policy))
    elif policy is not None:
        load_critic_from_policy(critic, accelerator.unwrap_model(policy))
    engine, optimizer, _, _ = deepspeed.initialize(model=critic, optimizer=adamw(critic.parameters()), config=config)
    return PreparedCritic(engine, optimizer, "deepspeed", engine=engine)


@torch.no_grad()
def _copy_policy_zero3(critic: nn.Module, policy: nn.Module) -> None:
    """ZeRO-3: gather one critic/policy parameter pair at a time and copy (never a full model on a rank)."""
    import deepspeed

    source = dict(policy.named_parameters())
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


def critic_step(prepared: PreparedCritic, loss: torch.Tensor, *, max_grad_norm: float | None) -> torch.Tensor | None:
    """One critic optimizer step on a mini-batch's scalar `loss`: backward, clip, step, zero (scheduler if any).

    The wrapper reduces the gradients (DDP all-reduce, FSDP2 reduce-scatter, ZeRO); only the unwrapped "single"
    backend averages by hand (`average_gradients`, a no-op without a process group of more than one rank). Plain
    `backward`, not `accelerator.backward`: that divides by the policy's gradient accumulation.

    Returns:
        the gradient norm before clipping (a 0-dim tensor, the same on every rank), or None without clipping.
    """
    if prepared.backend == "deepspeed":
        prepared.engine.backward(loss)
        prepared.engine.step()  # clips with the config's `gradient_clipping`
        norm = prepared.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(float(norm))
    loss.backward()
    if prepared.backend == "single":  # no wrapper: a process group outside accelerate's setup is averaged by hand
        average_gradients([p for p in prepared.model.parameters() if p.requires_grad])
    norm = None
    if max_grad_norm:
        params = [p for p in prepared.unwrapped.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # DTensor-aware: the global norm
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    prepared.optimizer.step()
    prepared.optimizer.zero_grad(set_to_none=True)
    if prepared.scheduler is not None:
        prepared.scheduler.step()
    return norm


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients in one flat buffer, so every rank takes the same step; for an unwrapped critic
    in a process group that accelerate does not manage (a no-op without one, or with one rank)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = []
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(reduced)


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
