"""Peak memory of one bf16 FSDP2 step: policy alone (GRPO-like) vs policy + critic (SynAPO), one process.

A random-initialised Qwen2-0.5B-config policy (or `--tiny`: a toy config, on CPU) is sharded with `fully_shard`
(world size 1: the FSDP2 code path, fp32 master weights, bf16 compute via `MixedPrecisionPolicy`); the critic is built
on the meta device, sharded the same way and seeded from the policy's shards (`synapo_ext.trl.critic_weights`). Each
phase runs in its own process for a clean peak: GRPO = policy forward/backward/AdamW step; SynAPO = the same plus a
critic no-grad forward (rollout values) and a critic forward/backward/AdamW step.

    python benchmarks/gpu_fsdp2_step.py       # GPU, < 8 min; prints a table, writes results/gpu_fsdp2_step.json
    python benchmarks/gpu_fsdp2_step.py --tiny  # CPU smoke test (seconds)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QWEN2_05B = {  # Qwen/Qwen2-0.5B config.json (494M parameters, tied embeddings)
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
TINY = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
TINY.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def _distributed():
    """`synapo_ext/trl/critic_weights.py` alone (the package __init__ checks the TRL version; not needed here)."""
    spec = importlib.util.spec_from_file_location(
        "synapo_critic_weights", os.path.join(ROOT, "synapo_ext/trl/critic_weights.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _shard(model, device):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _peak(device) -> float:
    """GiB: max allocated on CUDA, max RSS of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def phase(name: str, tiny: bool, batch: int, length: int) -> dict:
    import torch.distributed as dist
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    D = _distributed()
    config = Qwen2Config(**(TINY if tiny else QWEN2_05B))
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        policy = Qwen2ForCausalLM(config)  # fp32 master weights
    policy.gradient_checkpointing_enable()
    policy = _shard(policy, device)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    critic = critic_opt = None
    if name == "synapo":
        critic = D.init_critic_meta(config, num_heads=2)
        critic.gradient_checkpointing_enable()
        critic = _shard(critic, device)
        critic.to_empty(device=device)
        D.load_critic_from_policy(critic, policy)  # shard to shard: no full copy
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-6)
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    mask = torch.ones_like(ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(2):  # the second step has the AdamW states: the steady-state peak
        if critic is not None:
            with torch.no_grad():
                old_values = critic(input_ids=ids, attention_mask=mask).logits.float()  # (B, L, 2)
            values = critic(input_ids=ids, attention_mask=mask).logits.float()
            (0.5 * (values - old_values.detach() - 1.0).square().mean()).backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            critic_opt.step()
            critic_opt.zero_grad(set_to_none=True)
        logits = policy(input_ids=ids, attention_mask=mask).logits  # (B, L, V) bf16
        logps = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        (-logps.mean()).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        policy_opt.step()
        policy_opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n_policy = D.local_numel(policy)[1]
    out = {
        "phase": name,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "policy_params": n_policy,
        "critic_params": D.local_numel(critic)[1] if critic is not None else 0,
        "peak_gib": round(_peak(device), 3),
        "seconds_2_steps": round(time.perf_counter() - start, 2),
        "batch": batch,
        "length": length,
    }
    dist.destroy_process_group()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy config on CPU (smoke test)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--phase", choices=["grpo", "synapo"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", default="", help="default benchmarks/out/gpu_fsdp2_step.json (see --results)")
    parser.add_argument("--results", action="store_true", help="default to benchmarks/results/ (committed)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from settings_cli import default_out

    args.out = args.out or default_out("gpu_fsdp2_step.json", results=args.results)
    if args.tiny:
        args.batch, args.length = 2, 16
    if args.phase:
        print(json.dumps(phase(args.phase, args.tiny, args.batch, args.length)))
        return
    rows = []
    for name in ("grpo", "synapo"):
        cmd = [sys.executable, os.path.abspath(__file__), "--phase", name, "--batch", str(args.batch)]
        cmd += ["--length", str(args.length)] + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{rows[0]['device']}, B={args.batch}, L={args.length}")
    print("| phase | params (policy + critic) | peak GiB | s / 2 steps |\n|---|---|---|---|")
    for r in rows:
        params = f"{r['policy_params'] / 1e6:.1f}M + {r['critic_params'] / 1e6:.1f}M"
        print(f"| {r['phase']} | {params} | {r['peak_gib']} | {r['seconds_2_steps']} |")
    if not args.tiny:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
