"""The critic's update on one rollout batch: mini-batches of the core's critic losses, a raw optimizer step each.

critic loss = the core's `critic_objective` on each mini-batch: value loss (single head, or HVM's two heads) +
              scvl_weight * SCVL's split form, each term normalised by the mini-batch's own tokens / starts and SCVL by
              the step's share of the pairs, P / (mini-batches per epoch): every step has the full-batch-mean scale

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

from ..core import (
    METRICS,
    SCVLSides,
    SynAPOParams,
    compute_gae,
    critic_objective,
    explained_variance,
    value_loss,
)
from .critic import critic_values
from .distributed import PreparedCritic, critic_step

__all__ = [
    "HELDOUT_VF_LOSS",
    "CriticBatch",
    "critic_health",
    "minibatch_critic_loss",
    "outcome_returns",
    "update_critic",
]

# the value loss on a batch the critic has not trained on yet (TRL only); not logged when the update is one step,
# whose critic/vf_loss is this same number
HELDOUT_VF_LOSS = "critic/heldout_vf_loss"


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


def critic_health(
    returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, outcome: torch.Tensor | None = None
) -> dict[str, float]:
    """Held-out critic numbers on a fresh rollout batch (the critic has not trained on it yet): the core's
    explained variance (left out where undefined) and value loss over `mask`'s tokens (head 0: the single head, or
    HVM's local head), the mean value and target; with `outcome` (the Monte-Carlo return, `outcome_returns`) also the
    explained variance of the outcome (`METRICS.explained_variance_outcome`, left out where undefined: every row's
    return the same). Near-constant returns make Var(G) tiny and the explained variance very negative without saying
    much. `returns`, `values`, `mask`, `outcome`: (B, T)."""
    m = mask.bool()
    if not m.any():
        return {}
    out = {
        HELDOUT_VF_LOSS: float(value_loss(values, returns, m)[0]),
        METRICS.values_mean: float(values[m].mean()),
        METRICS.returns_mean: float(returns[m].double().mean()),
    }
    ev = explained_variance(values, returns, m)
    if ev is not None:  # undefined (returns without variance): left out, not logged as the formula's 1.0
        out[METRICS.explained_variance] = float(ev)
    ev_outcome = explained_variance(values, outcome, m) if outcome is not None else None
    if ev_outcome is not None:
        out[METRICS.explained_variance_outcome] = float(ev_outcome)
    return out


def outcome_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """float (B, T) Monte-Carlo return of each valid token, G_t = sum_{s >= t} gamma^(s - t) r_s over the row's
    valid tokens (the returns of GAE with lambda = 1 and V = 0); 0 on rows with no valid token and off `mask`."""
    out = torch.zeros_like(rewards, dtype=torch.float32)
    rows = mask.bool().any(dim=1)
    if rows.any():
        zeros = torch.zeros_like(rewards[rows])
        _, returns = compute_gae(rewards[rows], zeros, mask[rows], gamma=gamma, lam=1.0)
        out[rows] = returns.float()
    return out * mask


def _sides_in(sides: SCVLSides, rows: torch.Tensor, batch_size: int) -> SCVLSides:
    """The sides whose row is in the mini-batch `rows`, re-indexed to the mini-batch's order."""
    position = torch.full((batch_size,), -1, dtype=torch.long, device=rows.device)
    position[rows] = torch.arange(rows.numel(), device=rows.device)
    here = position[sides.rows] >= 0
    return SCVLSides(position[sides.rows[here]], sides.diverge_index[here], sides.partner_values[here],
                     sides.is_positive[here])  # fmt: skip


def minibatch_critic_loss(
    values: torch.Tensor,
    batch: CriticBatch,
    rows: torch.Tensor,
    params: SynAPOParams,
    cliprange_value: float | None,
    n_minibatches: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic loss (`core.critic_objective`: value loss, HVM's two heads, SCVL's split hinge) of `batch`'s `rows`
    (LongTensor (b,)) from their values `values` (b, T, H), with grad; returns (loss, metrics)."""
    old = batch.old_values[rows]
    hvm = params.hvm_enabled
    out = critic_objective(
        values[..., 0],
        batch.returns[rows],
        batch.response_mask[rows],
        old_values=old[..., 0],
        cliprange_value=cliprange_value,
        global_values=values[..., 1] if hvm else None,
        global_returns=batch.global_returns[rows] if hvm else None,
        start_mask=batch.start_mask[rows] if hvm else None,
        old_global_values=old[..., 1] if hvm else None,
        scvl_sides=None if batch.sides is None else _sides_in(batch.sides, rows, batch.response_mask.size(0)),
        scvl_weight=params.scvl_weight,
        scvl_margin=params.scvl_margin,
        num_pairs=batch.num_pairs / n_minibatches,  # the step's share of P: a full-batch-mean scale per step
    )
    return out.loss, out.metrics


def _minibatch_loss(
    critic: nn.Module,
    batch: CriticBatch,
    rows: torch.Tensor,
    params: SynAPOParams,
    cliprange_value: float | None,
    n_minibatches: int,
    values_fn=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if values_fn is not None:
        values = values_fn(rows)  # (b, T, H)
    else:
        T = batch.response_mask.size(1)
        values = critic_values(critic, batch.input_ids[rows], batch.attention_mask[rows], T)  # (b, T, H)
    return minibatch_critic_loss(values, batch, rows, params, cliprange_value, n_minibatches)


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
    values_fn=None,
) -> dict[str, float]:
    """`epochs` passes over `batch` in shuffled mini-batches, one `distributed.critic_step` each (backward, clip,
    optimizer and `scheduler` step); returns the metrics averaged over the steps.

    `critic`, `optimizer` and `backend` are a `PreparedCritic`'s `model`, `optimizer` and `backend` (`critic`: what
    to call, the DDP / FSDP2 module or the DeepSpeed engine). Every rank takes the same number of steps (the
    wrappers' forward and backward are collective). `values_fn(rows)`, when given, returns the (b, T, H) values of
    those rows with grad instead of the critic's forward on their tokens (the shared-trunk critic: heads on kept
    features, synapo_ext/trl/trunk.py).
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
                loss, metrics = _minibatch_loss(critic, batch, rows, params, cliprange_value, n_minibatches, values_fn)
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
