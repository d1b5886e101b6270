"""Advantage-stage timings: verl 0.9.1's GAE, synapo_ext's GAE and SynAPO's whole advantage stage, on the CPU.

Run in the verl environment (`nox -s bench -- --quick`, or the verl venv directly):

    python benchmarks/bench_advantages.py                      # all sizes, B in {64, 512} x T in {1k, 4k, 16k}
    python benchmarks/bench_advantages.py --quick              # 64x1024 and 64x4096, 3 repeats
    python benchmarks/bench_advantages.py --sizes 512x16384 --repeats 3

Inputs (the same tensors for every function at one size): right-padded rows of random length in [T/8, T]
(mask int64, as verl's attention mask), a sparse 0/1 outcome reward on each row's last valid token, values and
global values in [-1, 1], entropy in [0, 3] nats, response ids from a vocabulary of `vocab_size` of which
`delimiter_frac` are delimiter tokens, groups of `group_size` responses sharing a random prefix, each group
with mixed scores. Each time is the median of `repeats` calls after `warmup` untimed ones.

Rows of the table:
- verl GAE: `verl.trainer.ppo.core_algos.compute_gae_advantage_return` (constant lambda, whitened).
- ours GAE: `synapo_ext.core.compute_gae(..., lam=gae_lambda, whiten=True)`: the same outputs.
- stage: `compute_synapo_advantages` with the `synapo` preset (EA-GAE lambda, segments, HVM advantages and
  targets, SCVL pairs with their partner values, metrics), and its parts timed one by one; `vapo`: the same
  call with the `vapo` preset (length-adaptive GAE for the actor plus critic targets at critic_lambda 1).
The core picks numba kernels when numba is installed (`synapo-ext[fast]`); run with SYNAPO_EXT_BACKEND=torch to
time the pure-torch path. "1st call" includes any JIT compilation (numba caches it on disk between runs).
Writes benchmarks/results/bench_advantages.md (the table) and .json (raw timings, versions, arguments).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from settings_cli import dataclass_parser


@dataclass
class Args:
    sizes: str = "64x1024,64x4096,64x16384,512x1024,512x4096,512x16384"
    """comma-separated BxT sizes"""
    repeats: int = 5
    """timed calls per function and size (the median is reported)"""
    warmup: int = 1
    """untimed calls before timing (the first one is also reported as the first-call time)"""
    verl_budget_s: float = 15.0
    """at most about this many seconds of timed verl calls per size (fewer repeats for slow sizes, at least 1)"""
    quick: bool = False
    """shortcut for --sizes 64x1024,64x4096 --repeats 3"""
    seed: int = 1
    """seed of the input generator"""
    group_size: int = 8
    """responses per prompt (SCVL groups)"""
    vocab_size: int = 1000
    """vocabulary size of the random response ids"""
    delimiter_frac: float = 0.02
    """fraction of the vocabulary (and so of the tokens) that closes a segment"""
    gamma: float = 1.0
    """discount factor"""
    gae_lambda: float = 0.95
    """the constant lambda of the GAE comparison"""
    threads: int = 0
    """torch intra-op threads (0: torch's default)"""
    out_dir: str = "benchmarks/results"
    """where the Markdown table and the JSON go"""
    # computed in runtime
    shapes: tuple[tuple[int, int], ...] = ()
    """(B, T) pairs parsed from `sizes` (computed in runtime)"""


def parse_args() -> Args:
    parser = dataclass_parser(Args, __doc__.splitlines()[0], dashes=True, skip=("shapes",))
    args = Args(**vars(parser.parse_args()))
    if args.quick:
        args.sizes = "64x1024,64x4096" if args.sizes == Args.sizes else args.sizes
        args.repeats = min(args.repeats, 3)
    args.shapes = tuple(tuple(int(n) for n in s.lower().split("x")) for s in args.sizes.split(",") if s.strip())
    return args


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform(), "cpus": str(os.cpu_count())}
    for dist in ("torch", "verl", "transformers", "numpy", "numba", "synapo-ext"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "-"
    out["torch_threads"] = str(torch.get_num_threads())
    out["load_avg_1m"] = f"{os.getloadavg()[0]:.2f}"  # other work on the machine skews the timings
    out["SYNAPO_EXT_BACKEND"] = os.environ.get("SYNAPO_EXT_BACKEND", "auto")  # numba kernels if installed, else torch
    return out


def make_inputs(B: int, T: int, args: Args) -> dict[str, torch.Tensor]:
    """One batch of rollout tensors (see the module docstring)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + B * 7919 + T)
    G = B // args.group_size
    lengths = torch.randint(max(1, T // 8), T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T) int64, like verl's attention mask
    # 0/1 scores, every group mixed: row 0 of a group is positive, row 1 negative, the rest coin flips
    scores = torch.randint(0, 2, (G, args.group_size), generator=g).float()
    scores[:, 0], scores[:, 1] = 1.0, 0.0
    scores = scores.flatten()
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scores
    # response ids; rows of one group share a prefix of random length (so SCVL has divergence points)
    ids = torch.randint(0, args.vocab_size, (B, T), generator=g)
    prefix = (torch.rand(G, generator=g) * lengths.view(G, -1).min(1).values / 2).long()  # (G,)
    shared = torch.arange(T)[None, :] < prefix.repeat_interleave(args.group_size)[:, None]
    first_of_group = ids.view(G, args.group_size, T)[:, :1].expand(-1, args.group_size, -1).reshape(B, T)
    ids = torch.where(shared, first_of_group, ids)
    boundary_table = torch.zeros(args.vocab_size, dtype=torch.bool)
    n_delim = max(1, round(args.delimiter_frac * args.vocab_size))
    boundary_table[torch.randperm(args.vocab_size, generator=g)[:n_delim]] = True
    return {
        "rewards": rewards,
        "values": 2 * torch.rand(B, T, generator=g) - 1,
        "global_values": 2 * torch.rand(B, T, generator=g) - 1,
        "entropy": 3 * torch.rand(B, T, generator=g),
        "response_mask": mask,
        "response_ids": ids,
        "boundary_table": boundary_table,
        "scores": scores,
        "group_ids": torch.arange(G).repeat_interleave(args.group_size),
    }


def timeit(fn, repeats: int, warmup: int) -> dict:
    """First-call time, then the median of `repeats` timed calls after `warmup` untimed ones."""
    times, first = [], None
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    return {"median_s": statistics.median(times), "first_s": first, "times_s": times}


def bench_size(B: int, T: int, args: Args, core, verl_gae, synapo, vapo) -> dict:
    """Time every function on one (B, T) batch; check our GAE against verl's on it."""
    if B % args.group_size:
        raise ValueError(f"B={B} must be a multiple of group_size={args.group_size}")
    x = make_inputs(B, T, args)
    r, v, m, ent = x["rewards"], x["values"], x["response_mask"], x["entropy"]
    ids, table = x["response_ids"], x["boundary_table"]
    seg_kw = {"min_len": synapo.hvm_min_len, "max_len": synapo.hvm_max_len, "fallback_len": synapo.hvm_fallback_len}
    hvm_kw = {"global_lam": synapo.hvm_global_lambda, "global_weight": synapo.hvm_global_weight}
    lam = core.ea_gae_lambda(m, ent, alpha=synapo.ea_gae_alpha, beta=synapo.ea_gae_beta)
    seg = core.segment_ids(ids, m, table, **seg_kw)
    fns = {
        "verl_gae": lambda: verl_gae(r, v, m, args.gamma, args.gae_lambda),
        "ours_gae": lambda: core.compute_gae(r, v, m, gamma=args.gamma, lam=args.gae_lambda, whiten=True),
        "ea_gae_lambda": lambda: core.ea_gae_lambda(m, ent, alpha=synapo.ea_gae_alpha, beta=synapo.ea_gae_beta),
        "segment_ids": lambda: core.segment_ids(ids, m, table, **seg_kw),
        "hvm_advantages": lambda: core.hvm_advantages(
            r, v, x["global_values"], m, seg, gamma=args.gamma, lam=lam, whiten=synapo.whiten_advantages, **hvm_kw
        ),
        "scvl_pairs": lambda: core.scvl_pairs(
            ids, m, x["scores"], x["group_ids"], threshold=synapo.scvl_threshold, max_pairs=synapo.scvl_max_pairs
        ),
        "stage_synapo": lambda: core.compute_synapo_advantages(synapo, **x),
        "stage_vapo": lambda: core.compute_synapo_advantages(vapo, **x),
    }
    row = {"B": B, "T": T, "valid_tokens": int(m.sum()), "timings": {}}
    for name, fn in fns.items():
        repeats = args.repeats
        if name == "verl_gae":  # ~2 s a call at 512x16384: fit the timed calls in verl_budget_s
            t0 = time.perf_counter()
            fn()
            repeats = max(1, min(args.repeats, int(args.verl_budget_s / (time.perf_counter() - t0))))
        row["timings"][name] = timeit(fn, repeats, args.warmup)
        print(f"  B={B:4d} T={T:6d} {name:15s} {row['timings'][name]['median_s'] * 1e3:10.1f} ms (n={repeats})")
    (a_ref, g_ref), (a, g) = fns["verl_gae"](), fns["ours_gae"]()
    valid = m.bool()
    row["max_abs_diff"] = {
        "advantages": float((a - a_ref)[valid].abs().max()),
        "returns": float((g - g_ref)[valid].abs().max()),
    }
    row["scvl_pairs"] = int(fns["scvl_pairs"]().pos_index.numel())
    row["segments_mean"] = float((seg.max(1).values + 1).float().mean())
    return row


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    import synapo_ext.core as core

    import_core_s = time.perf_counter() - t0
    from verl.trainer.ppo.core_algos import compute_gae_advantage_return

    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    vers = versions()
    print(f"command: {command}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"import synapo_ext.core: {import_core_s * 1e3:.0f} ms")
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}: other work on this machine will skew the timings")

    synapo = core.params_from_preset("synapo", gamma=args.gamma)
    vapo = core.params_from_preset("vapo", gamma=args.gamma)
    results = [bench_size(B, T, args, core, compute_gae_advantage_return, synapo, vapo) for B, T in args.shapes]

    table = markdown_table(results)
    print()
    print(table)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        "# Advantage stage on the CPU: verl 0.9.1 GAE vs synapo_ext\n\n"
        f"Command: `{command}`\n\nVersions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + "\n\n"
        f"Medians of {args.repeats} calls after {args.warmup} warm-up (verl: fewer where one call is slow, see n). "
        f"`x verl` = time / verl's time. import synapo_ext.core: {import_core_s * 1e3:.0f} ms. "
        f"Load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs.\n\n"
    )
    (out / "bench_advantages.md").write_text(header + table + "\n")
    payload = {"command": command, "versions": vers, "args": asdict(args), "import_core_s": import_core_s}
    (out / "bench_advantages.json").write_text(json.dumps(payload | {"results": results}, indent=1) + "\n")
    print(f"\nwrote {out / 'bench_advantages.md'} and {out / 'bench_advantages.json'}")


