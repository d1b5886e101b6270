"""Advantage-stage timings and peak memory on the CPU: the per-token GAE loop (verl's) vs synapo_ext's whole stage.

    python benchmarks/bench_advantages.py                       # 512x16384 and 2048x16384, memory up to 8192x16384
    python benchmarks/bench_advantages.py --quick               # 64x1024 and 64x4096, memory at 64x4096
    python benchmarks/bench_advantages.py --sizes 512x16384 --memory-sizes 512x16384 --repeats 3

Runs from the default install (`pip install synapo-ext`: torch + numba); verl is optional (the `bench` nox session
has it): the baseline is `verl_gae_loop`, verl 0.9.1's `compute_gae_advantage_return` copied below (the classic
per-token loop, ~6 B-wide ops per token), and verl's own function is timed as well when verl imports.

Inputs (the same tensors for every function at one size): right-padded rows of random length in [T/8, T]
(mask int64, as verl's attention mask), a sparse 0/1 outcome reward on each row's last valid token, values and
global values in [-1, 1], entropy in [0, 3] nats, response ids from a vocabulary of `vocab_size` of which
`delimiter_frac` are delimiter tokens, groups of `group_size` responses sharing a random prefix, each group
with mixed scores.

Timed, per size, round-robin (one call of each function per round, so slow phases of a shared machine hit all of
them alike; medians over rounds; the loop runs at most `loop_budget_s` of rounds):
- loop: `verl_gae_loop` (constant lambda, whitened); verl: verl's function, when installed;
- stage[backend]: `compute_synapo_advantages` with the `synapo` preset (EA-GAE lambda, segments, HVM advantages and
  targets, SCVL pairs with their partner values, positive-LM weights, metrics) for backend `auto` (what the default
  install runs: numba), `numba` and `torch` (the pure-torch fallback, also the GPU path); vapo[backend]: the
  `vapo` preset; gae[auto]: `compute_gae` with verl's arguments, checked against the loop.
Peak memory, per size and function, in a fresh child process (glibc returns freed blocks to the system at once
there, MALLOC_MMAP_THRESHOLD_=65536): the process's peak resident memory during one call minus before it (Linux
/proc/self/clear_refs resets the peak), i.e. the extra bytes over the inputs, next to the bytes of the outputs.
Writes benchmarks/out/<out_name>.md (tables) and .json (raw timings, versions, arguments); with --results, to
benchmarks/results/ (the committed tables).
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from settings_cli import dataclass_parser, default_out


@dataclass
class Args:
    sizes: str = "512x16384,2048x16384"
    """comma-separated BxT sizes to time"""
    memory_sizes: str = "512x16384,2048x16384,8192x16384"
    """comma-separated BxT sizes to measure peak memory at (skipped, and said so, where RAM is short)"""
    backends: str = "auto,numba,torch"
    """backends of the stage to time (auto: what the install picks)"""
    repeats: int = 5
    """rounds of timed calls (the median is reported)"""
    warmup: int = 1
    """untimed calls of each function before timing (the first is reported as the first-call time)"""
    loop_budget_s: float = 30.0
    """at most about this many seconds of timed loop calls per size (fewer rounds for the loop, at least 1)"""
    quick: bool = False
    """shortcut for --sizes 64x1024,64x4096 --memory-sizes 64x4096 --repeats 3"""
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
    """the constant lambda of the loop and of `compute_gae`"""
    threads: int = 0
    """torch intra-op threads (0: torch's default)"""
    out_dir: str = ""
    """where the Markdown table and the JSON go (default benchmarks/out, git-ignored; see --results)"""
    results: bool = False
    """write to benchmarks/results (the committed tables) instead"""
    out_name: str = "bench_advantages"
    """file name (without suffix) of the results"""
    memory_child: str = ""
    """internal: measure peak memory at this BxT in this process and print it as JSON"""
    memory_skip: str = ""
    """internal: comma-separated functions the memory child leaves out"""


def parse_args() -> Args:
    parser = dataclass_parser(Args, __doc__.splitlines()[0], dashes=True)
    args = Args(**vars(parser.parse_args()))
    if args.quick:
        args.sizes = "64x1024,64x4096" if args.sizes == Args.sizes else args.sizes
        args.memory_sizes = "64x4096" if args.memory_sizes == Args.memory_sizes else args.memory_sizes
        args.repeats = min(args.repeats, 3)
    return args


def shapes(sizes: str) -> list[tuple[int, int]]:
    return [tuple(int(n) for n in s.lower().split("x")) for s in sizes.split(",") if s.strip()]


# --- the baseline: verl 0.9.1's compute_gae_advantage_return and masked_whiten, copied (Apache-2.0, (c) Bytedance)
# from verl/trainer/ppo/core_algos.py and verl/utils/torch_functional.py, unchanged but for names and comments.


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (torch.where(mask.bool(), values, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def _masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = _masked_mean(values, mask)
    variance = _masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def verl_gae_loop(
    token_level_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's per-token GAE loop: masked tokens carry nextvalues and lastgaelam; returns before whitening."""
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        gen_len = token_level_rewards.shape[-1]
        for t in reversed(range(gen_len)):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
        advantages = _masked_whiten(advantages, response_mask)
    return advantages, returns


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform(), "cpus": str(os.cpu_count())}
    for dist in ("torch", "verl", "numpy", "numba", "synapo-ext"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "-"
    out["torch_threads"] = str(torch.get_num_threads())
    out["load_avg_1m"] = f"{os.getloadavg()[0]:.2f}"  # other work on the machine skews the timings
    out["SYNAPO_EXT_BACKEND"] = os.environ.get("SYNAPO_EXT_BACKEND", "auto")
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
    del shared, first_of_group
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


def available_backends(args: Args) -> list[str]:
    from synapo_ext.core.backend import numba_available

    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    return [b for b in wanted if b != "numba" or numba_available()]


def functions(x: dict, args: Args, backends: list[str]) -> dict:
    """name -> zero-argument callable, every one on the same inputs."""
    import synapo_ext.core as core
    from synapo_ext.core.backend import use_backend

    synapo = core.params_from_preset("synapo", gamma=args.gamma)
    vapo = core.params_from_preset("vapo", gamma=args.gamma)
    r, v, m = x["rewards"], x["values"], x["response_mask"]

    def under(backend, fn):
        def call():
            with use_backend(backend):
                return fn()

        return call

    fns = {"loop": lambda: verl_gae_loop(r, v, m, args.gamma, args.gae_lambda)}
    try:
        from verl.trainer.ppo.core_algos import compute_gae_advantage_return

        fns["verl"] = lambda: compute_gae_advantage_return(r, v, m, args.gamma, args.gae_lambda)
    except ImportError:
        pass
    fns["gae[auto]"] = lambda: core.compute_gae(r, v, m, gamma=args.gamma, lam=args.gae_lambda, whiten=True)
    for b in backends:
        fns[f"stage[{b}]"] = under(b, lambda: core.compute_synapo_advantages(synapo, **x))
        fns[f"vapo[{b}]"] = under(b, lambda: core.compute_synapo_advantages(vapo, **x))
    return fns


def bench_size(B: int, T: int, args: Args, backends: list[str]) -> dict:
    """Round-robin timings of every function on one (B, T) batch; our GAE checked against the loop."""
    if B % args.group_size:
        raise ValueError(f"B={B} must be a multiple of group_size={args.group_size}")
    x = make_inputs(B, T, args)
    fns = functions(x, args, backends)
    row = {"B": B, "T": T, "valid_tokens": int(x["response_mask"].sum()), "timings": {}}
    allowed = {}
    for name, fn in fns.items():
        first = []
        for _ in range(args.warmup):
            t0 = time.perf_counter()
            fn()
            first.append(time.perf_counter() - t0)
        slow = name in ("loop", "verl")
        allowed[name] = max(1, min(args.repeats, int(args.loop_budget_s / first[0]))) if slow else args.repeats
        row["timings"][name] = {"first_s": first[0] if first else None, "times_s": [], "cpu_s": []}
    for i in range(args.repeats):
        for name, fn in fns.items():
            if i < allowed[name]:
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                row["timings"][name]["times_s"].append(time.perf_counter() - t0)
                row["timings"][name]["cpu_s"].append(time.process_time() - c0)
    for name, t in row["timings"].items():
        t["median_s"] = statistics.median(t["times_s"])
        t["median_cpu_s"] = statistics.median(t["cpu_s"])  # CPU seconds of all threads: less sensitive to load
        print(f"  B={B:5d} T={T:6d} {name:14s} {t['median_s'] * 1e3:10.1f} ms (n={len(t['times_s'])})")
    (a_ref, g_ref), (a, g) = fns["loop"](), fns["gae[auto]"]()
    valid = x["response_mask"].bool()
    row["max_abs_diff_vs_loop"] = {
        "advantages": float((a - a_ref)[valid].abs().max()),
        "returns": float((g - g_ref)[valid].abs().max()),
    }
    row["load_avg_1m"] = os.getloadavg()[0]
    return row


# --- peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _tensor_bytes(obj) -> int:
    """Bytes of the distinct tensors reachable from a result (tuples, NamedTuples, dataclasses)."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            if o.data_ptr() not in seen:
                seen.add(o.data_ptr())
                total += o.numel() * o.element_size()
        elif isinstance(o, (tuple, list)):
            stack.extend(o)
        elif hasattr(o, "__dataclass_fields__"):
            stack.extend(getattr(o, f) for f in o.__dataclass_fields__)
    return total


def peak_extra(fn) -> dict:
    """Peak resident bytes during `fn()` over those before it, and the bytes of what it returns."""
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current resident size
    result = fn()
    peak = _status_kib("VmHWM")
    out = {"peak_extra_bytes": (peak - before) * 1024, "output_bytes": _tensor_bytes(result)}
    del result
    return out


def memory_child(size: str, args: Args, skip: list[str]) -> dict:
    """In this (fresh) process: peak extra memory of each function at one size (but those in `skip`)."""
    B, T = shapes(size)[0]
    backends = available_backends(args)
    small = make_inputs(args.group_size * 2, 64, args)
    for fn in functions(small, args, backends).values():  # compile / load the kernels outside the measurement
        fn()
    x = make_inputs(B, T, args)
    input_bytes = _tensor_bytes(tuple(x.values()))
    fns = {name: fn for name, fn in functions(x, args, backends).items() if name not in skip}
    memory = {name: peak_extra(fn) for name, fn in fns.items()}
    return {"B": B, "T": T, "input_bytes": input_bytes, "memory": memory, "skipped_functions": skip}


def measure_memory(B: int, T: int, args: Args, previous: dict | None) -> dict:
    """Run `memory_child` once per function, each in a fresh child process. A function whose peak, scaled from the
    previous size, would not fit in half the memory available now is left out (said so in the table): the machine
    is shared."""
    input_bytes = B * T * (4 * 4 + 8 + 8)  # 4 float32 tensors, int64 mask and ids
    available = _status_meminfo("MemAvailable") * 1024
    names = list(functions(make_inputs(args.group_size * 2, 64, args), args, available_backends(args)))
    skip = []
    if previous and "memory" in previous:
        scale = B * T / (previous["B"] * previous["T"])
        for name, r in previous["memory"].items():
            if input_bytes + r["peak_extra_bytes"] * scale > available / 2:
                skip.append(name)
        skip += [name for name in previous.get("skipped_functions", []) if name not in skip]
    if B * T > 2048 * 16384:  # minutes a call here; the loop's memory is two (B, T) tensors plus its outputs
        skip += [name for name in ("loop", "verl") if name in names and name not in skip]
    if input_bytes > available / 2:
        return {"B": B, "T": T, "skipped": f"inputs {input_bytes / 2**30:.0f} GiB, {available / 2**30:.0f} GiB free"}
    # one fresh child per function: memory a previous call freed but the process kept would hide part of the next
    # call's peak (measured: the torch stage's 795 MB alone, 510 MB after the other functions in one process)
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    memory = {}
    for name in names:
        if name in skip:
            continue
        cmd = [sys.executable, __file__, "--memory-child", f"{B}x{T}", "--backends", args.backends]
        cmd += ["--seed", str(args.seed), "--threads", str(args.threads)]
        cmd += ["--memory-skip", ",".join(n for n in names if n != name)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"B": B, "T": T, "skipped": f"child for {name} failed ({proc.returncode}): {proc.stderr[-500:]}"}
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        memory |= child["memory"]
        input_bytes = child["input_bytes"]
    return {"B": B, "T": T, "input_bytes": input_bytes, "memory": memory, "skipped_functions": skip}


def _status_meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# --- report


def timing_table(results: list[dict], backends: list[str]) -> str:
    ms = lambda row, name: row["timings"][name]["median_s"] * 1e3  # noqa: E731
    has_verl = all("verl" in row["timings"] for row in results)
    head = ["B", "T", "loop ms (n)"] + (["verl ms"] if has_verl else [])
    for b in backends:
        head += [f"stage {b} ms", "x loop"] + (["x verl"] if has_verl else [])
    head += ["CPU s: loop / stage auto", "x loop (CPU)", "stage auto 1st call ms", "vapo auto ms", "x loop"]
    head += ["GAE auto ms", "max abs diff A / G vs loop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 1) + "---|"]
    for row in results:
        loop = ms(row, "loop")
        cells = [str(row["B"]), str(row["T"]), f"{loop:.0f} ({len(row['timings']['loop']['times_s'])})"]
        if has_verl:
            cells.append(f"{ms(row, 'verl'):.0f}")
        for b in backends:
            stage = ms(row, f"stage[{b}]")
            cells += [f"{stage:.1f}", f"**{loop / stage:.1f}x**" if b == "auto" else f"{loop / stage:.1f}x"]
            if has_verl:
                cells.append(f"{ms(row, 'verl') / stage:.1f}x")
        first = row["timings"].get("stage[auto]", {}).get("first_s")
        vapo = ms(row, "vapo[auto]") if "vapo[auto]" in row["timings"] else float("nan")
        diff = row["max_abs_diff_vs_loop"]
        cpu_loop, cpu_stage = (row["timings"][name]["median_cpu_s"] for name in ("loop", "stage[auto]"))
        cells += [f"{cpu_loop:.2f} / {cpu_stage:.3f}", f"{cpu_loop / cpu_stage:.1f}x"]
        cells += [
            f"{first * 1e3:.0f}" if first else "-",
            f"{vapo:.1f}",
            f"{loop / vapo:.1f}x",
            f"{ms(row, 'gae[auto]'):.1f}",
            f"{diff['advantages']:.1e} / {diff['returns']:.1e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(memory: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:.0f}"  # noqa: E731
    lines = [
        "| B | T | inputs MiB | function | outputs MiB | peak extra MiB | peak extra / outputs |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for m in memory:
        if "skipped" in m:
            lines.append(f"| {m['B']} | {m['T']} | | skipped: {m['skipped']} | | | |")
            continue
        for name in m.get("skipped_functions", []):
            lines.append(f"| {m['B']} | {m['T']} | {mib(m['input_bytes'])} | {name} | | not run: too big here | |")
        for name, r in m["memory"].items():
            ratio = r["peak_extra_bytes"] / r["output_bytes"] if r["output_bytes"] else float("nan")
            lines.append(
                f"| {m['B']} | {m['T']} | {mib(m['input_bytes'])} | {name} | {mib(r['output_bytes'])} | "
                f"{mib(r['peak_extra_bytes'])} | {ratio:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args, [n for n in args.memory_skip.split(",") if n])))
        return
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    import synapo_ext.core  # noqa: F401

    import_core_s = time.perf_counter() - t0
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    vers = versions()
    backends = available_backends(args)
    print(f"command: {command}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"import synapo_ext.core: {import_core_s * 1e3:.0f} ms; backends timed: {', '.join(backends)}")
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}: other work on this machine skews the timings")

    results = [bench_size(B, T, args, backends) for B, T in shapes(args.sizes)]
    memory = []
    for B, T in shapes(args.memory_sizes):
        memory.append(measure_memory(B, T, args, memory[-1] if memory else None))
        print(f"  memory B={B} T={T}: {memory[-1].get('skipped') or 'done'}")

    tables = timing_table(results, backends) + "\n\n" + memory_table(memory)
    print()
    print(tables)
    out = Path(args.out_dir or default_out(results=args.results))
    out.mkdir(parents=True, exist_ok=True)
    header = (
        "# Advantage stage on the CPU: the per-token GAE loop (verl's) vs synapo_ext's whole stage\n\n"
        f"Command: `{command}`\n\nVersions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + "\n\n"
        f"Medians of {args.repeats} round-robin rounds after {args.warmup} warm-up call(s) (the loop: fewer rounds "
        "where one call is slow, see n). `x loop` = loop time / stage time, measured in the same run; "
        "`x loop (CPU)`: the same ratio of CPU seconds (all threads), which other work on the machine skews less. "
        f"import synapo_ext.core: {import_core_s * 1e3:.0f} ms. Load average (1 min) at the end: "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs.\n\n"
        "Peak memory: extra resident bytes during one call over the inputs (child process, see the script's "
        "docstring); outputs: the bytes of what the call returns.\n\n"
    )
    (out / f"{args.out_name}.md").write_text(header + tables + "\n")
    payload = {"command": command, "versions": vers, "args": asdict(args), "import_core_s": import_core_s}
    payload |= {"results": results, "memory": memory}
    (out / f"{args.out_name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {out / args.out_name}.md and .json")


if __name__ == "__main__":
    main()
