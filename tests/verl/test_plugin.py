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
from synapo_ext.patches import verl_plugin as plugin  # noqa: E402

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
    assert "synapo_ext.patches.verl_plugin" in {ep.value for ep in eps if ep.name == "synapo"}


def test_import_verl_registers_synapo_in_a_fresh_process():
    assert probe() == "synapo_ext.verl.estimator"


def test_external_modules_route_when_entry_points_are_off():
    assert probe(VERL_USE_EXTERNAL_PLUGINS="none") == "None"
    for name in ("synapo_ext.patches.verl_plugin", "synapo_ext.verl.plugin"):  # the second: the former name
        assert probe(VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES=name) == "synapo_ext.verl.estimator"


def test_failed_install_is_loud_and_synapo_fails_clearly(monkeypatch, caplog):
    from verl.trainer.ppo import core_algos

    def broken():
        raise RuntimeError("synapo_ext's verl patches need verl, which is not installed (9.9)")

    patches.revert_synapo_to_verl()
    monkeypatch.setattr(patches, "verl_version", broken)
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
    """Every row of the patch table for this verl: the object at `module.attribute` (importing each module), plus
    the registries the `register` rows write to."""
    import importlib

    rows, tested = patches.rows_for(patches.verl_version())
    assert tested
    out = {}
    for row in rows:
        try:
            module = importlib.import_module(row.module)
        except ImportError:
            assert row.optional, row.name
            continue
        out[row.name] = patches._lookup(module, row.attribute)[2]
    core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
    out["estimator"] = core_algos.ADV_ESTIMATOR_REGISTRY.get("synapo")
    engines = importlib.import_module("verl.workers.engine").EngineRegistry._engines["value_model"]
    out["engines"] = {k: dict(v) for k, v in engines.items()}
    return rows, out


def test_apply_is_idempotent_and_revert_restores_stock_verl():
    _targets()  # import every target module, so every patch is live
    rows, patched = _targets()
    replaced = [row for row in rows if row.wrapper is not None and not row.register and row.name in patched]
    assert patched["estimator"] is not None
    for row in replaced:
        value = patched[row.name]
        assert getattr(value, "__synapo_wraps__", None) is not None or value.__module__.startswith("synapo_ext"), row
    patches.apply_synapo_to_verl()  # again: nothing changes
    assert _targets()[1] == patched
    patches.revert_synapo_to_verl()
    try:
        _, stock = _targets()
        assert stock["estimator"] is None
        for row in replaced:
            value = stock[row.name]
            assert getattr(value, "__synapo_wraps__", None) is None and value.__module__.startswith("verl."), row
        assert all(c.__module__.startswith("verl.") for b in stock["engines"].values() for c in b.values())
        patches.revert_synapo_to_verl()  # twice: still stock
        assert _targets()[1] == stock
    finally:
        patches.apply_synapo_to_verl()
    _, again = _targets()
    assert again["estimator"] is patched["estimator"]
    assert again["engines"].keys() == patched["engines"].keys()