def markdown_table(results: list[dict]) -> str:
    ms = lambda row, name: row["timings"][name]["median_s"] * 1e3  # noqa: E731
    parts = ("ea_gae_lambda", "segment_ids", "hvm_advantages", "scvl_pairs")
    lines = [
        "| B | T | verl GAE ms (n) | ours GAE ms | x verl | SynAPO stage ms | x verl "
        "| stage 1st call ms | parts: EA-GAE / seg / HVM / SCVL ms | VAPO stage ms | x verl | max abs diff A / G |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in results:
        verl = ms(row, "verl_gae")
        n = len(row["timings"]["verl_gae"]["times_s"])
        lines.append(
            f"| {row['B']} | {row['T']} | {verl:.1f} ({n}) | {ms(row, 'ours_gae'):.1f} | "
            f"{ms(row, 'ours_gae') / verl:.3f} | {ms(row, 'stage_synapo'):.1f} | "
            f"{ms(row, 'stage_synapo') / verl:.3f} | {row['timings']['stage_synapo']['first_s'] * 1e3:.1f} | "
            + " / ".join(f"{ms(row, p):.1f}" for p in parts)
            + f" | {ms(row, 'stage_vapo'):.1f} | {ms(row, 'stage_vapo') / verl:.3f} | "
            f"{row['max_abs_diff']['advantages']:.1e} / {row['max_abs_diff']['returns']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
