"""Explicit, reversible patches that run SynAPO on a stock verl (in the style of liger-kernel's
`apply_liger_kernel_to_*`): a table of rows, and `apply` / `revert` / `check` loops over it.

    from synapo_ext.patches.verl import apply_synapo_to_verl, revert_synapo_to_verl
    apply_synapo_to_verl()       # what the `verl.plugins` entry point does in every verl process
    revert_synapo_to_verl()      # back to stock verl

A row `Patch(part, module, attribute, wrapper, params)` says: in `module`, `attribute` (a module global or
`Class.method`) becomes `wrapper(original)`, and the wrapper calls verl's original with `params` (the row's
assumption). Rows without a wrapper are what SynAPO calls or overrides without replacing it (checked, never changed).
Every wrapper calls verl's original unchanged unless the run's `algorithm.adv_estimator` is `synapo` (or, on the
workers, unless the rows / the critic's `hf_config` carry SynAPO's fields, which only a `synapo` run writes).

Version policy (`TABLES` holds one table per tested verl version):
    - each row is applied when its module is imported (`_hooks.when_imported`; a process that never imports the
      trainer or the engines never pays for importing them), after its assumption is checked: the attribute
      exists and takes `params`. A row whose assumption fails is left unapplied and recorded; nothing is logged at
      import, so a `gae` run on any verl is untouched and quiet.
    - a `synapo` run is checked in the driver while verl prepares its config (`need_critic`, before Ray starts):
      every row's module is imported and every failure refuses the run, naming `module.attribute`. A verl version
      not in `TABLES` uses the newest tested table; if every assumption holds, the run goes on with one WARNING
      naming the untested version.

Parts (the flags of `apply_synapo_to_verl`), verl 0.9.1:
    estimator     `core_algos.register_adv_est("synapo")`: the name `algorithm.adv_estimator` uses.
    critic        `need_critic` (where verl defines it and every module that binds it): the version check above, the
                  critic on for synapo, the preset written onto verl's keys (`synapo_ext.verl.config.prepare_config`).
    advantage     `compute_advantage` (ray_trainer, v1.utils) and V1 `PPOTrainer._compute_advantage`: values,
                  entropy and token ids to the estimator, the critic's extra targets written back; the value
                  warm-up's stopping rule saved and restored with `PPOTrainer._save/_load_checkpoint`.
    critic_loss   `v1.trainer_base.value_loss` (the critic's loss callable): HVM global head + SCVL hinge.
    value_engine  `EngineRegistry` (value_model, fsdp/fsdp2, cuda+nvidia, npu+huawei): two critic outputs.
    positive_lm   `ppo_loss` (losses, engine_workers) and `FSDPEngine.forward_backward_batch`: VAPO's
                  positive-example LM loss, normalised by the correct responses' tokens of the mini-batch.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ._hooks import cancel_hooks, when_imported

__all__ = [
    "PARTS",
    "PINNED_VERL",
    "TABLES",
    "Patch",
    "apply_synapo_to_verl",
    "check_verl_patches",
    "revert_synapo_to_verl",
    "rows_for",
    "verl_version",
]

logger = logging.getLogger(__name__)

PARTS = ("estimator", "critic", "advantage", "critic_loss", "value_engine", "positive_lm")


@dataclass(frozen=True)
class Patch:
    """One row of the patch table.

    part: the `apply_synapo_to_verl` flag that turns the row on.
    module: the module that binds `attribute`.
    attribute: `name` (module global) or `Class.name` (replaced on the class); dotted paths are followed.
    wrapper: `"module:function"`. For a replacement, `function(original) -> replacement`; with `register=True`,
        `function(module) -> undo`, which registers SynAPO's piece through `attribute`. None: checked only.
    params: the leading parameter names the attribute must take (None: it must exist).
    optional: the module only copies the binding (`from x import f`): a missing module or attribute is no error.
    register: the row registers something (see `wrapper`) instead of replacing `attribute`.
    """

    part: str
    module: str
    attribute: str
    wrapper: str | None
    params: tuple[str, ...] | None = None
    optional: bool = False
    register: bool = False

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attribute}"


_ADV = ("data", "adv_estimator", "gamma", "lam", "num_repeat", "norm_adv_by_std_in_grpo", "config")
_LOSS = ("config", "model_output", "data", "dp_group")
_TB = "verl.trainer.ppo.v1.trainer_base"
_IMPL = "verl.workers.engine.fsdp.transformer_impl"
_PAD = "verl.workers.utils.padding"
_NEED_CRITIC = "synapo_ext.patches.verl:wrap_need_critic"

VERL_0_9_1: tuple[Patch, ...] = (
    Patch("estimator", "verl.trainer.ppo.core_algos", "register_adv_est",
          "synapo_ext.patches.verl:_register_estimator", ("name_or_enum",), register=True),
    Patch("critic", "verl.trainer.ppo.utils", "need_critic", _NEED_CRITIC, ("config",)),
    Patch("critic", "verl.trainer.main_ppo", "need_critic", _NEED_CRITIC, ("config",), optional=True),
    Patch("critic", "verl.trainer.main_ppo_v0", "need_critic", _NEED_CRITIC, ("config",), optional=True),
    Patch("critic", "verl.trainer.ppo.ray_trainer", "need_critic", _NEED_CRITIC, ("config",), optional=True),
    Patch("critic", _TB, "need_critic", _NEED_CRITIC, ("config",), optional=True),
    Patch("advantage", "verl.trainer.ppo.ray_trainer", "compute_advantage",
          "synapo_ext.verl.estimator:wrap_compute_advantage", _ADV),
    Patch("advantage", "verl.trainer.ppo.v1.utils", "compute_advantage",
          "synapo_ext.verl.estimator:wrap_compute_advantage", _ADV),
    Patch("advantage", _TB, "PPOTrainer._compute_advantage", "synapo_ext.verl.trainer:wrap_v1_compute_advantage",
          ("self", "batch", "metrics")),
    Patch("advantage", _TB, "PPOTrainer._save_checkpoint", "synapo_ext.verl.warmup:wrap_save_checkpoint", ("self",)),
    Patch("advantage", _TB, "PPOTrainer._load_checkpoint", "synapo_ext.verl.warmup:wrap_load_checkpoint", ("self",)),
    Patch("advantage", _TB, "tq.kv_batch_get", None, ("keys", "partition_id", "select_fields")),
    Patch("advantage", _TB, "tq.kv_batch_put", None, ("keys", "partition_id", "fields")),
    Patch("advantage", _PAD, "response_from_nested", None, ("tensor", "response_mask")),
    Patch("advantage", _PAD, "response_to_nested", None, ("tensor", "response_mask")),
    Patch("critic_loss", _TB, "value_loss", "synapo_ext.patches.verl:_value_loss", _LOSS),
    Patch("critic_loss", "verl.workers.utils.losses", "value_loss", None, _LOSS),
    Patch("critic_loss", _PAD, "no_padding_2_padding", None, ("tensor", "data")),
    Patch("value_engine", "verl.workers.engine", "EngineRegistry.register", "synapo_ext.patches.verl:_register_engine",
          ("model_type", "backend", "device", "vendor"), register=True),
    Patch("value_engine", _IMPL, "FSDPEngineWithValueHead._build_module", None, ("self",)),
    Patch("value_engine", _IMPL, "FSDPEngineWithValueHead.prepare_model_outputs", None,
          ("self", "output", "output_args", "micro_batch", "logits_processor_func")),
    Patch("value_engine", _IMPL, "FSDPEngineWithValueHead.forward_backward_batch", None,
          ("self", "data", "loss_function", "forward_only")),
    Patch("positive_lm", "verl.workers.utils.losses", "ppo_loss", "synapo_ext.verl.actor:wrap_ppo_loss", _LOSS),
    Patch("positive_lm", "verl.workers.engine_workers", "ppo_loss", "synapo_ext.verl.actor:wrap_ppo_loss", _LOSS,
          optional=True),
    Patch("positive_lm", _IMPL, "FSDPEngine.forward_backward_batch",
          "synapo_ext.verl.actor:wrap_forward_backward_batch", ("self", "data", "loss_function", "forward_only")),
)  # fmt: skip

TABLES: dict[str, tuple[Patch, ...]] = {"0.9.1": VERL_0_9_1}
"""verl version -> its patch table; every version here is tested (tests/verl, including the real runs)."""
PINNED_VERL = "0.9.1"  # what `synapo-ext[verl]` installs
ENGINE_KEYS = (("cuda", "nvidia"), ("npu", "huawei"))

_undo: dict[str, Callable[[], None]] = {}  # row name -> how to restore verl's original
_failed: dict[str, str] = {}  # row name -> why its assumption does not hold in this process
_warned: set[str] = set()  # untested versions already warned about in this process
_applied_rows: tuple[Patch, ...] = ()


def verl_version() -> str:
    """The installed verl's version (`verl.__version__`, what verl reports about itself).

    Raises:
        RuntimeError: verl is not installed.
    """
    try:
        import verl
    except ImportError as exc:
        raise RuntimeError("synapo_ext's verl patches need verl, which is not installed") from exc
    return str(verl.__version__)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string, ignoring pre/dev/local parts: "0.10.0.dev0" -> (0, 10, 0)."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def rows_for(version: str) -> tuple[tuple[Patch, ...], bool]:
    """The patch table for `version` and whether that version is tested (else: the newest tested table)."""
    if version in TABLES:
        return TABLES[version], True
    return TABLES[max(TABLES, key=_release)], False


def _resolve(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _lookup(module: ModuleType, attribute: str) -> tuple[Any, str, Any]:
    """(owner, name, value) of a dotted attribute path; AttributeError names the missing piece."""
    owner: Any = module
    *path, name = attribute.split(".")
    for piece in path:
        owner = getattr(owner, piece)
    return owner, name, getattr(owner, name)


def _assumption(row: Patch, module: ModuleType) -> str | None:
    """Why the row's assumption fails in `module` (None: it holds)."""
    try:
        _, _, value = _lookup(module, row.attribute)
    except AttributeError:
        return f"`{row.name}` does not exist"
    if row.params is None:
        return None
    target = getattr(value, "__synapo_wraps__", value)  # a wrapper of ours: check verl's original
    try:
        params = tuple(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return f"`{row.name}` is not a function"
    if params[: len(row.params)] != row.params:
        return f"`{row.name}` takes {params}, synapo_ext calls it with {row.params}"
    return None


def _apply_row(row: Patch, module: ModuleType) -> None:
    """Check the row's assumption, then apply it (idempotent); a failed assumption is recorded, not raised."""
    reason = _assumption(row, module)
    if reason is not None:
        if not row.optional:
            _failed[row.name] = reason
        logger.debug("synapo_ext: not applying %s: %s", row.name, reason)
        return
    _failed.pop(row.name, None)
    if row.wrapper is None or row.name in _undo:
        return
    if row.register:
        _undo[row.name] = _resolve(row.wrapper)(module)
        return
    owner, name, current = _lookup(module, row.attribute)
    had_own = name in vars(owner) if isinstance(owner, type) else True
    if getattr(current, "__synapo_wraps__", None) is not None:  # bound (`from x import f`) after we patched x
        current = current.__synapo_wraps__
    else:
        setattr(owner, name, _resolve(row.wrapper)(current))

    def undo(owner=owner, name=name, current=current, had_own=had_own) -> None:
        if had_own:
            setattr(owner, name, current)
        else:  # the class inherited it: drop ours, the parent's shows again
            delattr(owner, name)

    _undo[row.name] = undo


def _hook(row: Patch) -> Callable[[ModuleType], None]:
    def apply(module: ModuleType) -> None:
        _apply_row(row, module)

    apply.__module__ = __name__  # `cancel_hooks(__name__)` finds it
    return apply


def apply_synapo_to_verl(
    *,
    estimator: bool = True,
    critic: bool = True,
    advantage: bool = True,
    critic_loss: bool = True,
    value_engine: bool = True,
    positive_lm: bool = True,
) -> None:
    """Install SynAPO into verl (see the module docstring); each flag turns one part on. Idempotent.

    Never raises for a verl version or a broken assumption (a `synapo` run is refused later, in
    `check_verl_patches`); raises `RuntimeError` only if verl is not installed.
    """
    global _applied_rows
    flags = dict(estimator=estimator, critic=critic, advantage=advantage, critic_loss=critic_loss,
                 value_engine=value_engine, positive_lm=positive_lm)  # fmt: skip
    rows, _ = rows_for(verl_version())
    _applied_rows = tuple(row for row in rows if flags[row.part])
    for row in _applied_rows:
        when_imported(row.module, _hook(row))
    main = sys.modules.get("__main__")
    if critic and main is not None and hasattr(main, "need_critic"):  # `python -m verl.trainer.main_ppo`, late
        _apply_row(Patch("critic", "__main__", "need_critic", _NEED_CRITIC, ("config",), optional=True), main)


def check_verl_patches() -> str:
    """Import every applied row's module and refuse if any assumption fails; the verl version on success.

    For a verl version not in `TABLES` whose assumptions all hold, logs one WARNING naming the version.

    Raises:
        RuntimeError: a row's assumption fails, naming `module.attribute` and why, or the patches were not applied.
    """
    version = verl_version()
    _, tested = rows_for(version)
    if not _applied_rows:
        raise RuntimeError("synapo_ext's verl patches are not applied in this process (apply_synapo_to_verl)")
    for row in _applied_rows:
        if not row.optional:
            importlib.import_module(row.module)  # runs the row's hook
    for row in _applied_rows:
        module = sys.modules.get(row.module)
        if module is not None and row.name not in _failed and row.name not in _undo and row.wrapper is not None:
            _apply_row(row, module)  # a module imported before its hook was attached
    if _failed:
        listed = "; ".join(why for _, why in sorted(_failed.items()))
        tested_list = ", ".join(sorted(TABLES, key=_release))
        raise RuntimeError(
            f"algorithm.adv_estimator=synapo cannot run on verl {version}: {listed}. synapo_ext is tested on verl "
            f"{tested_list} (pip install 'synapo-ext[verl]' pins verl=={PINNED_VERL})"
        )
    if not tested and version not in _warned:
        _warned.add(version)
        logger.warning(
            "synapo_ext: verl %s is untested (tested: %s); every patched function has the signature synapo_ext "
            "expects, so the run goes on",
            version, ", ".join(sorted(TABLES, key=_release)),
        )  # fmt: skip
    return version


def wrap_need_critic(original: Any) -> Any:
    """verl's `need_critic(config)`: for `synapo`, check the patches (once per run, in the driver), prepare the
    config and turn the critic on; any other estimator goes to `original`."""
    from synapo_ext.verl.config import is_prepared, is_synapo, prepare_config

    def need_critic(config):
        if is_synapo(config):
            if not is_prepared(config):  # the driver; the TaskRunner gets the prepared config
                check_verl_patches()
            prepare_config(config)  # idempotent; raises a clear error for a bad synapo config
            return True
        return original(config)

    need_critic.__synapo_wraps__ = original
    need_critic.__doc__ = original.__doc__
    return need_critic


def _register_estimator(core_algos: ModuleType) -> Callable[[], None]:
    from synapo_ext.verl.estimator import compute_synapo_advantage

    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    current = registry.get("synapo")
    if getattr(current, "__name__", None) == "synapo_unavailable":  # the plugin's stub from a failed install
        del registry["synapo"]
    if registry.get("synapo") is not compute_synapo_advantage:
        core_algos.register_adv_est("synapo")(compute_synapo_advantage)

    def undo() -> None:
        if getattr(registry.get("synapo"), "__module__", None) == "synapo_ext.verl.estimator":
            del registry["synapo"]

    return undo


def _register_engine(engine_pkg: ModuleType) -> Callable[[], None]:
    from synapo_ext.verl.engine import value_engine_class

    engine = value_engine_class()
    registry = engine_pkg.EngineRegistry._engines.setdefault("value_model", {})
    added = []
    for backend in ("fsdp", "fsdp2"):
        for device, vendor in ENGINE_KEYS:
            if registry.get(backend, {}).get((device, vendor)) is not engine:
                engine_pkg.EngineRegistry.register(
                    model_type="value_model", backend=backend, device=device, vendor=vendor
                )(engine)
                added.append((backend, (device, vendor)))

    def undo() -> None:
        for backend, key in added:
            registry.get(backend, {}).pop(key, None)

    return undo


def _value_loss(_original: Any) -> Any:
    # A module-level function (not a closure): verl pickles the critic's loss callable to the critic worker.
    from synapo_ext.verl.critic import synapo_value_loss

    return synapo_value_loss


def revert_synapo_to_verl() -> None:
    """Undo `apply_synapo_to_verl`: restore every replaced attribute, unregister the estimator and the engine."""
    global _applied_rows
    cancel_hooks(__name__)
    for name in reversed(list(_undo)):
        _undo.pop(name)()
    _failed.clear()
    _applied_rows = ()
