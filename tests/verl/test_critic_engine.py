"""SynAPO's two-head critic through verl's real value-model engine (FSDP2, gloo, one CPU process), with our loss.

Each case runs `tests/verl/critic_engine_run.py` in a fresh process: it sets verl's platform and a process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl")

pytestmark = pytest.mark.verl

ROOT = Path(__file__).resolve().parents[2]


def run_engine(preset: str, remove_padding: bool) -> dict:
    env = {**os.environ, "VERL_PLATFORM": "cpu", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.verl.critic_engine_run", preset, str(remove_padding)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SYNAPO_REPORT ")]
    assert proc.returncode == 0 and lines, f"engine run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1].removeprefix("SYNAPO_REPORT "))


@pytest.mark.parametrize("remove_padding", [False, True])
def test_two_head_critic_trains_through_verl_engine(remove_padding):
    report = run_engine("synapo", remove_padding)
    assert report["engine"] == "SynAPOValueEngine"
    assert report["heads"] == ["values", "values_global"]  # infer_batch returns both heads
    assert report["params_moved"]
    assert report["heads_differ_after_update"]  # the heads start equal and learn different targets
    assert report["scvl_pairs"] > 0 and report["scvl_loss"] > 0  # mixed scores -> a non-zero hinge
    assert report["global_loss"] > 0 and report["vf_loss"] > 0
    # scvl_weight 0.1; the logged hinge is the mean over pairs, the loss sums the split form over both sides of each
    total = report["vf_loss"] + report["global_loss"] + 0.1 * 2 * report["scvl_loss"]
    assert report["loss"] == pytest.approx(total, rel=2e-3)  # metrics are logged at reduced precision


def test_one_head_stock_loss_without_hvm_and_scvl():
    report = run_engine("ppo", False)
    assert report["heads"] == ["values"]
    assert report["global_loss"] is None and report["scvl_loss"] is None
    assert report["loss"] == pytest.approx(report["vf_loss"], rel=1e-6)
    assert report["params_moved"]
