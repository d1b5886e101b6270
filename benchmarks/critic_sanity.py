"""Does SynAPOTrainer's critic learn an easy value on the learning benchmark's task? A check of the adapter itself.

The learning benchmark's critics explain none of the return's variance (learning.md, critic_probe.md). This rules
out the adapter as the cause: the same trainer, warm start, batch and critic learning rate, but the policy frozen
(learning rate 0) and a reward the prompt alone decides (1 iff the chain's start digit is below 5), so the true
value is 0 or 1 from the first token on. The critic's explained variance on each new batch (before its update) is
printed and written to `critic_sanity.md`.

    python benchmarks/critic_sanity.py                  # vapo and synapo, 160 steps each (~5 min, one thread each)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def run(method: str, steps: int, cache_dir: str, sft_steps: int) -> list[float]:
    """Explained variance of `method`'s critic at every step, policy frozen, reward = start digit < 5."""
    import torch

    torch.set_num_threads(1)
    import learning
    import learning_run
    from task_chain import rl_dataset, warm_start
    from transformers import PrinterCallback, TrainerCallback

    frozen = ["--learning_rate", "0", "--value_warmup_steps", "0"]
    a = learning.parse_args(["--samples", str(32 * steps), "--sft_steps", str(sft_steps), *frozen])
    cfg = learning.task_config(a)
    model, tokenizer = learning_run.load_policy(warm_start(cfg, a.warm_start_seed, cache_dir))

    def start_digit_reward(prompts, completions, **kwargs):
        return [float(int(p[0]) < 5) for p in prompts]

    dataset = rl_dataset(cfg, n=a.samples // a.num_generations + 64, seed=0)
    out = os.path.join(cache_dir, "trainer_out", f"sanity_{method}")
    trainer = learning_run.build_trainer(a, method, 0, model, tokenizer, start_digit_reward, dataset, out)
    trainer.remove_callback(PrinterCallback)
    evs: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "critic/vf_explained_var" in logs:
                evs.append(float(logs["critic/vf_explained_var"]))
                if len(evs) % 16 == 0:
                    print(f"[{method}] step {len(evs)}: critic EV {evs[-1]:.3f}", flush=True)

    trainer.add_callback(Record())
    trainer.train()
    return evs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["vapo", "synapo"])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--every", type=int, default=16, help="table rows: mean EV over this many steps")
    parser.add_argument("--sft_steps", type=int, default=3000, help="warm-start supervised steps (learning.py's)")
    parser.add_argument("--out", default="", help="default benchmarks/out/learning/critic_sanity.md (see --results)")
    parser.add_argument("--results", action="store_true", help="default to benchmarks/results/ (committed)")
    parser.add_argument("--cache_dir", default=os.path.join(HERE, "cache", "learning"))
    args = parser.parse_args(argv)
    from settings_cli import default_out

    args.out = args.out or default_out("learning", "critic_sanity.md", results=args.results)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=min(2, len(args.methods))) as pool:
        n = len(args.methods)
        evs = pool.map(run, args.methods, [args.steps] * n, [args.cache_dir] * n, [args.sft_steps] * n)
        curves = dict(zip(args.methods, evs, strict=True))
    command = " ".join(["python", "benchmarks/critic_sanity.py", *(sys.argv[1:] if argv is None else argv)])
    rows = range(0, args.steps, args.every)
    lines = [
        "# Critic sanity check: the adapter's critic on a value the prompt decides",
        "",
        f"Command: `{command}` ({time.perf_counter() - start:.0f}s). Learning benchmark's warm start, trainer, batch "
        "32 and critic lr; policy frozen (lr 0); reward 1 iff the prompt's start digit is below 5. Mean explained "
        f"variance of the critic on each new batch (before its update), per {args.every} steps.",
        "",
        "| steps | " + " | ".join(args.methods) + " |",
        "|---|" + "---|" * len(args.methods),
    ]
    for r in rows:
        cells = []
        for m in args.methods:
            chunk = curves[m][r : r + args.every]
            cells.append(f"{sum(chunk) / len(chunk):.3f}" if chunk else "-")
        lines.append(f"| {r + 1}-{r + args.every} | " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
