"""The critic under accelerate on two CPU ranks (gloo): DDP and FSDP2 (`synapo_ext.trl.distributed`,
`synapo_ext.trl.critic_weights`).

Each run (about 25 s) prepares a tiny policy, a critic from the meta device seeded by the policy's shards, takes a
few steps on fixed data (each rank its half), and compares with a 1-process run on the whole batch; then it saves
the sharded state, goes on, reloads into a fresh critic and goes on the same way (see `_dist_critic_run.py`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("trl")

pytestmark = pytest.mark.trl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str, out) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += [os.path.join(ROOT, "tests", "trl", "_dist_critic_run.py"), mode, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_critic_two_ranks_match_one_process_and_resume(mode, tmp_path):
    ranks = _run(mode, tmp_path)
    for r in ranks:
        assert r["backend"] == mode
        assert r["init_match"], "the critic built on meta and seeded from the policy differs from build_critic's"
        # fp32, Adam eps 1e-3: only the reduction order differs from the 1-process run
        assert r["max_diff_vs_1proc"] < 1e-5, r["max_diff_vs_1proc"]
        assert r["loaded_equal"] and r["resumed_equal"], "save -> load -> steps did not reproduce the run"
        assert r["export_diff"] == 0.0
    if mode == "fsdp2":
        total = ranks[0]["total"]
        assert all(0 < r["held"] < total for r in ranks), "each rank must hold only its shard"
        assert sum(r["held"] for r in ranks) == total
        assert {"pytorch_model_fsdp_0", "optimizer_0"} <= set(ranks[0]["files"])  # DCP, the policy's layout
    else:
        assert all(r["held"] == r["total"] for r in ranks)
