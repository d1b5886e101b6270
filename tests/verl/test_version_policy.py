"""The verl version policy: the patch table's assumptions are checked for a verl version it was not tested on; a
broken one refuses a `synapo` run in the driver before Ray starts, naming the attribute; intact ones run with one
WARNING; a `gae` run never hears of it."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("verl")

from synapo_ext.patches import verl as patches  # noqa: E402

pytestmark = pytest.mark.verl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def table(monkeypatch):
    """Swap in another patch table and verl version; the real ones are re-applied afterwards."""

    def use(rows: tuple[patches.Patch, ...], version: str) -> None:
        patches.revert_synapo_to_verl()
        monkeypatch.setattr(patches, "TABLES", {"0.9.1": rows})
        monkeypatch.setattr(patches, "verl_version", lambda: version)
        monkeypatch.setattr(patches, "_warned", set())
        patches.apply_synapo_to_verl()

    yield use
    patches.revert_synapo_to_verl()
    monkeypatch.undo()
    patches.apply_synapo_to_verl()


def copy_of_verl_module(name: str, tmp_path: Path, old: str, new: str) -> str:
    """A copy of verl's module `name` with `old` replaced by `new` in its source, imported as its own module."""
    source = Path(importlib.util.find_spec(name).origin).read_text()
    assert old in source, old
    copy = f"synapo_copy_{name.replace('.', '_')}"
    path = tmp_path / f"{copy}.py"
    path.write_text(source.replace(old, new))
    spec = importlib.util.spec_from_file_location(copy, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[copy] = module
    spec.loader.exec_module(module)
    return copy


def with_module(rows: tuple[patches.Patch, ...], original: str, copy: str) -> tuple[patches.Patch, ...]:
    return tuple(replace(row, module=copy) if row.module == original else row for row in rows)


REAL = patches.TABLES["0.9.1"]


def test_renamed_attribute_is_refused_by_name(table, tmp_path):
    copy = copy_of_verl_module("verl.trainer.ppo.utils", tmp_path, "def need_critic(", "def needs_critic(")
    try:
        table(with_module(REAL, "verl.trainer.ppo.utils", copy), "0.10.0.dev0")
        with pytest.raises(RuntimeError, match=rf"verl 0\.10\.0\.dev0: `{copy}\.need_critic` does not exist"):
            patches.check_verl_patches()
    finally:
        sys.modules.pop(copy, None)


def test_changed_signature_is_refused_by_name(table, tmp_path):
    name = "verl.trainer.ppo.utils"
    copy = copy_of_verl_module(name, tmp_path, "def need_critic(config:", "def need_critic(cfg=None, *, config:")
    try:
        table(with_module(REAL, name, copy), "0.9.2")
        with pytest.raises(RuntimeError, match=rf"`{copy}\.need_critic` takes \('cfg', 'config'\)"):
            patches.check_verl_patches()
        assert getattr(sys.modules[copy].need_critic, "__synapo_wraps__", None) is None  # the row was not applied
    finally:
        sys.modules.pop(copy, None)


def test_untested_version_with_intact_attributes_runs_with_one_warning(table, caplog):
    table(REAL, "0.9.2")
    with caplog.at_level(logging.WARNING, logger=patches.__name__):
        assert patches.check_verl_patches() == "0.9.2"
        assert patches.check_verl_patches() == "0.9.2"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "verl 0.9.2 is untested" in warnings[0].getMessage()
    from verl.trainer.ppo import core_algos, utils

    assert core_algos.get_adv_estimator_fn("synapo").__module__ == "synapo_ext.verl.estimator"
    assert getattr(utils.need_critic, "__synapo_wraps__", None) is not None


def test_tested_version_is_quiet(caplog):
    with caplog.at_level(logging.WARNING, logger=patches.__name__):
        assert patches.check_verl_patches() == "0.9.1"
    assert not caplog.records


def test_version_release_parts():
    assert patches._release("0.10.0.dev0") == (0, 10, 0)
    assert patches._release("0.9.1+local") == (0, 9, 1)
    assert patches.rows_for("0.9.1") == (REAL, True)
    assert patches.rows_for("0.10.0.dev0") == (REAL, False)


def _driver(estimator: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The stock `python -m verl.trainer.main_ppo` driver, with verl made to look like another release."""
    environ = {
        **os.environ,
        "VERL_USE_EXTERNAL_MODULES": "tests.verl.realrun.fake_version",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        **env,
    }
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", f"algorithm.adv_estimator={estimator}"]
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)


def test_driver_refuses_synapo_before_ray_starts(tmp_path):
    """A renamed method of an untested verl: the driver stops while it prepares the config, naming the method;
    Ray never starts (verl prints `ray init kwargs` just before `ray.init`)."""
    proc = _driver(
        "synapo",
        tmp_path,
        SYNAPO_TEST_VERL_VERSION="0.10.0.dev0",
        SYNAPO_TEST_RENAME="verl.trainer.ppo.v1.trainer_base:PPOTrainer._compute_advantage",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "cannot run on verl 0.10.0.dev0" in out, out[-3000:]
    assert "PPOTrainer._compute_advantage` does not exist" in out, out[-3000:]
    assert "ray init kwargs" not in out


def test_gae_with_a_broken_assumption_logs_no_error():
    """Importing verl and every patched module on an untested verl whose method was renamed: the plugin is quiet
    (nothing at WARNING or above from synapo_ext), and a `gae` config goes to verl's own `need_critic`."""
    code = (
        "import importlib, logging\n"
        "import verl\n"
        "from synapo_ext.patches import verl as patches\n"
        "for row in patches.rows_for(patches.verl_version())[0]:\n"
        "    if not row.optional: importlib.import_module(row.module)\n"
        "from omegaconf import OmegaConf\n"
        "from verl.trainer.ppo.utils import need_critic\n"
        "cfg = OmegaConf.create({'algorithm': {'adv_estimator': 'gae'}, 'critic': {'enable': None}})\n"
        "assert need_critic(cfg) is True\n"
        "assert list(patches._failed) == ['verl.trainer.ppo.v1.trainer_base.PPOTrainer._compute_advantage']\n"
        "print('OK')\n"
    )
    environ = {
        **os.environ,
        "VERL_USE_EXTERNAL_MODULES": "tests.verl.realrun.fake_version",
        "SYNAPO_TEST_VERL_VERSION": "0.10.0.dev0",
        "SYNAPO_TEST_RENAME": "verl.trainer.ppo.v1.trainer_base:PPOTrainer._compute_advantage",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    noisy = [ln for ln in proc.stderr.splitlines() if "synapo" in ln.lower() and ("ERROR" in ln or "WARNING" in ln)]
    assert not noisy, noisy
    assert "ERROR" not in proc.stderr
