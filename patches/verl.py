"""Explicit, reversible patches that run SynAPO on a stock verl 0.9.1 (in the style of liger-kernel's
`apply_liger_kernel_to_*`).

    from synapo_ext.patches.verl import apply_synapo_to_verl, revert_synapo_to_verl
    apply_synapo_to_verl()       # what the `verl.plugins` entry point does in every verl process
    revert_synapo_to_verl()      # back to stock verl

Each part is one flag and one small wrapper. A wrapper calls verl's original unchanged unless the run's
`algorithm.adv_estimator` is `synapo` (or, on the workers, unless the rows / the critic's `hf_config` carry SynAPO's
fields, which only a `synapo` run writes). Applying twice is a no-op. Where each part patches verl is a table per
supported verl version (`TARGETS`); any other verl is refused with the installed and the supported versions.
Each patch is attached to its module's import (`_hooks.when_imported`), so a process that never imports the trainer
or the engines never pays for importing them.

Flags and targets (verl 0.9.1):
    estimator     `core_algos.register_adv_est("synapo")`: the name `algorithm.adv_estimator` uses.
    critic        `ppo.utils.need_critic` (+ its copies in main_ppo and the trainers): the critic on for synapo,
                  the preset written onto verl's keys (`synapo_ext.verl.config.prepare_config`).
    advantage     `ray_trainer.compute_advantage` (+ `v1.utils`) and V1 `PPOTrainer._compute_advantage`: values,
                  entropy and token ids to the estimator; the critic's extra targets written back; the value
                  warm-up's stopping rule, saved and restored with V1 `PPOTrainer._save/_load_checkpoint`.
    critic_loss   `v1.trainer_base.value_loss` (the critic's loss callable): HVM global head + SCVL hinge.
    value_engine  `EngineRegistry` (value_model, fsdp/fsdp2, cuda+nvidia, npu+huawei): two critic outputs.
    positive_lm   `losses.ppo_loss` (+ its copy in `engine_workers`): VAPO's positive-example LM loss, normalised
                  by the correct responses' tokens that `FSDPEngine.forward_backward_batch` counts per mini-batch.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ._hooks import cancel_hooks, when_imported

__all__ = [
    "PINNED_VERL",
    "TARGETS",
    "VerlTargets",
    "apply_synapo_to_verl",
    "check_verl_version",
    "revert_synapo_to_verl",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerlTargets:
    """Where each part patches one verl version: module names (the attribute per part is fixed)."""

    core_algos: str  # estimator: `ADV_ESTIMATOR_REGISTRY`
    need_critic: tuple[str, ...]  # critic: every module that binds `need_critic`
    compute_advantage: tuple[str, ...]  # advantage: every module that binds `compute_advantage`
    trainer_base: str  # advantage + critic_loss: V1 `PPOTrainer` and its `value_loss` binding
    engine: str  # value_engine: `EngineRegistry`
    ppo_loss: tuple[str, ...]  # positive_lm: every module that binds `ppo_loss`
    fsdp_engine: str  # positive_lm: `FSDPEngine.forward_backward_batch` (counts the correct rows' tokens)

    def modules(self) -> tuple[str, ...]:
        """Every module a part patches."""
        names = (self.core_algos, *self.need_critic, *self.compute_advantage, self.trainer_base, self.engine)
        return tuple(dict.fromkeys((*names, *self.ppo_loss, self.fsdp_engine)))


TARGETS: dict[str, VerlTargets] = {
    "0.9.1": VerlTargets(
        core_algos="verl.trainer.ppo.core_algos",
        need_critic=(
            "verl.trainer.ppo.utils",
            "verl.trainer.main_ppo",
            "verl.trainer.main_ppo_v0",
            "verl.trainer.ppo.ray_trainer",
            "verl.trainer.ppo.v1.trainer_base",
        ),
        compute_advantage=("verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.v1.utils"),
        trainer_base="verl.trainer.ppo.v1.trainer_base",
        engine="verl.workers.engine",
        ppo_loss=("verl.workers.utils.losses", "verl.workers.engine_workers"),
        fsdp_engine="verl.workers.engine.fsdp.transformer_impl",
    ),
}
PINNED_VERL = "0.9.1"  # what `synapo-ext[verl]` installs; every version in TARGETS is tested
ENGINE_KEYS = (("cuda", "nvidia"), ("npu", "huawei"))
TRAINER_METHODS = ("_compute_advantage", "_save_checkpoint", "_load_checkpoint")

# (module, attribute) -> verl's original, for every attribute we replaced (revert restores exactly these)
_originals: dict[tuple[str, str], Any] = {}
_engine_keys: list[tuple[str, str]] = []
_estimator_registered = False
_applied: VerlTargets | None = None  # the table `apply_synapo_to_verl` used (revert undoes the same modules)


def check_verl_version() -> str:
    """The installed verl version; `RuntimeError` unless `TARGETS` has it."""
    try:
        version = importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError("synapo_ext's verl patches need verl, which is not installed") from exc
    if version not in TARGETS:
        supported = ", ".join(f"verl=={v}" for v in TARGETS)
        raise RuntimeError(
            f"synapo_ext's verl patches support {supported} (each checked file by file); found verl {version}. "
            f"Install `synapo-ext[verl]` (pins verl=={PINNED_VERL}) or a synapo_ext release for verl {version}"
        )
    return version


def _replace(module: ModuleType, attr: str, make: Callable[[Any], Any]) -> None:
    """`module.attr = make(original)` unless it is already ours (idempotent)."""
    key = (module.__name__, attr)
    if key in _originals:
        return
    current = getattr(module, attr)
    wrapped = getattr(current, "__synapo_wraps__", None)
    if wrapped is not None:  # bound by `from <patched module> import attr`: already ours, remember verl's
        _originals[key] = wrapped
        return
    _originals[key] = current
    setattr(module, attr, make(current))


def _on(name: str, attr: str, make: Callable[[Any], Any]) -> None:
    def patch(module: ModuleType) -> None:
        _replace(module, attr, make)

    patch.__module__ = __name__
    when_imported(name, patch)


def _register_estimator(core_algos: ModuleType) -> None:
    global _estimator_registered
    from synapo_ext.verl.estimator import compute_synapo_advantage

    current = core_algos.ADV_ESTIMATOR_REGISTRY.get("synapo")
    if getattr(current, "__name__", None) == "synapo_unavailable":  # the plugin's stub from a failed install
        del core_algos.ADV_ESTIMATOR_REGISTRY["synapo"]
    if current is not compute_synapo_advantage:
        core_algos.register_adv_est("synapo")(compute_synapo_advantage)
    _estimator_registered = True


def _register_engine(engine_pkg: ModuleType) -> None:
    from synapo_ext.verl.engine import value_engine_class

    SynAPOValueEngine = value_engine_class()  # noqa: N806

    registry = engine_pkg.EngineRegistry._engines.setdefault("value_model", {})
    for backend in ("fsdp", "fsdp2"):
        for key in ENGINE_KEYS:
            if registry.get(backend, {}).get(key) is SynAPOValueEngine:
                continue
            engine_pkg.EngineRegistry.register(
                model_type="value_model", backend=backend, device=key[0], vendor=key[1]
            )(SynAPOValueEngine)
            _engine_keys.append((backend, *key))


def _wrap_need_critic(original: Any) -> Any:
    from synapo_ext.verl.config import is_synapo, prepare_config

    def need_critic(config):
        if is_synapo(config):
            prepare_config(config)  # idempotent; raises a clear error for a bad synapo config
            return True
        return original(config)

    need_critic.__synapo_wraps__ = original
    need_critic.__doc__ = original.__doc__
    return need_critic


def _wrap_trainer_class(trainer_base: ModuleType) -> None:
    from synapo_ext.verl.trainer import wrap_v1_compute_advantage
    from synapo_ext.verl.warmup import wrap_load_checkpoint, wrap_save_checkpoint

    wraps = (wrap_v1_compute_advantage, wrap_save_checkpoint, wrap_load_checkpoint)
    for attr, wrap in zip(TRAINER_METHODS, wraps, strict=True):
        _replace_method(trainer_base.PPOTrainer, attr, wrap)


def _replace_method(cls: type, attr: str, wrap: Callable[[Any], Any]) -> None:
    """`cls.attr = wrap(original)` unless it is already ours (idempotent; revert restores it)."""
    current = cls.__dict__[attr]
    if getattr(current, "__synapo_wraps__", None) is None:
        _originals[(f"{cls.__module__}:{cls.__qualname__}", attr)] = current
        setattr(cls, attr, wrap(current))


def _wrap_fsdp_engine(transformer_impl: ModuleType) -> None:
    from synapo_ext.verl.actor import wrap_forward_backward_batch

    _replace_method(transformer_impl.FSDPEngine, "forward_backward_batch", wrap_forward_backward_batch)


def apply_synapo_to_verl(
    *,
    estimator: bool = True,
    critic: bool = True,
    advantage: bool = True,
    critic_loss: bool = True,
    value_engine: bool = True,
    positive_lm: bool = True,
) -> None:
    """Install SynAPO into verl (see the module table); each flag turns one part on. Idempotent.

    Raises:
        RuntimeError: verl is missing or its version is not in `TARGETS`.
    """
    global _applied
    targets = _applied = TARGETS[check_verl_version()]
    if estimator:
        when_imported(targets.core_algos, _register_estimator)
    if critic:
        for name in targets.need_critic:
            _on(name, "need_critic", _wrap_need_critic)
        main = sys.modules.get("__main__")
        if main is not None and hasattr(main, "need_critic"):
            _replace(main, "need_critic", _wrap_need_critic)
    if advantage:
        from synapo_ext.verl.estimator import wrap_compute_advantage

        for name in targets.compute_advantage:
            _on(name, "compute_advantage", wrap_compute_advantage)
        when_imported(targets.trainer_base, _wrap_trainer_class)
    if critic_loss:
        _on(targets.trainer_base, "value_loss", _synapo_value_loss)
    if value_engine:
        when_imported(targets.engine, _register_engine)
    if positive_lm:
        from synapo_ext.verl.actor import wrap_ppo_loss

        for name in targets.ppo_loss:
            _on(name, "ppo_loss", wrap_ppo_loss)
        when_imported(targets.fsdp_engine, _wrap_fsdp_engine)


def _synapo_value_loss(_original: Any) -> Any:
    # A module-level function (not a closure): verl pickles the critic's loss callable to the critic worker.
    from synapo_ext.verl.critic import synapo_value_loss

    return synapo_value_loss


def revert_synapo_to_verl() -> None:
    """Undo `apply_synapo_to_verl`: restore every replaced attribute, unregister the estimator and the engine."""
    global _estimator_registered
    cancel_hooks(__name__)
    for (name, attr), original in list(_originals.items()):
        if ":" in name:  # a class's method: "<module>:<class>"
            module, cls = name.split(":")
            setattr(getattr(sys.modules[module], cls), attr, original)
        elif name in sys.modules:
            setattr(sys.modules[name], attr, original)
        del _originals[(name, attr)]
    targets = _applied or TARGETS[PINNED_VERL]
    if _estimator_registered and targets.core_algos in sys.modules:
        registry = sys.modules[targets.core_algos].ADV_ESTIMATOR_REGISTRY
        fn = registry.get("synapo")
        if fn is not None and fn.__module__ == "synapo_ext.verl.estimator":
            del registry["synapo"]
        _estimator_registered = False
    if _engine_keys and targets.engine in sys.modules:
        registry = sys.modules[targets.engine].EngineRegistry._engines["value_model"]
        for backend, device, vendor in _engine_keys:
            registry.get(backend, {}).pop((device, vendor), None)
        _engine_keys.clear()
