"""VAPO's value pretraining on verl with SynAPO's stopping rule (`synapo_ext.core.warmup.ValueWarmupRule`).

verl's V1 trainer updates the actor once `trainer.critic_warmup <= global_steps`; `prepare_config` sets
`critic_warmup = value_warmup_steps + 1`, the cap. With a stopping rule (`value_warmup_target_ev` or
`value_warmup_patience`), every warm-up step feeds the rule the critic's held-out numbers on the fresh batch (its
rollout-time values against the new targets, before it trains on them):

    explained variance = 1 - Var[G - V] / Var[G],   loss = 0.5 * mean (V - G)^2    (valid tokens)

and when the rule stops, `critic_warmup` becomes the current step, so the actor moves from this step on. The rule's
progress and the step it stopped at are saved next to verl's checkpoint (`synapo_state.json`) and restored on resume.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Any

from synapo_ext.core import METRICS, SynAPOParams, explained_variance, value_loss
from synapo_ext.core.warmup import ValueWarmupRule

from .config import is_synapo, params_from_algorithm
from .estimator import StepContext

__all__ = ["STATE_FILE", "warmup_step", "wrap_load_checkpoint", "wrap_save_checkpoint"]

logger = logging.getLogger(__name__)

STATE_FILE = "synapo_state.json"


def _has_rule(params: SynAPOParams) -> bool:
    return params.value_warmup_target_ev is not None or params.value_warmup_patience is not None


def _rule(trainer: Any, params: SynAPOParams) -> ValueWarmupRule:
    rule = getattr(trainer, "_synapo_warmup_rule", None)
    if rule is None:
        rule = trainer._synapo_warmup_rule = ValueWarmupRule.from_params(params)
    return rule


def warmup_step(trainer: Any, ctx: StepContext, params: SynAPOParams, metrics: dict) -> None:
    """Log whether warm-up is over; during warm-up, feed the stopping rule and end warm-up when it says so."""
    in_warmup = trainer.config.trainer.critic_warmup > trainer.global_steps
    if in_warmup and _has_rule(params) and ctx.values is not None and bool(ctx.response_mask.any()):
        values, returns, mask = ctx.values.float(), ctx.result.returns.float(), ctx.response_mask
        ev = explained_variance(values, returns, mask)  # None: undefined (returns without variance)
        loss = float(value_loss(values, returns, mask)[0])
        decision = _rule(trainer, params).update(loss, None if ev is None else float(ev))
        logger.warning(
            "synapo value warm-up %d/%d: held-out explained variance %s, critic loss %.4f (window means)%s",
            decision.step, params.value_warmup_steps,
            "undefined" if math.isnan(decision.ev_mean) else f"{decision.ev_mean:.3f}", decision.loss_mean,
            f"; done ({decision.reason})" if decision.stop else "",
        )  # fmt: skip
        if decision.stop:
            trainer.config.trainer.critic_warmup = trainer.global_steps  # the actor moves from this step on
            in_warmup = False
    metrics[METRICS.warmup_done] = float(not in_warmup)
    # verl trains only the critic on steps 1 .. critic_warmup - 1 (the actor moves once critic_warmup <= step)
    last_warmup_step = trainer.config.trainer.critic_warmup - 1
    metrics[METRICS.warmup_batches] = float(max(min(trainer.global_steps, last_warmup_step), 0))


def _checkpoint_folder(trainer: Any, step: int, *, loaded: bool) -> str:
    """The folder verl's V1 trainer saves step `step` to, or (`loaded`) resumed it from; absolute.

    verl 0.9.1 has no function for this name: `_save_checkpoint` writes ``{default_local_dir}/global_step_{step}``
    inline (as `RayPPOTrainer` and `CheckpointHandler` do); `_load_checkpoint` reads ``resume_from_path`` in
    `resume_mode="resume_path"`, else the folder of that name that its tracker file points at
    (`find_latest_ckpt_path`), and sets `global_steps` from the folder name. A relative path is taken from the
    working directory, as verl takes it.
    """
    config = trainer.config.trainer
    if loaded and config.resume_mode == "resume_path" and step:
        folder = config.resume_from_path
    else:
        folder = os.path.join(config.default_local_dir, f"global_step_{step}")
    return folder if os.path.isabs(folder) else os.path.join(os.getcwd(), folder)


def wrap_save_checkpoint(original: Any) -> Any:
    """verl's `_save_checkpoint`, then SynAPO's warm-up state next to it (synapo runs only)."""

    @functools.wraps(original)
    def _save_checkpoint(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if is_synapo(self.config):
            rule = getattr(self, "_synapo_warmup_rule", None)
            state = {
                "critic_warmup": int(self.config.trainer.critic_warmup),
                "warmup_rule": None if rule is None else rule.state_dict(),
            }
            with open(os.path.join(_checkpoint_folder(self, self.global_steps, loaded=False), STATE_FILE), "w") as f:
                json.dump(state, f)
        return out

    _save_checkpoint.__synapo_wraps__ = original
    return _save_checkpoint


def wrap_load_checkpoint(original: Any) -> Any:
    """verl's `_load_checkpoint`, then SynAPO's warm-up state from the same folder (synapo runs only)."""

    @functools.wraps(original)
    def _load_checkpoint(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if is_synapo(self.config) and self.global_steps:
            path = os.path.join(_checkpoint_folder(self, self.global_steps, loaded=True), STATE_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"synapo: resuming step {self.global_steps} but its checkpoint has no {STATE_FILE} ({path}); "
                    "it was not written by a synapo run"
                )
            with open(path) as f:
                state = json.load(f)
            self.config.trainer.critic_warmup = state["critic_warmup"]
            if state["warmup_rule"] is not None:
                _rule(self, params_from_algorithm(self.config.algorithm)).load_state_dict(state["warmup_rule"])
        return out

    _load_checkpoint.__synapo_wraps__ = original
    return _load_checkpoint
