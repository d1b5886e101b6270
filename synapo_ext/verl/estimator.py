"""The `synapo` advantage estimator for verl: a thin call into `synapo_ext.core.compute_synapo_advantages`.

verl hands a registered estimator only `token_level_rewards, response_mask, index, config`. SynAPO also needs the
critic's values (both heads), the rollout entropy and the response token ids; `wrap_compute_advantage` (installed by
`synapo_ext.patches`) passes them from the batch, and the V1 trainer patch (`synapo_ext.verl.trainer`) fetches the
ones verl leaves in TransferQueue through a `StepContext`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from synapo_ext.core import SynAPOAdvantages, boundary_table_from_tokenizer, compute_synapo_advantages

from .config import SYNAPO, params_from_algorithm

__all__ = ["StepContext", "compute_synapo_advantage", "step_context", "wrap_compute_advantage"]

logger = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What the trainer knows and verl's `compute_advantage` does not; filled in both directions.

    tokenizer: the policy's tokenizer (HVM's boundary table).
    extras: padded (B, T) tensors merged into the batch before the estimator runs (`entropy`, `responses`,
        `values_global`).
    result: the core's full output, for the trainer to write the critic's extra targets back.
    values, response_mask: the rollout-time values and the mask the core saw.
    """

    tokenizer: Any = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    result: SynAPOAdvantages | None = None
    values: torch.Tensor | None = None
    response_mask: torch.Tensor | None = None


_STEP: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("synapo_step", default=None)


@contextlib.contextmanager
def step_context(ctx: StepContext) -> Iterator[StepContext]:
    token = _STEP.set(ctx)
    try:
        yield ctx
    finally:
        _STEP.reset(token)


@functools.lru_cache(maxsize=4)
def _boundary_table(tokenizer: Any, delimiters: tuple[str, ...]) -> torch.Tensor:
    try:
        return boundary_table_from_tokenizer(tokenizer, delimiters)
    except ValueError as exc:
        raise ValueError(
            f"`algorithm.synapo.hvm_delimiters`={list(delimiters)}: {exc}. HVM needs a token containing a delimiter; "
            "choose other delimiters or set `+algorithm.synapo.hvm_enabled=False`"
        ) from exc


def _check_groups(index: Any, live: torch.Tensor) -> None:
    uids = np.asarray(index, dtype=object)[live.numpy()]
    _, counts = np.unique(uids.astype(str), return_counts=True)
    if (counts < 2).any():
        raise ValueError(
            f"SCVL needs >= 2 responses per prompt, but {int((counts < 2).sum())} `uid` group(s) hold one; "
            "set `actor_rollout_ref.rollout.n` >= 2 or `+algorithm.synapo.scvl_enabled=False`"
        )


def compute_synapo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    config: Any = None,
    *,
    values: torch.Tensor | None = None,
    values_global: torch.Tensor | None = None,
    entropys: torch.Tensor | None = None,
    responses: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    boundary_table: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SynAPO advantages and critic targets (verl's estimator signature plus what SynAPO needs).

    Args:
        token_level_rewards: `(bs, response_length)`, outcome score on the last token plus any KL term.
        response_mask: `(bs, response_length)`.
        index: `(bs,)` verl `uid`s (SCVL groups).
        config: the `algorithm` config; its `synapo` node holds the parameters.
        values, values_global: `(bs, response_length)` rollout-time critic values (local / global head).
        entropys: `(bs, response_length)` rollout-policy entropy (EA-GAE).
        responses: `(bs, response_length)` response token ids (HVM segments, SCVL divergence).
        scores: `(bs,)` outcome scores (SCVL); default: the row sum of `token_level_rewards`.
        boundary_table: bool `(vocab,)`; default: built from the trainer's tokenizer.

    Returns:
        `(advantages, returns)`, each `(bs, response_length)`; rows with no valid token (verl's padding samples)
        get zeros. The core's full result is left in the active `StepContext`.
    """
    if config is None or values is None:
        raise RuntimeError(
            "verl called the `synapo` estimator without `values`/`config`: synapo_ext's verl patches are not "
            "applied in this process (check the log for 'synapo_ext'), or the critic is off"
        )
    params = params_from_algorithm(config)
    ctx = _STEP.get() or StepContext()
    if params.hvm_enabled and boundary_table is None:
        if ctx.tokenizer is None:
            raise ValueError("HVM needs the tokenizer: call through the patched verl trainer or pass `boundary_table`")
        boundary_table = _boundary_table(ctx.tokenizer, tuple(params.hvm_delimiters))
    if boundary_table is not None and responses is not None:
        vocab = int(responses[response_mask.bool()].max()) + 1 if bool(response_mask.any()) else 0
        if vocab > boundary_table.numel():  # the model's embedding may be padded beyond the tokenizer
            boundary_table = torch.cat([boundary_table, boundary_table.new_zeros(vocab - boundary_table.numel())])
    if params.scvl_enabled:
        if index is None:
            raise ValueError("SCVL needs the `uid` of each response (verl's non_tensor_batch['uid'])")
        _check_groups(index, response_mask.any(dim=-1))  # verl pads batches with all-masked rows: not a group
    if scores is None:
        scores = (token_level_rewards * response_mask).sum(dim=-1)
    # the core skips rows with no valid token (zeros there, no SCVL pair) and counts them
    result = compute_synapo_advantages(
        params,
        rewards=token_level_rewards,
        values=values,
        response_mask=response_mask,
        global_values=values_global if params.hvm_enabled else None,
        entropy=entropys if params.ea_gae_enabled else None,
        response_ids=responses,
        boundary_table=boundary_table,
        scores=scores.float(),
        group_ids=list(np.asarray(index, dtype=object)) if params.scvl_enabled else None,
    )
    ctx.result, ctx.values, ctx.response_mask = result, values, response_mask
    return result.advantages, result.returns


def wrap_compute_advantage(original: Any) -> Any:
    """verl's `compute_advantage(data, adv_estimator, ...)`, passing SynAPO's inputs to the `synapo` estimator.

    Any other estimator goes to `original` untouched.
    """

    @functools.wraps(original)
    def compute_advantage(
        data, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1, norm_adv_by_std_in_grpo=True, config=None
    ):
        if getattr(adv_estimator, "value", adv_estimator) != SYNAPO:
            return original(data, adv_estimator, gamma, lam, num_repeat, norm_adv_by_std_in_grpo, config)
        from verl.trainer.ppo import core_algos

        ctx = _STEP.get() or StepContext()
        batch = {**dict(data.batch.items()), **ctx.extras}
        if "response_mask" not in batch:
            raise ValueError("the batch has no `response_mask`")
        scores = batch.get("token_level_scores")
        advantages, returns = core_algos.get_adv_estimator_fn(SYNAPO)(
            token_level_rewards=batch["token_level_rewards"],
            response_mask=batch["response_mask"],
            index=data.non_tensor_batch.get("uid"),
            config=config,
            values=batch.get("values"),
            values_global=batch.get("values_global"),
            entropys=batch.get("entropy", batch.get("entropys")),
            responses=batch.get("responses"),
            scores=None if scores is None else (scores * batch["response_mask"]).sum(dim=-1),
        )
        data.batch["advantages"] = advantages
        data.batch["returns"] = returns
        return data

    compute_advantage.__synapo_wraps__ = original
    return compute_advantage
