"""The learning benchmark's settings and bookkeeping, shared by `learning.py` (the driver) and `learning_run.py`
(one run): the methods, `Args`, the task module, the setup key that says which finished runs still match, and where
each run's result lives. Importing it runs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))

METHODS = ["grpo", "ppo", "vapo", "synapo", "synapo-no-hvm", "synapo-no-scvl", "synapo-no-eagae", "synapo-beta-neg"]
# Diagnostic variants, run only when named: VAPO with the actor's lambda fixed at 1 (A_t = G_t - V_t), which tests
# whether VAPO's length-adaptive lambda (about 0.80 for ~100 tokens) is what keeps the outcome from the early steps;
# the oracle-value arm (oracle_values.py): Monte-Carlo values at segment starts instead of the learned critic
ORACLE_METHODS = ["vapo-oracle", "synapo-oracle"]
# the shared-trunk critic (issue 20, docs/critic_trunk.md): value heads on the policy's own hidden states; their
# pre-training is the trainer's warm-up on the warm start's features, inside the sample budget
TRUNK_METHODS = ["vapo-trunk", "synapo-trunk", "synapo-trunk-grad"]
EXTRA_METHODS = ["vapo-lambda1", *ORACLE_METHODS, "tree", "synapo-tree", "tree-outcome", *TRUNK_METHODS]
# the checked task's full run (issue 13): the chain table's 9 methods and the oracle arm, the main comparison first
# the hard task (issue 20): the baselines, then the arms that can pay at equal generated tokens
HARD_METHODS = ["grpo", "synapo", "vapo", "tree", "synapo-tree", "tree-outcome", "synapo-trunk", "vapo-trunk"]
CHECKED_METHODS = ["grpo", "vapo", "synapo", *ORACLE_METHODS, "ppo", "synapo-no-hvm", "synapo-no-scvl",
                   "synapo-no-eagae", "synapo-beta-neg", "vapo-lambda1"]  # fmt: skip


# the hard task's budget: 2048 samples' worth of generated tokens (102 a sample), where GRPO's greedy accuracy is
# ~70 % (seed 0: 68.2 % at 2048 samples, 86.6 % at 4096; python benchmarks/learning.py --task hard --methods grpo
# --seeds 0 --samples 8192); every method stops there, its value pre-training (1024 rollouts, about half of it) and
# a tree's extra samples included; the sample cap is twice it
HARD_TOKENS = 2048 * 102
HARD_SAMPLES = 4096


@dataclass
class Args:
    """Benchmark settings (defaults: the full CPU run)."""

    task: str = "chain"
    """`chain` (task_chain.py, the first table), `checked` (task_checked.py: values a critic can learn) or `hard`
    (task_hard.py: the checked task with six misconceptions, which GRPO does not saturate)"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to run: `grpo` (TRL's GRPOTrainer), the SynAPO presets, `synapo-beta-neg` (EA-GAE beta < 0); also
    `vapo-lambda1` (VAPO with the actor's lambda fixed at 1, a diagnostic outside the default list)"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """RL seeds (sampling, data order); every seed starts from the same warm start"""
    samples: int = 8192
    """sample budget per run: generated completions, critic warm-up rollouts included"""
    token_budget: int = 0
    """also stop a run once its generated tokens (training rollouts, value pre-training rollouts, Monte-Carlo
    continuations; a tree's shared prefixes once) reach this many: every method at equal compute (0: samples only;
    default with --task hard)"""
    eval_every: int = 512
    """evaluate on the held-out prompts every this many samples (and at 0)"""
    eval_prompts: int = 500
    """held-out prompts evaluated greedily (the main metric)"""
    final_t1_samples: int = 2
    """at the end, also sample each held-out prompt this many times at temperature 1 (pass@1 at T=1)"""
    blame_prompts: int = 64
    """at the end, held-out prompts whose rollouts (the arm's own: trees for a tree arm) measure the blame on a wrong
    answer's first wrong step with the arm's own advantages (0: off; not part of the setup key)"""
    threshold: float = 0.8
    """accuracy for "samples needed to reach it" (greedy, held-out, interpolated between evaluations)"""
    num_generations: int = 8
    """responses per prompt (group size, all methods)"""
    batch: int = 32
    """completions per optimizer step (per_device_train_batch_size)"""
    learning_rate: float = 1e-4
    """policy learning rate (all methods, constant)"""
    critic_learning_rate: float = 1e-3
    """critic learning rate (all value-based methods; 1e-3, not 3e-4: PPO collapsed at 3e-4 in a 1-seed pilot)"""
    critic_epochs: int = 1
    """critic passes over each rollout batch (value-based methods; a diagnostic: does the critic then follow the
    policy?)"""
    value_warmup_steps: int = 8
    """critic-only rollout batches before the policy moves (VAPO/SynAPO presets; PPO has none); counted as samples"""
    value_pretrain: bool = False
    """VAPO's value pre-training with a stopping rule (value_pretrain.py) instead of `value_warmup_steps`, for the
    VAPO/SynAPO methods: once per critic shape on the warm start's rollouts, shared by every run and seed like the
    warm start itself (not in the RL sample budget; reported beside it). Default on with --task checked"""
    pretrain_max_rollouts: int = 8192
    """value pre-training's rollouts (held-out ones included), sampled once from the warm start"""
    pretrain_max_steps: int = 1536
    """cap on the value pre-training's critic steps (batch 32)"""
    pretrain_target_ev: float = 0.4
    """value pre-training stops when the critic's held-out explained variance reaches this (or stops improving)"""
    trunk_warmup_steps: int = 8
    """shared-trunk methods: at most this many critic-only rollout batches pre-train the heads on the warm start's
    features (the trainer's warm-up, stopping at `pretrain_target_ev` of the outcome); counted as samples"""
    trunk_critic_learning_rate: float = 3e-3
    """shared-trunk methods: learning rate of the value heads"""
    trunk_critic_epochs: int = 4
    """shared-trunk methods: passes over each rollout batch (mini-batches of 8 rows; no forward: kept features)"""
    trunk_grad_scale: float = 0.1
    """`synapo-trunk-grad`: scale of the value loss's gradient into the policy's trunk (the other trunk methods: 0)"""
    oracle_k: int = 8
    """oracle arm: continuations per distinct segment-start prefix (not counted in the sample budget)"""
    oracle_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """oracle arm: run only these of `--seeds` (it costs several times more generation)"""
    ea_gae_beta_neg: float = -0.05
    """EA-GAE beta of `synapo-beta-neg` (the write-up's prose sign)"""
    temperature: float = 1.0
    """rollout temperature"""
    warm_start_seed: int = 0
    """seed of the shared warm start"""
    sft_steps: int = 3000
    """supervised steps of the warm start"""
    jobs: int = 2
    """runs at once (one thread each)"""
    quick: bool = False
    """smoke check: grpo and synapo, 1 seed, a short budget and a cheap (near-zero accuracy) warm start"""
    report_only: bool = False
    """only rebuild the table and pictures from finished runs"""
    warm_start_only: bool = False
    """only train or load the warm starts of `--seeds` and measure their held-out accuracy"""
    out: str = ""
    """output folder (default benchmarks/out/<learning|checked>[_quick], git-ignored; see --results)"""
    results: bool = False
    """write to (and resume from) benchmarks/results/<learning|checked>, the committed results, instead"""
    cache_dir: str = os.path.join(HERE, "cache", "learning")
    """where the warm starts and the credit-picture responses are cached (git-ignored)"""
    child: str = ""
    """internal: run one `method:seed` in this process"""


def apply_quick(a: Args) -> Args:
    """`--quick` and `--task checked` settings for the fields left at their defaults (explicit flags win)."""
    default = Args()
    if a.task in ("checked", "hard"):
        checked = dict(
            methods=CHECKED_METHODS, value_pretrain=True, out=os.path.join(HERE, "results", a.task),
            cache_dir=os.path.join(HERE, "cache", f"learning_{a.task}"),
        )  # fmt: skip
        if a.task == "hard":  # the budget at which GRPO does not saturate (task_hard.py)
            checked.update(methods=HARD_METHODS, samples=HARD_SAMPLES, token_budget=HARD_TOKENS, eval_every=256,
                           pretrain_max_rollouts=1024)  # fmt: skip
        a = dataclasses.replace(a, **{k: v for k, v in checked.items() if getattr(a, k) == getattr(default, k)})
    if not a.quick:
        return a
    quick = dict(
        methods=["grpo", "synapo"], seeds=[0], samples=384, eval_every=128, eval_prompts=64, final_t1_samples=1,
        value_warmup_steps=2, sft_steps=300, out=os.path.join(HERE, "results", "learning_quick"),
    )  # fmt: skip
    if a.task in ("checked", "hard"):
        quick.update(methods=["grpo", "synapo", "synapo-oracle"], oracle_k=2, pretrain_max_rollouts=320,
                     pretrain_max_steps=64,
                     out=os.path.join(HERE, "results", f"{a.task}_quick"))  # fmt: skip
        default = dataclasses.replace(default, methods=CHECKED_METHODS, out=os.path.join(HERE, "results", a.task))
    return dataclasses.replace(a, **{k: v for k, v in quick.items() if getattr(a, k) == getattr(default, k)})


def task_module(a: Args):
    """The task's module: task_chain, task_checked or task_hard (the same interface)."""
    if a.task not in ("chain", "checked", "hard"):
        raise SystemExit(f"unknown --task {a.task!r}; choose chain, checked or hard")
    return importlib.import_module(f"task_{a.task}")


def task_config(a: Args):
    return task_module(a).TaskConfig(sft_steps=a.sft_steps)


# fields added after the chain's table: left out of the setup key at their defaults (its finished runs still match)
NEW_FIELDS = (
    "task", "value_pretrain", "pretrain_max_rollouts", "pretrain_max_steps", "pretrain_target_ev", "oracle_k",
    "oracle_seeds", "critic_epochs", "token_budget", "trunk_warmup_steps", "trunk_critic_learning_rate",
    "trunk_critic_epochs", "trunk_grad_scale",
)  # fmt: skip


def setup_key(a: Args) -> str:
    """Hash of everything that changes a run's result (not methods, seeds, jobs or paths)."""
    skip = {
        "methods",
        "seeds",
        "jobs",
        "report_only",
        "warm_start_only",
        "out",
        "results",
        "cache_dir",
        "child",
        "threshold",
        "blame_prompts",
    }
    default = Args()
    blob = {k: v for k, v in asdict(a).items() if k not in skip}
    blob = {k: v for k, v in blob.items() if k not in NEW_FIELDS or v != getattr(default, k)}
    if not a.value_pretrain:  # unused settings do not split the setup
        for k in ("pretrain_max_rollouts", "pretrain_max_steps", "pretrain_target_ev"):
            blob.pop(k, None)
    blob["task"] = asdict(task_config(a))
    if a.task != "chain":
        blob["task_name"] = a.task
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def pretrain_key(a: Args) -> str:
    """Hash of what changes the value pre-training (value_pretrain.py): the task and its warm start and the
    pre-training's own settings, not the RL settings (policy learning rate, budget), so that a diagnostic run with
    other RL settings (e.g. a frozen policy, `--learning_rate 1e-12`) starts from the same cached critic."""
    blob = {k: getattr(a, k) for k in ("warm_start_seed", "pretrain_max_rollouts", "pretrain_max_steps",
                                      "pretrain_target_ev")}  # fmt: skip
    blob["task"], blob["task_name"] = asdict(task_config(a)), a.task
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def run_list(a: Args) -> list[tuple[str, int]]:
    """Every (method, seed) of the benchmark: the oracle arm only on `oracle_seeds`."""
    return [(m, s) for s in a.seeds for m in a.methods if m not in ORACLE_METHODS or s in a.oracle_seeds]


def run_path(a: Args, method: str, seed: int) -> str:
    return os.path.join(a.out, "runs", f"{method}_s{seed}.json")


def is_done(a: Args, method: str, seed: int) -> bool:
    path = run_path(a, method, seed)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("setup_key") == setup_key(a)
