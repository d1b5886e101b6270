"""SynAPO's loss terms and gradients do not depend on how verl splits a mini-batch: over data-parallel ranks (FSDP2
over 2 gloo ranks) or into token-based micro-batches (`use_dynamic_bsz=True`), nor on verl's packed-sequence path
(`use_remove_padding=True`, eager attention on CPU).

Each case is one fixed mini-batch (16 rows, rows permuted so that SCVL pairs straddle the two ranks) through verl's
real FSDP2 critic and actor engines in float32 (`tests/verl/dp_engine_run.py`, a subprocess per case). Compared
with 1 rank and fixed micro-batches: verl's value loss, HVM's global loss, SCVL's hinge, the PPO loss, the
positive-example LM loss and every gradient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402

pytestmark = pytest.mark.verl

ROOT = Path(__file__).resolve().parents[2]
TERMS = {  # the terms verl normalises by the whole mini-batch (logged with SUM aggregation)
    "critic": ("critic/vf_loss", "critic/synapo/global_loss", "critic/synapo/scvl_loss", "loss"),
    "actor": ("actor/pg_loss", "actor/synapo/positive_lm_loss", "loss"),
}
CASES = {
    "1 rank": (1, "fixed"),
    "2 ranks": (2, "fixed"),
    "2 ranks, token micro-batches": (2, "dynamic"),
    "1 rank, packed sequences": (1, "packed"),
}


def run_case(out: Path, ranks: int, mode: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    env = {**os.environ, "VERL_PLATFORM": "cpu", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tests.verl.dp_engine_run", "critic,actor", str(ranks), mode, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"engine run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    with open(out / "report.json") as f:
        return json.load(f), load_file(str(out / "grads.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("dp")
    return {name: run_case(root / f"case{i}", *case) for i, (name, case) in enumerate(CASES.items())}


@pytest.mark.parametrize("case", [c for c in CASES if c != "1 rank"])
def test_loss_terms_and_gradients_match_one_rank(runs, case):
    ref, ref_grads = runs["1 rank"]
    report, grads = runs[case]
    assert report["scvl_pairs"] > 0 and report["lm_rows"] > 0
    if report["world"] > 1:
        assert report["cross_rank_pairs"] > 0, "no SCVL pair has its two rows on different ranks"
    for role, names in TERMS.items():
        for name in names:
            assert report[role]["terms"][name] == pytest.approx(ref[role]["terms"][name], rel=1e-5, abs=1e-7), (
                f"{case}: {role} {name}"
            )
        assert len(report[role]["micro_batches"]) == report["world"]
        assert all(n > 1 for n in report[role]["micro_batches"]), f"{case}: {role} was not split into micro-batches"
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{case} {n}: {m}")
    moved = [n for n in grads if n.startswith("critic.") and "score" in n]
    assert moved and all(grads[n].abs().sum() > 0 for n in moved), "the critic's heads got no gradient"
