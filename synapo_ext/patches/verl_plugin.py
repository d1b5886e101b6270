"""verl plugin entry point: importing this module installs SynAPO into verl (`apply_synapo_to_verl`).

verl imports it in every process that imports `verl` (CLI, TaskRunner actor, workers) through the `verl.plugins`
entry point in pyproject.toml. Where entry points are off (`VERL_USE_EXTERNAL_PLUGINS=none`), set
`VERL_USE_EXTERNAL_MODULES=synapo_ext.patches.verl_plugin` instead (on a cluster, also
`+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=synapo_ext.patches.verl_plugin`).

Installing only attaches the patch table's rows to their modules' imports; it does not judge the verl version (a
`synapo` run is checked in the driver, `synapo_ext.patches.verl.check_verl_patches`), so any other run stays quiet.
verl swallows plugin errors at DEBUG level, so an unexpected failure here is logged at ERROR and the `synapo`
estimator is registered as a stub that raises it.
"""

from __future__ import annotations

import logging

__all__ = ["INSTALL_ERROR", "install"]

logger = logging.getLogger("synapo_ext.verl")

INSTALL_ERROR: BaseException | None = None
"""Why `install()` failed in this process (None: installed)."""


def install() -> bool:
    """Apply `synapo_ext.patches.verl.apply_synapo_to_verl`; on failure log it and register the failing stub."""
    global INSTALL_ERROR
    try:
        from synapo_ext.patches.verl import apply_synapo_to_verl

        apply_synapo_to_verl()
    except Exception as exc:  # report loudly: verl would hide it at DEBUG
        INSTALL_ERROR = exc
        logger.error("synapo_ext: could not install SynAPO into verl; `synapo` runs will fail: %s", exc, exc_info=True)
        _register_stub(exc)
        return False
    INSTALL_ERROR = None
    return True


def _register_stub(error: BaseException) -> None:
    def synapo_unavailable(**kwargs):
        raise RuntimeError(f"algorithm.adv_estimator=synapo is unavailable: synapo_ext failed to load: {error}")

    try:
        from verl.trainer.ppo import core_algos

        core_algos.ADV_ESTIMATOR_REGISTRY["synapo"] = synapo_unavailable
    except Exception:  # verl itself is broken: nothing more to register
        logger.error("synapo_ext: verl's estimator registry is not importable either", exc_info=True)


install()
