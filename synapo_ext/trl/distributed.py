"""The critic under the trainer's `accelerator`: DDP, FSDP2 or DeepSpeed ZeRO-2/3, as TRL runs the policy.

The critic keeps a raw torch optimizer stepped by hand (an accelerate-prepared optimizer skips steps on non-sync
micro-steps and freezes the critic under gradient accumulation); only the *model* is wrapped:

- single process: the module itself (a process group that accelerate does not manage is averaged by hand).
- DDP: `accelerator.prepare_model` (DDP averages the gradients; mixed precision as the policy's).
- FSDP2: `accelerator.prepare(critic, optimizer)`, a call of its own (accelerate refuses two models in one FSDP2
  `prepare`), so the critic gets the policy's wrap policy, `MixedPrecisionPolicy`, activation checkpointing and
  reshard settings; its parameters are `DTensor` shards. A critic built on the meta device is materialised shard by
  shard and copied from the (equally sharded) policy, so no rank ever holds a full critic.
- DeepSpeed: an engine of its own from `deepspeed.initialize` with a copy of the policy's config (accelerate keeps one
  `deepspeed_engine_wrapped`; a second `prepare` would re-route the *policy's* `accelerator.backward`).

Building the critic without memory, seeding it from the policy and its checkpoints: `critic_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .critic_weights import _copy_policy_zero3, critic_deepspeed_config, load_critic_from_policy

__all__ = [
    "PreparedCritic",
    "average_gradients",
    "critic_backend",
    "critic_step",
    "prepare_critic",
    "zero_stage",
]


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


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage of `accelerator` (0 without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage or 0) if plugin is not None else 0


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
        prepared.engine.step()  # clips with the config's `gradient_clipping`; never steps our scheduler
        norm = prepared.engine.get_global_grad_norm()
        norm = None if norm is None else torch.as_tensor(float(norm))
    else:
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
    if prepared.scheduler is not None:  # every backend (the DeepSpeed engine only steps a scheduler it was given)
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
