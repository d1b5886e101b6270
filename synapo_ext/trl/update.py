"""The critic's update on one rollout batch: mini-batches of the core's critic losses, a raw optimizer step each.

critic loss = value loss (single head) | HVM's two-head loss, + scvl_weight * SCVL (split form, SPEC "SCVL")

The step uses plain `loss.backward()` and a raw torch optimizer on purpose: an accelerate-prepared optimizer skips
its step on non-sync micro-steps under gradient accumulation and silently freezes the critic (notes/trl.md, 4.1).
Across processes the gradients are averaged by hand, so every rank applies the same update.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..core import SynAPOParams, hvm_critic_loss, scvl_pair_values, scvl_pairs, scvl_split_loss, value_loss
from .critic import critic_values

__all__ = ["CriticBatch", "SCVLSides", "critic_health", "scvl_sides", "update_critic"]


@dataclass
class SCVLSides:
    """The pair sides held by this process (S,), each with its partner's rollout-time value (SPEC "SCVL")."""

    rows: torch.Tensor  # LongTensor (S,), local row of the side
    diverge_index: torch.Tensor  # LongTensor (S,), d of its pair
    partner_values: torch.Tensor  # float (S,), partner's rollout-time V[partner, d + 1]
    is_positive: torch.Tensor  # bool (S,)
    num_pairs: float  # P this process accounts for: the local P, or the global P / world size when gathered


@dataclass
class CriticBatch:
    """One process's rollout batch for the critic; tensors (B, T) unless said."""

    input_ids: torch.Tensor  # (B, P + T), prompt + completion
    attention_mask: torch.Tensor  # (B, P + T)
    response_mask: torch.Tensor  # float 0/1
    returns: torch.Tensor  # single head's (or HVM local head's) target
    old_values: torch.Tensor  # (B, T, H), rollout-time values
    global_returns: torch.Tensor | None = None
    start_mask: torch.Tensor | None = None
    sides: SCVLSides | None = None


def scvl_sides(
    params: SynAPOParams,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    values: torch.Tensor,
    *,
    local_index: torch.Tensor,
    world_size: int = 1,
) -> tuple[SCVLSides, int]:
    """SCVL pairs of a (possibly gathered) batch, cut down to the sides whose row this process holds.

    Args:
        response_ids, response_mask, values: (N, T) over the pairing scope (the local batch, or all processes').
        scores: float (N,); group_ids: integer (N,).
        local_index: LongTensor (N,), this process's row of each scope row, -1 where another process holds it.
        world_size: > 1 when the scope is gathered (the loss is then scaled so the ranks' mean is the pair mean).

    Returns:
        (sides, number of pairs in the scope).
    """
    pairs = scvl_pairs(
        response_ids,
        response_mask,
        scores,
        group_ids,
        threshold=params.scvl_threshold,
        max_pairs=params.scvl_max_pairs,
    )
    pos_values, neg_values = scvl_pair_values(values, pairs)
    rows = local_index[torch.cat([pairs.pos_index, pairs.neg_index])]
    is_local = rows >= 0
    n_pairs = int(pairs.pos_index.numel())
    sides = SCVLSides(
        rows=rows[is_local],
        diverge_index=torch.cat([pairs.diverge_index, pairs.diverge_index])[is_local],
        partner_values=torch.cat([neg_values, pos_values])[is_local],
        is_positive=(torch.arange(rows.numel(), device=rows.device) < n_pairs)[is_local],
        num_pairs=n_pairs / world_size,
    )
    return sides, n_pairs


def critic_health(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Held-out critic numbers on a fresh rollout batch (the critic has not trained on it yet): explained
    variance 1 - Var(G - V) / Var(G) and the value loss 0.5 * mean (V - G)^2 over `mask`'s tokens (head 0: the
    single head, or HVM's local head). Near-constant returns make Var(G) tiny and the explained variance very
    negative without saying much. `returns`, `values`, `mask`: (B, T)."""
    m = mask.bool()
    if not m.any():
        return {}
    target, residual = returns[m].double(), (returns - values)[m].double()
    var = target.var() if target.numel() > 1 else torch.zeros((), dtype=torch.float64)
    ev = 1.0 - residual.var() / var if var > 0 else torch.zeros((), dtype=torch.float64)
    return {
        "critic/explained_variance": float(ev),
        "critic/heldout_vf_loss": float(0.5 * residual.square().mean()),
        "critic/values_mean": float(values[m].mean()),
        "critic/returns_mean": float(target.mean()),
    }


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
    metrics: dict[str, torch.Tensor] = {}
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
        metrics.update(
            {
                "critic/hvm_local_loss": hvm["local_loss"],
                "critic/hvm_global_loss": hvm["global_loss"],
                "critic/vf_clipfrac": hvm["local_clipfrac"],
            }
        )
    else:
        loss, clipfrac = value_loss(
            values[..., 0], batch.returns[rows], mask, old_values=old[..., 0], cliprange_value=cliprange_value
        )
        metrics["critic/vf_clipfrac"] = clipfrac
    metrics["critic/vf_loss"] = loss.detach()
    if batch.sides is not None:
        sides = batch.sides
        position = torch.full((batch.response_mask.size(0),), -1, dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(rows.numel(), device=rows.device)
        here = position[sides.rows] >= 0
        hinge_sum = scvl_split_loss(
            values[..., 0],
            position[sides.rows[here]],
            sides.diverge_index[here],
            sides.partner_values[here],
            sides.is_positive[here],
            margin=params.scvl_margin,
            num_pairs=1,
        )
        # sum over this mini-batch's sides / P, times the number of mini-batches: a full-batch-mean scale per step
        scvl = hinge_sum * (n_minibatches / sides.num_pairs) if sides.num_pairs > 0 else hinge_sum * 0.0
        metrics["critic/scvl_loss"] = 0.5 * scvl.detach()  # both sides of a pair hold the hinge: log the joint one
        loss = loss + params.scvl_weight * scvl
    return loss, metrics


def _average_gradients(parameters: list[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients, one flat buffer: every rank then takes the same step."""
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
) -> dict[str, float]:
    """`epochs` passes over `batch` in shuffled mini-batches; returns the metrics averaged over the steps."""
    B = batch.response_mask.size(0)
    mini_batch_size = min(mini_batch_size, B)
    n_minibatches = math.ceil(B / mini_batch_size)
    parameters = [p for p in critic.parameters() if p.requires_grad]
    sums: dict[str, float] = defaultdict(float)
    critic.train()
    for _ in range(epochs):
        order = torch.randperm(B, generator=generator).to(batch.response_mask.device)
        for k in range(n_minibatches):
            rows = order[k * mini_batch_size : (k + 1) * mini_batch_size]
            optimizer.zero_grad(set_to_none=True)
            with autocast() if autocast is not None else torch.enable_grad():
                loss, metrics = _minibatch_loss(critic, batch, rows, params, cliprange_value, n_minibatches)
            loss.backward()  # not accelerator.backward: it divides by gradient_accumulation_steps
            _average_gradients(parameters)
            if max_grad_norm:
                metrics["critic/grad_norm"] = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            for name, value in metrics.items():
                sums[name] += float(value)
    steps = epochs * n_minibatches
    out = {name: total / steps for name, total in sums.items()}
    out["critic/lr"] = optimizer.param_groups[0]["lr"]
    out["critic/updates"] = float(steps)
    return out
