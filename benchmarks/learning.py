"""Learning benchmark: GRPO vs PPO vs VAPO vs SynAPO (+ ablations) on a long chain with one sparse outcome reward.

The task (`task_chain.py`): 12 steps of invertible arithmetic mod 10, steps separated by blank lines, ~100 answer
tokens; reward 1 iff the whole answer is in the strict format and the final digit is right. Every method starts from
the same cached warm start (a tiny Qwen2 supervised on imperfect traces, with three systematic misconceptions) and
gets the same sample budget (generated completions, the critic's warm-up rollouts included). Held-out prompts are
evaluated greedily (the main metric) every `eval_every` samples.

    python benchmarks/learning.py                      # full: 8 methods x 5 seeds (hours on a 2-core CPU)
    python benchmarks/learning.py --quick              # smoke check: 2 methods x 1 seed, a cheap warm start
    python benchmarks/learning.py --report_only        # rebuild table and pictures from finished runs
    python benchmarks/learning.py --warm_start_only --seeds 0 1 2   # warm starts of 3 seeds and their accuracy
    python benchmarks/learning.py --methods vapo-lambda1      # diagnostic: VAPO with the actor's lambda fixed at 1
    python benchmarks/critic_probe.py                         # can a critic learn this task's values? (offline)
    python benchmarks/critic_sanity.py                        # the trainer's critic on a value the prompt decides

The checked task (issue 13, `task_checked.py`: the same format, a few identifiable risky steps, reward only for an
exactly right worked chain, so a critic can learn the values): VAPO/SynAPO methods start from VAPO's value
pre-training with a stopping rule (`value_pretrain.py`), and an oracle arm replaces the critic by Monte-Carlo values
at segment starts (`oracle_values.py`; `vapo-oracle`, `synapo-oracle`, on `--oracle_seeds` only):

    python benchmarks/critic_probe.py --task checked          # the gate: can a critic learn this task's values?
    python benchmarks/learning.py --task checked --jobs 1     # 9 methods x 5 seeds + oracle arm x 3 seeds
    python benchmarks/learning.py --task checked --quick      # smoke check: grpo, synapo, synapo-oracle, 1 seed

Each (method, seed) writes `<out>/runs/<method>_s<seed>.json` when it finishes; a rerun skips the runs whose file
exists with the same setup, so an interrupted benchmark resumes where it stopped. Outputs: `<out>/learning.md`
(table), `<out>/learning_curves.png`, `<out>/learning_credit.png` (per-token advantages, SynAPO beside PPO).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from learning_setup import (  # noqa: E402  (benchmarks/ is on sys.path above)
    EXTRA_METHODS,
    METHODS,
    Args,
    apply_quick,
    is_done,
    run_list,
    setup_key,
    task_config,
    task_module,
)


def parse_args(argv: list[str]) -> Args:
    from settings_cli import RESULTS, dataclass_parser, default_out

    given = Args(**vars(dataclass_parser(Args, __doc__).parse_args(argv)))
    a = apply_quick(given)
    if given.out:  # an explicit --out wins
        return a
    # apply_quick names the task's folder under benchmarks/results; a run writes there only with --results
    folder = os.path.relpath(a.out, RESULTS) if a.out else "learning"
    return dataclasses.replace(a, out=default_out(folder, results=a.results))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.child:
        method, seed = a.child.rsplit(":", 1)
        from learning_run import run_one

        run_one(a, method, int(seed))
        return 0
    import torch
    import transformers
    import trl
    from learning_report import write_report

    unknown = sorted(set(a.methods) - set(METHODS) - set(EXTRA_METHODS))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {METHODS + EXTRA_METHODS}")
    command = " ".join(["python", "benchmarks/learning.py", *argv])
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    header = [
        f"Command: `{command}` (commit {commit.stdout.strip() or '?'} plus the working tree; {versions}, "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPU cores, one thread per run, {a.jobs} runs at once; "
        f"setup {setup_key(a)})."
    ]
    if a.report_only:
        header[0] += " This rebuilt the report from finished runs; each run's JSON holds its setup and wall time."

    print(header[0], flush=True)
    print(f"setup: {json.dumps(asdict(a))}", flush=True)
    if a.warm_start_only:
        print(f"wrote {measure_warm_starts(a, header)}", flush=True)
        return 0
    if not a.report_only:
        prepare(a)
        todo = [(m, s) for m, s in run_list(a) if not is_done(a, m, s)]
        done = len(run_list(a)) - len(todo)
        print(f"{done} finished run(s) skipped, {len(todo)} to run, {a.jobs} at a time", flush=True)
        failed = run_all(a, argv, todo)
        if failed:
            print(f"FAILED runs: {failed}", flush=True)
    path = write_report(a, setup_key(a), header)
    print(f"wrote {path}", flush=True)
    return 0


def measure_warm_starts(a: Args, header: list[str]) -> str:
    """Train (or load) the warm start of each seed in `a.seeds`; greedy, exact-chain and T=1 held-out accuracy."""
    import torch

    torch.set_num_threads(1)
    from learning_run import greedy_accuracy, load_policy, sampled_accuracy

    task, cfg = task_module(a), task_config(a)
    prompts = task.held_out_prompts(cfg)[: a.eval_prompts]
    lines = ["# Warm starts of the learning benchmark", "", *header, "",
             f"Task and warm start: `{json.dumps(asdict(cfg))}`. Held-out prompts: {len(prompts)}; T=1: "
             f"{a.final_t1_samples} sample(s) per prompt.", "",
             "| warm-start seed | greedy acc | exact chain (greedy) | T=1 acc |", "|---|---|---|---|"]  # fmt: skip
    for seed in a.seeds:
        model, tokenizer = load_policy(task.warm_start(cfg, seed, a.cache_dir))
        greedy, exact = greedy_accuracy(model, tokenizer, prompts, cfg, task)
        t1 = sampled_accuracy(model, tokenizer, prompts, cfg, a.final_t1_samples, seed=0, task=task)
        lines.append(f"| {seed} | {100 * greedy:.1f} | {100 * exact:.1f} | {100 * t1:.1f} |")
        print(lines[-1], flush=True)
    path = os.path.join(a.out, "warm_start.md")
    os.makedirs(a.out, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def prepare(a: Args) -> None:
    """The warm start and the credit-picture responses, once, before the runs (children then only read them)."""
    import torch

    torch.set_num_threads(1)
    from learning_run import picture_responses

    start = time.perf_counter()
    path = task_module(a).warm_start(task_config(a), a.warm_start_seed, a.cache_dir)
    picture_responses(a, path)
    print(f"warm start ready: {path} ({time.perf_counter() - start:.0f}s)", flush=True)


def run_all(a: Args, argv: list[str], todo: list[tuple[str, int]]) -> list[str]:
    """Run `todo` as child processes, `a.jobs` at a time; returns the failed runs."""
    script = os.path.abspath(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    env["TRANSFORMERS_VERBOSITY"] = env.get("TRANSFORMERS_VERBOSITY", "error")
    finished, lock, start = [0], threading.Lock(), time.perf_counter()

    def one(job):
        method, seed = job
        cmd = [sys.executable, script, *argv, "--out", a.out, "--child", f"{method}:{seed}"]
        proc = subprocess.run(cmd, env=env, check=False)  # the child prints its own progress lines
        with lock:
            finished[0] += 1
            elapsed = time.perf_counter() - start
            eta = elapsed / finished[0] * (len(todo) - finished[0])
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"== {finished[0]}/{len(todo)} runs done ({method} s{seed} {status}); {elapsed / 60:.0f} min "
                  f"elapsed, about {eta / 60:.0f} min left", flush=True)  # fmt: skip
        return None if proc.returncode == 0 else f"{method}_s{seed} (exit {proc.returncode})"

    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        return [r for r in pool.map(one, todo) if r]


if __name__ == "__main__":
    raise SystemExit(main())
