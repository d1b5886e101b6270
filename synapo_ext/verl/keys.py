"""Which verl keys the SynAPO parameters set (plain data: no verl, no omegaconf, so the parameter table in
docs/parameters.md is generated from it anywhere)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["TOKEN_MEAN", "TO_VERL", "TO_VERL_TEXT", "VERL_KEYS"]

# SynAPO parameter -> (verl key, verl 0.9.1 default). tests/verl check the defaults against verl's composed config.
VERL_KEYS: dict[str, tuple[str, Any]] = {
    "gamma": ("algorithm.gamma", 1.0),
    "gae_lambda": ("algorithm.lam", 1.0),
    "clip_ratio_low": ("actor_rollout_ref.actor.clip_ratio_low", 0.2),
    "clip_ratio_high": ("actor_rollout_ref.actor.clip_ratio_high", 0.2),
    "value_warmup_steps": ("trainer.critic_warmup", 0),
}
TO_VERL: dict[str, Callable[[Any], Any]] = {
    # verl updates the actor once `trainer.critic_warmup <= global_steps`, and steps count from 1: N critic-only
    # steps are critic_warmup = N + 1
    "value_warmup_steps": lambda steps: steps + 1,
}
TO_VERL_TEXT = {
    "value_warmup_steps": "value_warmup_steps + 1: verl counts steps from 1"
}  # TO_VERL in words, for messages and docs
TOKEN_MEAN = ("actor_rollout_ref.actor.loss_agg_mode", "token-mean")  # VAPO's token-level loss, for every preset
