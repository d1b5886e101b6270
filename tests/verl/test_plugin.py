"""The `verl.plugins` entry point: found after `pip install`, loaded by `import verl`, loud when it fails; the patches
are idempotent, reversible and version-checked."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl")

from synapo_ext.patches import verl as patches  # noqa: E402

from synapo_ext.verl import plugin  # noqa: E402

pytestmark = pytest.mark.verl

PROBE = (
    "import verl, json, sys\n"
    "from verl.trainer.ppo import core_algos\n"
    "fn = core_algos.ADV_ESTIMATOR_REGISTRY.get('synapo')\n"
    "print('SYNAPO', getattr(fn, '__module__', None))\n"
    "assert 'trl' not in sys.modules, 'importing verl with the plugin pulled in trl'\n"
)


def probe(**env) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [ln for ln in proc.stdout.splitlines() if ln.startswith("SYNAPO ")][-1].split()[1]


def test_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="verl.plugins")
    assert "synapo_ext.verl.plugin" in {ep.value for ep in eps if ep.name == "synapo"}


def test_import_verl_registers_synapo_in_a_fresh_process():
    assert probe() == "synapo_ext.verl.estimator"


def test_external_modules_route_when_entry_points_are_off():
    assert probe(VERL_USE_EXTERNAL_PLUGINS="none") == "None"
    assert probe(VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="synapo_ext.verl.plugin") == (
        "synapo_ext.verl.estimator"
    )


def test_failed_install_is_loud_and_synapo_fails_clearly(monkeypatch, caplog):
    from verl.trainer.ppo import core_algos

    def broken():
        raise RuntimeError("synapo_ext's verl patches target verl==0.9.1; found verl 9.9")

    patches.revert_synapo_to_verl()
    monkeypatch.setattr(patches, "check_verl_version", broken)
    try:
        with caplog.at_level(logging.ERROR, logger="synapo_ext.verl"):
            assert plugin.install() is False
        assert any(r.levelno >= logging.ERROR and "synapo" in r.getMessage() for r in caplog.records)
        with pytest.raises(RuntimeError, match="synapo_ext failed to load.*9.9"):
            core_algos.get_adv_estimator_fn("synapo")(token_level_rewards=None, response_mask=None)
    finally:
        monkeypatch.undo()
        assert plugin.install() is True
    assert core_algos.get_adv_estimator_fn("synapo").__module__ == "synapo_ext.verl.estimator"


def test_wrong_verl_version_is_refused(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.9.0" if name == "verl" else real(name))
    with pytest.raises(RuntimeError, match=r"support verl==0\.9\.1 .*found verl 0\.9\.0"):
        patches.apply_synapo_to_verl()


def test_importing_the_package_changes_nothing_in_verl():
    """Only the plugin (or `apply_synapo_to_verl`) patches verl; importing the package's modules does not."""
    code = (
        "import sys, synapo_ext.verl, synapo_ext.verl.config, synapo_ext.verl.estimator, synapo_ext.verl.trainer\n"
        "import synapo_ext.verl.critic, synapo_ext.verl.actor, synapo_ext.verl.engine, synapo_ext.verl.warmup\n"
        "from synapo_ext.patches import _hooks\n"
        "from verl.trainer.ppo import core_algos\n"
        "assert 'synapo' not in core_algos.ADV_ESTIMATOR_REGISTRY\n"
        "assert not _hooks._pending, _hooks._pending\n"
    )
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _targets():
    """Every patched attribute, walked from the version table `patches.TARGETS` (importing each module)."""
    import importlib

    targets = patches.TARGETS[patches.check_verl_version()]
    for name in targets.modules():
        importlib.import_module(name)

    def bound(names, attr):
        return tuple(getattr(importlib.import_module(n), attr) for n in names if n in sys.modules)

    trainer_cls = importlib.import_module(targets.trainer_base).PPOTrainer
    return {
        "need_critic": bound(targets.need_critic, "need_critic"),
        "compute_advantage": bound(targets.compute_advantage, "compute_advantage"),
        "trainer": (
            *(trainer_cls.__dict__[m] for m in patches.TRAINER_METHODS),
            importlib.import_module(targets.fsdp_engine).FSDPEngine.__dict__["forward_backward_batch"],
        ),
        "value_loss": importlib.import_module(targets.trainer_base).value_loss,
        "ppo_loss": bound(targets.ppo_loss, "ppo_loss"),
        "estimator": importlib.import_module(targets.core_algos).ADV_ESTIMATOR_REGISTRY.get("synapo"),
        "engines": dict(importlib.import_module(targets.engine).EngineRegistry._engines["value_model"]["fsdp2"]),
    }


def test_apply_is_idempotent_and_revert_restores_stock_verl():
    _targets()  # import every target module, so every patch is live
    patched = _targets()
    assert patched["estimator"] is not None
    for key in ("need_critic", "compute_advantage", "trainer", "ppo_loss"):
        assert patched[key] and all(getattr(f, "__synapo_wraps__", None) is not None for f in patched[key]), key
    assert patched["value_loss"].__module__ == "synapo_ext.verl.critic"
    patches.apply_synapo_to_verl()  # again: nothing changes
    assert _targets() == patched
    patches.revert_synapo_to_verl()
    try:
        stock = _targets()
        assert stock["estimator"] is None
        assert stock["value_loss"].__module__ == "verl.workers.utils.losses"
        for key in ("need_critic", "compute_advantage", "trainer", "ppo_loss"):
            assert all(getattr(f, "__synapo_wraps__", None) is None for f in stock[key]), key
        assert all(cls.__module__.startswith("verl.") for cls in stock["engines"].values())
        patches.revert_synapo_to_verl()  # twice: still stock
        assert _targets() == stock
    finally:
        patches.apply_synapo_to_verl()
    again = _targets()
    assert again["estimator"] is patched["estimator"]
    assert again["engines"].keys() == patched["engines"].keys()
