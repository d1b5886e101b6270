"""The real verl run on one CUDA GPU: `python -m verl.trainer.main_ppo` with the plugin, `synapo` and `gae`, timed.

Settings, as a verl user runs them (except the model, the rollout engine and the attention kernel): 1 GPU
(`trainer.n_gpus_per_node=1`), actor and critic FSDP2 with verl's default bf16 mixed precision, packed sequences
(`use_remove_padding=True`), the test-only Hugging Face `generate` rollout backend of `tests/verl/realrun/support.py`
(its sampling server runs on the CPU; vLLM/SGLang wheels cannot be carried to the GPU machine), eager attention (no
flash-attention wheel; transformers keeps packed rows apart through their position ids), the tiny local Qwen2 and
byte-level BPE tokenizer of the CPU real run, 2 steps per estimator (`value_warmup_steps=0`: step 2 updates critic
and actor). It prints, per estimator, verl's timing of step 2 (`timing_s/*`) and every SynAPO metric, and writes
`benchmarks/results/gpu_verl_step.json`.

    python benchmarks/gpu_verl_step.py --budget-s 300            # synapo and gae, within 300 s in all
    python benchmarks/gpu_verl_step.py --check                    # only what is missing, in a second
    python benchmarks/gpu_verl_step.py --device cpu --estimators synapo   # the script's plumbing on the CPU platform
                                                                          # of the tests (no result file)

Needs (checked first; a missing one is printed with the pip requirement and the script exits 2): a CUDA device,
torch, transformers >= 5.5 (verl 0.9.1 pins < 5.11; 5.17 is untried), `verl==0.9.1`, `TransferQueue>=0.1.10`,
`ray` (verl's driver and workers are Ray actors; the ray 2.60.0 cp311 wheel is 79.3 MB, more than the 64 MiB a GPU
session can carry, so the machine must already have it; verl's wheel is 1.7 MB), `tensordict`, `hydra-core`,
`omegaconf`, `pyzmq`, `msgspec`, `pandas` with `pyarrow` (the parquet dataset), and this repository installed
(`pip install -e .`: the `verl.plugins` entry point). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "gpu_verl_step.json")

NEEDS = {  # import name -> pip requirement
    "torch": "torch",
    "transformers": "transformers>=5.5.3",
    "verl": "verl==0.9.1",
    "transfer_queue": "TransferQueue>=0.1.10",
    "ray": "ray",
    "tensordict": "tensordict",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "zmq": "pyzmq",
    "msgspec": "msgspec",
    "pandas": "pandas",
    "pyarrow": "pyarrow",
}
SYNAPO_KEYS = ("synapo", "ea_gae")


def missing(device: str = "cuda") -> list[str]:
    """What this machine lacks for the run, as pip requirements (and "a CUDA device", "synapo-ext")."""
    out = [req for name, req in NEEDS.items() if importlib.util.find_spec(name) is None]
    try:
        eps = importlib.metadata.entry_points(group="verl.plugins")
        if not any(ep.name == "synapo" for ep in eps):
            out.append("synapo-ext (pip install -e . in this repository: the verl.plugins entry point)")
    except Exception:  # no metadata at all
        out.append("synapo-ext")
    if device == "cuda" and "torch" not in out:
        import torch

        if not torch.cuda.is_available():
            out.append("a CUDA device")
    return out


def gpu_overrides() -> list[str]:
    """What changes from the CPU real run (tests/verl/realrun/run.py): packed sequences, verl's own platform."""
    return [
        "actor_rollout_ref.model.use_remove_padding=True",
        "critic.model.use_remove_padding=True",
        "+algorithm.synapo.hvm_max_len=4",
        "+algorithm.synapo.value_warmup_steps=0",
        "trainer.total_training_steps=2",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget for all runs")
    parser.add_argument("--estimators", nargs="+", default=["synapo", "gae"])
    parser.add_argument("--check", action="store_true", help="only report what is missing")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke test of the script")
    args = parser.parse_args()

    lacking = missing(args.device)
    if lacking:
        sys.stdout.write("gpu_verl_step: cannot run here; missing: " + "; ".join(lacking) + "\n")
        return 2
    if args.check:
        sys.stdout.write("gpu_verl_step: everything needed is here\n")
        return 0

    sys.path.insert(0, ROOT)
    import torch

    from tests.verl.realrun.assets import build_assets
    from tests.verl.realrun.run import run

    start = time.time()
    root = tempfile.mkdtemp(prefix="synapo_gpu_verl_")
    assets = build_assets(os.path.join(root, "assets"))
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results: dict = {"status": "ran", "device": name, "torch": torch.__version__,
                     "verl": importlib.metadata.version("verl"), "runs": {}}  # fmt: skip
    for i, estimator in enumerate(args.estimators):
        left = args.budget_s - (time.time() - start)
        timeout = left / (len(args.estimators) - i)
        result = run(estimator, gpu_overrides(), assets=assets, root=os.path.join(root, estimator), timeout=timeout,
                     device=args.device)  # fmt: skip
        last = result.steps.get(max(result.steps)) if result.steps else {}
        timing = {k: v for k, v in last.items() if k.startswith("timing_s/")}
        synapo = {k: v for k, v in last.items() if any(key in k for key in SYNAPO_KEYS)}
        errors = result.errors()
        results["runs"][estimator] = {
            "rc": result.rc,
            "seconds": round(result.seconds, 1),
            "steps": sorted(result.steps),
            "timing_s": timing,
            "synapo_metrics": synapo,
            "losses": {k: v for k, v in last.items() if k.endswith("loss")},
            "errors": errors[:20],
        }
        lines = [f"== {estimator}: rc={result.rc} in {result.seconds:.0f} s, steps {sorted(result.steps)}"]
        lines += [f"  {k:<40} {v:.4f}" for k, v in sorted({**timing, **synapo}.items())]
        if result.rc != 0 or not result.steps:
            lines.append("  log tail:\n" + "\n".join(result.log.splitlines()[-40:]))
        sys.stdout.write("\n".join(lines) + "\n")
    runs = results["runs"]
    if "synapo" in runs and "gae" in runs:
        a, b = runs["synapo"]["timing_s"], runs["gae"]["timing_s"]
        results["synapo_minus_gae_s"] = {k: round(a[k] - b[k], 4) for k in a.keys() & b.keys()}
        sys.stdout.write(f"synapo - gae, step 2 (s): {results['synapo_minus_gae_s']}\n")
    if args.device == "cuda":
        os.makedirs(os.path.dirname(RESULT), exist_ok=True)
        with open(RESULT, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["rc"] == 0 and r["steps"] for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
