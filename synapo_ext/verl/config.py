"""SynAPO's verl configuration: `+algorithm.synapo.*` -> `SynAPOParams`, and one preset written onto verl's keys.

    python -m verl.trainer.main_ppo ... algorithm.adv_estimator=synapo \\
        +algorithm.synapo.preset=vapo +algorithm.synapo.ea_gae_beta=-0.05

The SynAPO parameters are the single source of truth. `prepare_config` writes the VAPO pieces onto verl's own
keys (table `VERL_KEYS`), so a preset is one flag. A verl key still at verl's default is overwritten; a verl key the
user changed to a value other than the preset's is an error that names both keys (never a silent override).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from synapo_ext.core import SynAPOParams, params_from_preset
from synapo_ext.core.config import did_you_mean

from .keys import TO_VERL, TO_VERL_TEXT, TOKEN_MEAN, VERL_KEYS  # the verl keys the parameters set

__all__ = [
    "HF_CONFIG_KEY",
    "SYNAPO",
    "VERL_KEYS",
    "is_prepared",
    "is_synapo",
    "params_from_algorithm",
    "params_from_hf_config",
    "prepare_config",
]

logger = logging.getLogger(__name__)

SYNAPO = "synapo"
"""The `algorithm.adv_estimator` name."""
HF_CONFIG_KEY = "synapo_params"
"""`critic.model.override_config.<key>`: the parameters as JSON, copied by verl onto the critic's `hf_config`, which
is how the critic worker (engine and loss) learns them."""


def is_synapo(config: Any) -> bool:
    """True if `config` (the whole trainer config or its `algorithm` node) selects the `synapo` estimator."""
    algorithm = config.get("algorithm", config) if hasattr(config, "get") else config
    estimator = algorithm.get("adv_estimator") if hasattr(algorithm, "get") else None
    return getattr(estimator, "value", estimator) == SYNAPO


def is_prepared(config: Any) -> bool:
    """True if `prepare_config` already ran on this trainer config (it hands the parameters to the critic)."""
    return OmegaConf.select(config, f"critic.model.override_config.{HF_CONFIG_KEY}", default=None) is not None


def params_from_algorithm(algorithm: Any) -> SynAPOParams:
    """`algorithm.synapo` (a preset name plus overrides) -> `SynAPOParams`.

    Raises:
        TypeError, ValueError: an unknown preset or parameter, or a bad value, naming the key under
            `algorithm.synapo`.
    """
    raw = algorithm.get(SYNAPO) if hasattr(algorithm, "get") else None
    if raw is None:
        raw = {}
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, dict):
        raise ValueError(f"`algorithm.synapo` must be a mapping of SynAPO parameters, got {raw!r}")
    return _resolve(json.dumps(raw, sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _resolve(text: str) -> SynAPOParams:
    """Checked once per process per distinct `algorithm.synapo` (the trainer asks every step)."""
    raw = json.loads(text)
    preset = raw.pop("preset", SYNAPO)
    names = {f.name for f in dataclasses.fields(SynAPOParams)}
    unknown = sorted(set(raw) - names)
    if unknown:
        keys = ", ".join(
            f"`algorithm.synapo.{k}`{did_you_mean(k, names | {'preset'}, prefix='algorithm.synapo.')}" for k in unknown
        )
        raise ValueError(
            f"unknown SynAPO parameter {keys}; valid names: preset, {', '.join(sorted(names))} (docs/parameters.md)"
        )
    try:
        return params_from_preset(preset, **raw)
    except (TypeError, ValueError) as exc:  # the core names the field in `exc.field`
        raise type(exc)(f"`algorithm.synapo.{getattr(exc, 'field', 'preset')}`: {exc}") from exc


def params_to_json(params: SynAPOParams) -> str:
    return json.dumps(params.to_dict(), sort_keys=True)


def params_from_hf_config(hf_config: Any) -> SynAPOParams | None:
    """The parameters a critic worker received through its `hf_config` (None: not a SynAPO critic)."""
    text = getattr(hf_config, HF_CONFIG_KEY, None)
    return _params_from_json(text) if text else None


@functools.lru_cache(maxsize=8)
def _params_from_json(text: str) -> SynAPOParams:
    """Parsed once per process (the engine and the loss ask on every micro-batch)."""
    return SynAPOParams(**json.loads(text))


def _select(config: DictConfig, key: str) -> Any:
    return OmegaConf.select(config, key, throw_on_missing=False)


def _write(config: DictConfig, key: str, value: Any, source: str, written: Any = None) -> None:
    """Set verl's `key` to `value` unless the user set it to something else (`source` names our key; `written`: the
    value of `source` the user wrote, when verl's differs from it)."""
    current = _select(config, key)
    if current == value:
        return
    default = next((d for k, d in VERL_KEYS.values() if k == key), TOKEN_MEAN[1] if key == TOKEN_MEAN[0] else None)
    if current is not None and current != default:
        name = source.rsplit(".", 1)[-1]
        ours = f"`{source}={value}`" if written is None else f"`{source}={written}` (which sets `{key}={value}`"
        ours += "" if written is None else f", {TO_VERL_TEXT[name]})"
        raise ValueError(
            f"`{key}={current}` conflicts with SynAPO's {ours}; "
            f"leave `{key}` at its default and set `+{source}=...` instead"
        )
    with open_dict(config):
        OmegaConf.update(config, key, value, merge=False)


