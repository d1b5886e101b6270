"""`SynAPOTrainer` at scale on CPU: a whole `synapo` run on 2 gloo ranks under DDP and forced FSDP2 against a
1-process run on the same rollouts (`_dist_trainer_run.py`), and the single-process path bitwise unchanged.

The 1-process reference runs in this process, then one 2-rank job runs DDP and FSDP2 one after the other.
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
MODES = ("ddp", "fsdp2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{mode: (rank results, final states)} for "single" (this process) and each of MODES (one torchrun job)."""
    from safetensors.torch import load_file

    from tests.trl import _dist_trainer_run

    out = tmp_path_factory.mktemp("scale")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += [os.path.join(ROOT, "tests", "trl", "_dist_trainer_run.py"), ",".join(MODES), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "TRL_EXPERIMENTAL_SILENCE": "1"}
    silence = os.environ.get("TRL_EXPERIMENTAL_SILENCE")
    try:
        _dist_trainer_run.main("single", str(out))  # the 1-process reference, in this process
    finally:
        if silence is None:
            os.environ.pop("TRL_EXPERIMENTAL_SILENCE", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = {}
    for mode in ("single", *MODES):
        world = 1 if mode == "single" else 2
        ranks = [json.loads((out / mode / f"rank{r}.json").read_text()) for r in range(world)]
        results[mode] = ranks, load_file(str(out / mode / "states.safetensors"))
    return results


def test_single_process_run_resumes_exactly(runs):
    (single,), _ = runs["single"]
    assert single["backend"] == "single" and single["held"] == single["total"]
    assert single["resumed_critic_equal"] and single["resumed_policy_equal"]
    assert "critic_sharded" not in single["checkpoint"]


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_match_one_process_and_resume_exactly(runs, mode):
    import torch

    ranks, states = runs[mode]
    (single,), reference = runs["single"]
    for r in ranks:
        assert r["backend"] == mode
        assert r["warmup_done"] == single["warmup_done"] == 1
        assert r["critic_updates"] == single["critic_updates"] == 4  # the warm-up's and 3 steps'
        assert r["scvl_pairs"] == single["scvl_pairs"] and sum(single["scvl_pairs"]) > 0
        # a checkpoint of step 2 resumed by a fresh trainer ends where the run ended, bitwise
        assert r["resumed_critic_equal"], f"{mode}: the resumed critic differs"
        assert r["resumed_policy_equal"], f"{mode}: the resumed policy differs"
        assert {"config.json", "model.safetensors", "critic_manifest.json"} <= set(r["export"])
    # fp32 (bf16=False), Adam eps 1e-3: only the order of the reductions differs from the 1-process run
    assert states.keys() == reference.keys()
    diffs = {name: float((states[name] - reference[name]).abs().max()) for name in reference}
    for part in ("critic.", "policy."):
        worst = max((d, n) for n, d in diffs.items() if n.startswith(part))
        assert worst[0] < 1e-5, f"{mode}: {worst[1]} differs from the 1-process run by {worst[0]}"
    moved = [n for n in reference if n.startswith("critic.") and "score" in n]
    assert all(torch.any(states[n] != 0) for n in moved), "the value head never left zero"
    if mode == "fsdp2":
        total = ranks[0]["total"]
        assert all(0 < r["held"] < total for r in ranks), "each rank must hold only its shard of the critic"
        assert sum(r["held"] for r in ranks) == total
        assert "critic_sharded" in ranks[0]["checkpoint"]
        assert {"pytorch_model_fsdp_0", "optimizer_0"} <= set(ranks[0]["checkpoint"])  # the policy's DCP layout
    else:
        assert all(r["held"] == r["total"] for r in ranks)
        assert "critic_sharded" not in ranks[0]["checkpoint"]  # DDP: the whole critic in critic/, as one process
