"""The critic's update on one rollout batch: mini-batches of the core's critic losses, a raw optimizer step each.

critic loss = value loss (single head) | HVM's two-head loss, + scvl_weight * SCVL (split form, docs/spec.md "SCVL")

Each step is `distributed.critic_step`: plain `loss.backward()` and a raw torch optimizer on purpose (an
accelerate-prepared optimizer skips its step on non-sync micro-steps under gradient accumulation and silently freezes
the critic). Across processes the critic's wrapper (DDP, FSDP2, DeepSpeed) reduces the gradients, so every rank
applies the same update; an unwrapped critic in a process group is averaged by hand.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ..core import METRICS, SCVLSides, SynAPOParams, explained_variance, hvm_critic_loss, scvl_split_loss, value_loss
from .critic import critic_values
from .distributed import PreparedCritic, critic_step

__all__ = ["HELDOUT_VF_LOSS", "CriticBatch", "critic_health", "update_critic"]

HELDOUT_VF_LOSS = "critic/heldout_vf_loss"  # the value loss on a batch the critic has not trained on yet (TRL only)


@dataclass
class CriticBatch:
    """One process's rollout batch for the critic; tensors (B, T) unless said.

    `sides` are the core's SCVL pair sides (`SynAPOAdvantages.scvl_sides`) whose row this process holds, `rows`
    indexing this batch; `num_pairs` is the P this process accounts for: its own P, or the scope's P / world size
    when the pairs were found over all processes' rows.
    """

    input_ids: torch.Tensor  # (B, P + T), prompt + completion
    attention_mask: torch.Tensor  # (B, P + T)
    response_mask: torch.Tensor  # float 0/1
    returns: torch.Tensor  # single head's (or HVM local head's) target
    old_values: torch.Tensor  # (B, T, H), rollout-time values
    global_returns: torch.Tensor | None = None
    start_mask: torch.Tensor | None = None
    sides: SCVLSides | None = None
    num_pairs: float = 0.0


def critic_health(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Held-out critic numbers on a fresh rollout batch (the critic has not trained on it yet): the core's
    explained variance and value loss over `mask`'s tokens (head 0: the single head, or HVM's local head), the
    mean value and target. Near-constant returns make Var(G) tiny and the explained variance very negative without
    saying much. `returns`, `values`, `mask`: (B, T)."""
    m = mask.bool()
    if not m.any():
        return {}
    return {
        METRICS.explained_variance: float(explained_variance(values, returns, m)),
        HELDOUT_VF_LOSS: float(value_loss(values, returns, m)[0]),
        METRICS.values_mean: float(values[m].mean()),
        METRICS.returns_mean: float(returns[m].double().mean()),
    }


def _scvl_loss(values: torch.Tensor, batch: CriticBatch, rows: torch.Tensor, params: SynAPOParams, n_minibatches):
    """The split hinge over the sides whose row is in this mini-batch, at a full-batch-mean scale per step."""
    sides = batch.sides
    position = torch.full((batch.response_mask.size(0),), -1, dtype=torch.long, device=rows.device)
    position[rows] = torch.arange(rows.numel(), device=rows.device)
    here = position[sides.rows] >= 0
    hinge_sum = scvl_split_loss(
        values,
        position[sides.rows[here]],
        sides.diverge_index[here],
        sides.partner_values[here],
        sides.is_positive[here],
        margin=params.scvl_margin,
        num_pairs=1,
    )
    # sum over this mini-batch's sides / P, times the number of mini-batches: a full-batch-mean scale per step
    return hinge_sum * (n_minibatches / batch.num_pairs) if batch.num_pairs > 0 else hinge_sum * 0.0


def _minibatch_loss(
    critic: nn.Module,
    batch: CriticBatch,
    rows: torch.Tensor,
    params: SynAPOParams,
    cliprange_value: float | None,
    n_minibatches: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    T = batch.response_mask.size(1)
    values = critic_values(critic, batch.input_ids[rows], batch.attention_mask[rows], T)  # (b, T, H)
    mask, old = batch.response_mask[rows], batch.old_values[rows]
    if params.hvm_enabled:
        loss, hvm = hvm_critic_loss(
            values[..., 0],
            values[..., 1],
            batch.returns[rows],
            batch.global_returns[rows],
            mask,
            batch.start_mask[rows],
            old_local_values=old[..., 0],
            old_global_values=old[..., 1],
            cliprange_value=cliprange_value,
        )
        metrics = {
            METRICS.vf_loss: hvm["local_loss"],
            METRICS.vf_clipfrac: hvm["local_clipfrac"],
            METRICS.global_loss: hvm["global_loss"],
            METRICS.global_clipfrac: hvm["global_clipfrac"],
        }
    else:
        loss, clipfrac = value_loss(
            values[..., 0], batch.returns[rows], mask, old_values=old[..., 0], cliprange_value=cliprange_value
        )
        metrics = {METRICS.vf_loss: loss.detach(), METRICS.vf_clipfrac: clipfrac}
    if batch.sides is not None:
        scvl = _scvl_loss(values[..., 0], batch, rows, params, n_minibatches)
        metrics[METRICS.scvl_loss] = 0.5 * scvl.detach()  # both sides of a pair hold the hinge: log the joint one
        loss = loss + params.scvl_weight * scvl
    return loss, metrics


def update_critic(
    critic: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batch: CriticBatch,
    params: SynAPOParams,
    *,
    epochs: int,
    mini_batch_size: int,
    cliprange_value: float | None,
    max_grad_norm: float | None,
    generator: torch.Generator,
    autocast=None,
    backend: str = "single",
) -> dict[str, float]:
    """`epochs` passes over `batch` in shuffled mini-batches, one `distributed.critic_step` each (backward, clip,
    optimizer and `scheduler` step); returns the metrics averaged over the steps.

    `critic`, `optimizer` and `backend` are a `PreparedCritic`'s `model`, `optimizer` and `backend` (`critic`: what
    to call, the DDP / FSDP2 module or the DeepSpeed engine). Every rank takes the same number of steps (the
    wrappers' forward and backward are collective).
    """
    prepared = PreparedCritic(
        critic, optimizer, backend, scheduler=scheduler, engine=critic if backend == "deepspeed" else None
    )
    B = batch.response_mask.size(0)
    mini_batch_size = min(mini_batch_size, B)
    n_minibatches = math.ceil(B / mini_batch_size)
    sums: dict[str, float] = defaultdict(float)
    critic.train()
    for _ in range(epochs):
        order = torch.randperm(B, generator=generator).to(batch.response_mask.device)
        for k in range(n_minibatches):
            rows = order[k * mini_batch_size : (k + 1) * mini_batch_size]
            with autocast() if autocast is not None else torch.enable_grad():
                loss, metrics = _minibatch_loss(critic, batch, rows, params, cliprange_value, n_minibatches)
            norm = critic_step(prepared, loss, max_grad_norm=max_grad_norm)  # steps `scheduler` too
            if norm is not None:
                metrics[METRICS.grad_norm] = norm
            for name, value in metrics.items():
                sums[name] += float(value)
    steps = epochs * n_minibatches
    out = {name: total / steps for name, total in sums.items()}
    out[METRICS.lr] = optimizer.param_groups[0]["lr"]
    out["critic/updates"] = float(steps)
    return out