def prepare_config(config: DictConfig) -> SynAPOParams | None:
    """For a `synapo` run: resolve the parameters and write them onto verl's keys (idempotent). Else a no-op.

    Sets the VAPO pieces (`VERL_KEYS`, token-mean loss), turns the critic on, and hands the parameters to the critic
    worker through `critic.model.override_config.synapo_params`.

    Raises:
        ValueError: bad `algorithm.synapo.*`, a conflicting verl key, `critic.enable=False`, `rollout.n < 2` with
            SCVL on, EA-GAE with the rollout-correction bypass mode (no entropy), or the legacy trainer.
    """
    if not is_synapo(config):
        return None
    params = params_from_algorithm(config.algorithm)
    if _select(config, "trainer.use_v1") is False:
        raise ValueError(
            "algorithm.adv_estimator=synapo runs on verl's V1 trainer only; set `trainer.use_v1=True` (the default)"
        )
    if _select(config, "critic.enable") is False:
        raise ValueError("algorithm.adv_estimator=synapo needs the critic: remove `critic.enable=False`")
    n = _select(config, "actor_rollout_ref.rollout.n")
    if params.scvl_enabled and n is not None and n < 2:
        raise ValueError(
            f"SCVL compares responses to one prompt: `actor_rollout_ref.rollout.n` must be >= 2, got {n} "
            "(or set `+algorithm.synapo.scvl_enabled=False`)"
        )
    if params.ea_gae_enabled and _select(config, "algorithm.rollout_correction.bypass_mode"):
        raise ValueError(
            "EA-GAE needs the rollout entropy, which `algorithm.rollout_correction.bypass_mode=True` does not "
            "compute; turn bypass mode off or set `+algorithm.synapo.ea_gae_enabled=False`"
        )
    for name, (key, _default) in VERL_KEYS.items():
        value = getattr(params, name)
        if name in TO_VERL:  # the message shows the user's value, and what it becomes on verl
            _write(config, key, TO_VERL[name](value), f"algorithm.synapo.{name}", written=value)
        else:
            _write(config, key, value, f"algorithm.synapo.{name}")
    _write(config, TOKEN_MEAN[0], TOKEN_MEAN[1], "algorithm.synapo.preset")
    with open_dict(config):
        config.critic.enable = True
        config.critic.model.override_config[HF_CONFIG_KEY] = params_to_json(params)
    return params
