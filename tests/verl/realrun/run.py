"""Run the stock `python -m verl.trainer.main_ppo` on CPU with the tiny local assets, and read its metrics.

    python -m tests.verl.realrun.run synapo [extra hydra overrides ...]   # prints the log and the metrics lines

The overrides below are the least that gets a real verl 0.9.1 V1 step through on a 2-core CPU machine; why each is
there is in docs/verl_real_run.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .assets import build_assets

REPO = Path(__file__).resolve().parents[3]
ASSETS = Path(__file__).with_name("assets.py")


def overrides(assets: dict[str, str], estimator: str, out_dir: str, ranks: int = 1) -> list[str]:
    """verl's command line for a CPU run: `ranks` processes (gloo ranks) for the actor and the critic each, tiny
    batches, the `hfcpu` test rollout (one replica per rank)."""
    model = assets["model"]
    return [
        f"algorithm.adv_estimator={estimator}",
        f"data.train_files={assets['train']}",
        f"data.val_files={assets['val']}",
        "data.train_batch_size=4",
        "data.max_prompt_length=32",
        "data.max_response_length=16",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.model.use_remove_padding=False",
        "+actor_rollout_ref.model.override_config.attn_implementation=eager",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.rollout.name=hfcpu",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        "critic.strategy=fsdp2",
        f"critic.model.path={model}",
        "critic.model.use_remove_padding=False",
        "critic.ppo_mini_batch_size=4",
        "critic.ppo_micro_batch_size_per_gpu=4",
        "critic.optim.lr=1e-3",
        "reward.num_workers=1",
        f"reward.custom_reward_function.path={ASSETS}",
        "reward.custom_reward_function.name=compute_score",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "ray_kwargs.ray_init.num_cpus=16",
        f"+ray_kwargs.ray_init.num_gpus={ranks}",
        f"trainer.n_gpus_per_node={ranks}",
        "trainer.nnodes=1",
        "trainer.total_training_steps=1",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.logger=['console']",
        f"trainer.default_local_dir={out_dir}/ckpt",
        "trainer.project_name=synapo_cpu",
        "trainer.experiment_name=realrun",
    ]


def env(device: str = "cpu") -> dict[str, str]:
    """The environment of the run: the test support module in every verl process, and on `device="cpu"` the `cpu`
    platform (on "cuda" verl picks its own platform and engines)."""
    out = dict(os.environ)
    if device == "cpu":
        out.update(VERL_PLATFORM="cpu", VERL_ENGINE_DEVICE="cuda", VERL_ENGINE_VENDOR="nvidia", OMP_NUM_THREADS="1")
    out.update(
        VERL_USE_EXTERNAL_MODULES="tests.verl.realrun.support",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), out.get("PYTHONPATH", "")) if p),
        TOKENIZERS_PARALLELISM="false",
        RAY_DEDUP_LOGS="0",
        HF_HUB_OFFLINE="1",
    )
    return out


@dataclass
class Run:
    rc: int
    log: str
    seconds: float
    steps: dict[int, dict[str, float]] = field(default_factory=dict)

    def errors(self) -> list[str]:
        """TransferQueue's (and everyone's) ERROR lines."""
        return [line for line in self.log.splitlines() if re.search(r"\bERROR\b", line)]


_STEP = re.compile(r"step:(\d+) - (.*)$")


def parse_metrics(log: str) -> dict[int, dict[str, float]]:
    """The `step:N - key:value - ...` lines verl's console logger prints, by step."""
    steps: dict[int, dict[str, float]] = {}
    for line in log.splitlines():
        match = _STEP.search(line)
        if not match:
            continue
        values = {}
        for item in match.group(2).split(" - "):
            key, _, value = item.rpartition(":")
            try:
                values[key.strip()] = float(value)
            except ValueError:
                continue
        steps[int(match.group(1))] = values
    return steps


def run(
    estimator: str,
    extra: list[str] = (),
    *,
    assets: dict[str, str] | None = None,
    root: str | None = None,
    dump: str | None = None,
    timeout: float = 600,
    fake_version: str | None = None,
    ranks: int = 1,
    device: str = "cpu",
) -> Run:
    """One stock verl run as a subprocess; `extra` hydra overrides win over the defaults above.

    `device`: "cpu" (the test platform) or "cuda" (verl's own); `ranks`: data-parallel ranks of the actor and the
    critic (`trainer.n_gpus_per_node`); `assets`: from `build_assets` (built under `root` if None); `dump`:
    SYNAPO_TEST_DUMP (engine weights at every checkpoint save and load, SCVL pairs and critic rows, see support.py);
    `fake_version`: verl reports this version in every process (`fake_version.py`).
    """
    root = root or tempfile.mkdtemp(prefix="synapo_verl_run_")
    os.makedirs(root, exist_ok=True)
    assets = assets or build_assets(os.path.join(root, "assets"))
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", *overrides(assets, estimator, root, ranks), *extra]
    environ = env(device)
    # Ray refuses a temp dir inside a virtualenv (nox points TMPDIR into the session's venv) and its workers then die
    # at start while the driver waits forever; a short path also keeps Ray's unix sockets under the 107-byte limit
    environ["RAY_TMPDIR"] = environ["TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    if fake_version:
        environ["SYNAPO_TEST_VERL_VERSION"] = fake_version
        modules = environ["VERL_USE_EXTERNAL_MODULES"]
        environ["VERL_USE_EXTERNAL_MODULES"] = f"tests.verl.realrun.fake_version,{modules}"
    if dump:
        os.makedirs(dump, exist_ok=True)
        environ["SYNAPO_TEST_DUMP"] = dump
    start = time.time()
    # its own process group, so a timeout also ends Ray's processes
    proc = subprocess.Popen(
        cmd, cwd=root, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        log += f"\n[synapo test] killed after {timeout:.0f} s\n"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's leftovers
        shutil.rmtree(environ["RAY_TMPDIR"], ignore_errors=True)
    return Run(proc.returncode, log, time.time() - start, parse_metrics(log))


def finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)


if __name__ == "__main__":
    ranks = int(os.environ.get("SYNAPO_TEST_RANKS", "1"))
    result = run(sys.argv[1], sys.argv[2:], ranks=ranks, dump=os.environ.get("SYNAPO_TEST_DUMP"))
    lines = [result.log, f"rc={result.rc} seconds={result.seconds:.1f}"]
    for step, metrics in sorted(result.steps.items()):
        lines.append(
            f"{step} { ({k: v for k, v in metrics.items() if 'synapo' in k or 'ea_gae' in k or 'loss' in k}) }"
        )
    sys.stdout.write("\n".join(lines) + "\n")
