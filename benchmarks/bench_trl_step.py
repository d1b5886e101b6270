"""Seconds per optimizer step and peak memory of TRL's GRPO and SynAPOTrainer's ppo / vapo / synapo, same setup.

Each method runs in its own process (clean peak memory: max RSS on CPU, max allocated on CUDA), on the same tiny
Qwen2, batch and generation length; the median `step_time` (TRL's own per-optimizer-step timer) of the steps after
`--skip` is reported, with ratios to vapo and grpo, and a breakdown of SynAPO's parts (entropy forward, critic
forward, advantage stage, critic update).

    python benchmarks/bench_trl_step.py                # writes benchmarks/results/trl_step_<device>.{json,md}
    python benchmarks/bench_trl_step.py --steps 10 --methods vapo synapo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))


@dataclass
class Args:
    """Benchmark settings (defaults: a CPU-sized run)."""

    methods: list[str] = field(default_factory=lambda: ["grpo", "ppo", "vapo", "synapo"])
    steps: int = 24  # optimizer steps per method
    skip: int = 4  # first steps dropped (JIT, allocator warm-up)
    batch: int = 16  # per_device_train_batch_size (rows per step)
    num_generations: int = 8
    completion_length: int = 32  # max_completion_length
    hidden_size: int = 64
    num_layers: int = 2
    threads: int = 2
    repeats: int = 3  # runs per method, interleaved; the least-contended (fastest) median is reported
    out: str = ""  # default benchmarks/out (git-ignored); with results=True benchmarks/results (committed)
    results: bool = False


TIMED = {  # SynAPOTrainer parts timed for the breakdown (method name -> label)
    "_rollout_entropy_for": "entropy (extra policy forward)",
    "_synapo_stage": "synapo stage total (values + advantages + critic update)",
    "_core_stage": "core advantage stage (with scvl pairs)",
}


def run_one(method: str, a: Args) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from trl import GRPOConfig, GRPOTrainer
    from trl_synapo import correct, sum_dataset, tiny_policy, tiny_tokenizer

    from synapo_ext.trl import SynAPOConfig, SynAPOTrainer
    from synapo_ext.trl import stage as trainer_module  # the module of the trainer's SynAPO stage

    common = dict(
        output_dir=f"/tmp/bench_trl_{method}",
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        max_steps=a.steps,
        num_generations=a.num_generations,
        per_device_train_batch_size=a.batch,
        max_completion_length=a.completion_length,
        learning_rate=1e-3,
        seed=0,
    )
    tokenizer = tiny_tokenizer()
    policy = tiny_policy(tokenizer, a.hidden_size, a.num_layers, seed=0)
    dataset = sum_dataset(256, seed=0)
    timings: dict[str, list[float]] = {}
    if method == "grpo":
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=[correct],
            args=GRPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    else:
        args = SynAPOConfig(**common, preset=method, value_warmup_steps=0, critic_learning_rate=1e-3)
        trainer = SynAPOTrainer(
            model=policy, reward_funcs=[correct], args=args, train_dataset=dataset, processing_class=tokenizer
        )

        def timed(real, name):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return real(*args, **kwargs)
                finally:
                    timings.setdefault(name, []).append(time.perf_counter() - start)

            return wrapper

        # the trainer's own methods, then the functions its module calls
        for owner, names in (
            (trainer, TIMED),
            (trainer_module, ("compute_synapo_advantages", "update_critic", "critic_values")),
        ):
            for name in names:
                setattr(owner, name, timed(getattr(owner, name), name))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    step_times = [e["step_time"] for e in trainer.state.log_history if "step_time" in e][a.skip :]
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "median_step_s": statistics.median(step_times),
        "steps_timed": len(step_times),
        "peak_mem_mb": peak_mb,
        "breakdown_median_s": {k: statistics.median(v[a.skip :] or v) for k, v in timings.items()},
    }


def main() -> None:
    from settings_cli import dataclass_parser

    parser = dataclass_parser(Args, __doc__)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = Args(**{k: v for k, v in vars(parser.parse_args()).items() if k != "child"})
    child = parser.parse_args().child
    if child:  # one method, in its own process
        print(json.dumps(run_one(child, a)))
        return

    import torch
    import transformers
    import trl

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{a.threads}threads"
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, {device}")
    runs: dict[str, list[dict]] = {m: [] for m in a.methods}
    for repeat in range(a.repeats):  # interleaved, so a noisy neighbour hits every method alike
        for method in a.methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", method, *sys.argv[1:]]
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "NUMBA_NUM_THREADS": str(a.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{method} failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[method].append(result)
            print(
                f"[{repeat}] {method:>7}: {result['median_step_s'] * 1e3:8.1f} ms/step, "
                f"peak {result['peak_mem_mb']:7.1f} MB"
            )
    results = []
    for method_runs in runs.values():
        best = dict(min(method_runs, key=lambda r: r["median_step_s"]))
        best["all_medians_s"] = [r["median_step_s"] for r in method_runs]
        results.append(best)
    by = {r["method"]: r for r in results}
    lines = [
        f"# TRL step benchmark ({device})",
        "",
        f"`{' '.join(['python', *sys.argv])}`; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, python {platform.python_version()}. Setup: {json.dumps(asdict(a))}",
        "",
        "| method | median s/step (best run) | x vapo | x grpo | peak MB | medians of all runs |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = {b: r["median_step_s"] / by[b]["median_step_s"] if b in by else float("nan") for b in ("vapo", "grpo")}
        r["x_vapo"], r["x_grpo"] = ratio["vapo"], ratio["grpo"]
        lines.append(
            f"| {r['method']} | {r['median_step_s']:.4f} | {ratio['vapo']:.2f} | {ratio['grpo']:.2f} | "
            f"{r['peak_mem_mb']:.0f} | {', '.join(f'{m:.4f}' for m in r['all_medians_s'])} |"
        )
    lines += ["", "Breakdown (median seconds per call, once per step here):", ""]
    for r in results:
        for name, seconds in r["breakdown_median_s"].items():
            lines.append(f"- {r['method']} `{name}`: {seconds:.4f}")
    from settings_cli import default_out

    out = a.out or default_out(results=a.results)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"trl_step_{device.replace(' ', '_').lower()}")
    with open(stem + ".json", "w") as f:
        json.dump({"device": device, "setup": asdict(a), "results": results}, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
