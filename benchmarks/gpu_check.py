"""The advantage stage on one GPU: synapo_ext's torch path (and a Triton scan) vs verl's per-token GAE loop.

    python benchmarks/gpu_check.py                                # 512x16384 and 8192x4096 on cuda, < 8 minutes
    python benchmarks/gpu_check.py --device cpu --sizes 16x256     # a dry run of the whole script on the CPU

One run, for a machine without verl or internet: the baseline is `verl_gae_loop` (verl 0.9.1's
`compute_gae_advantage_return`, copied in bench_advantages.py). On each size, on the device:
- loop: the per-token loop (constant lambda, whitened), the classic implementation;
- gae: `compute_gae` with the same arguments (the blocked scan);
- stage / vapo: `compute_synapo_advantages` with the `synapo` / `vapo` preset (the torch path: GPU tensors);
- triton_gae: verl's GAE with its two reverse scans in Triton (one program per row, blocks of 1024 tokens, an
  associative scan inside a block), when Triton imports.
Every output is checked against the CPU float64 reference: the same functions on float64 copies of the inputs on
the CPU (the fused numba kernels when numba imports there, else the torch path; both are tested against the
plain-loop reference of tests/core): max abs difference over valid tokens, equal segment starts and SCVL pairs.
Also the peak extra GPU memory of each call over the inputs (torch.cuda.max_memory_allocated).
Times: CUDA-synchronised wall clock, median of `repeats` after one warm-up call. Writes <out>/gpu_check.json and .md
(out: $OUT when set, else benchmarks/out; benchmarks/results with --results).
"""

from __future__ import annotations

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
from bench_advantages import Args as BenchArgs
from bench_advantages import make_inputs, verl_gae_loop
from settings_cli import dataclass_parser, default_out

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's synapo_ext, uninstalled

import synapo_ext.core as core  # noqa: E402


@dataclass
class Args:
    sizes: str = "512x16384,8192x4096"
    """comma-separated BxT sizes"""
    device: str = "cuda"
    """device to time on (cpu for a dry run)"""
    repeats: int = 5
    """timed calls per function (median)"""
    loop_repeats: int = 3
    """timed calls of the per-token loop"""
    budget_s: float = 420.0
    """stop starting new work after this many seconds (the run must end inside 8 minutes)"""
    out: str = ""
    """output folder (default: $OUT, else benchmarks/out, git-ignored; see --results)"""
    results: bool = False
    """write to benchmarks/results (the committed tables) when neither --out nor $OUT is given"""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> dict:
    fn()  # warm-up (Triton/numba compilation, cuBLAS handles, allocator)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times}


def peak_extra(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


# --- Triton: the reverse linear scan x_t = a_t x_{t+1} + b_t (x_T = 0), one program per row, blocks of BLOCK tokens
# from the row's end; inside a block an associative scan of the affine maps x -> a x + b, the block's result
# carried into the next one. GAE is two such scans: the next valid token's value (verl's carry of nextvalues
# through masked tokens), then A_t = delta_t + gamma lambda A_{t+1} on valid tokens, carried through masked ones.

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _compose(a1, b1, a2, b2):
        # (a2, b2) after (a1, b1): x -> a2 (a1 x + b1) + b2
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _reverse_scan_kernel(a_ptr, b_ptr, x_ptr, T, N_BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
        base = tl.program_id(0).to(tl.int64) * T
        k = tl.arange(0, BLOCK)
        carry = 0.0
        for i in range(0, N_BLOCKS):
            t = (N_BLOCKS - 1 - i) * BLOCK + BLOCK - 1 - k  # scan position k is token t: the block reversed
            inside = t < T
            a = tl.load(a_ptr + base + t, mask=inside, other=1.0)
            b = tl.load(b_ptr + base + t, mask=inside, other=0.0)
            a_acc, b_acc = tl.associative_scan((a, b), 0, _compose)
            x = a_acc * carry + b_acc
            tl.store(x_ptr + base + t, x, mask=inside)
            carry = tl.sum(tl.where(k == BLOCK - 1, x, 0.0), 0)

    TRITON = True
except Exception:  # noqa: BLE001 (no Triton, or a Triton this script cannot use)
    TRITON = False


def triton_reverse_scan(a: torch.Tensor, b: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """x_t = a_t x_{t+1} + b_t along dim 1 of contiguous float32 (B, T) tensors."""
    x = torch.empty_like(b)
    B, T = b.shape
    _reverse_scan_kernel[(B,)](a, b, x, T, N_BLOCKS=-(-T // block), BLOCK=block)
    return x


def triton_gae(rewards, values, mask, gamma: float, lam: float):
    """verl's GAE (constant lambda, whitened) with the scans in Triton; returns (advantages, returns)."""
    valid = mask.bool()
    m = valid.float()
    # next valid value after t: y_t = m_{t+1} v_{t+1} + (1 - m_{t+1}) y_{t+1}
    a = torch.ones_like(values)
    b = torch.zeros_like(values)
    a[:, :-1] = 1.0 - m[:, 1:]
    b[:, :-1] = (values * m)[:, 1:]
    next_values = triton_reverse_scan(a, b)
    delta = rewards + gamma * next_values - values
    advantages = triton_reverse_scan(torch.where(valid, gamma * lam, 1.0), torch.where(valid, delta, 0.0))
    returns = advantages + values
    return core.masked_whiten(advantages, valid), returns


def max_diff(x: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> float:
    return float((x.detach().cpu().double() - ref.double())[valid].abs().max())


def check_size(B: int, T: int, args: Args, device: torch.device, deadline: float) -> dict:
    bench_args = BenchArgs()
    x_cpu = make_inputs(B, T, bench_args)
    x = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x_cpu.items()}
    r, v, m = x["rewards"], x["values"], x["response_mask"]
    synapo, vapo = core.params_from_preset("synapo"), core.params_from_preset("vapo")
    gamma, lam = bench_args.gamma, bench_args.gae_lambda
    fns = {
        "loop": lambda: verl_gae_loop(r, v, m, gamma, lam),
        "gae": lambda: core.compute_gae(r, v, m, gamma=gamma, lam=lam, whiten=True),
        "stage": lambda: core.compute_synapo_advantages(synapo, **x),
        "vapo": lambda: core.compute_synapo_advantages(vapo, **x),
    }
    if TRITON and device.type == "cuda":
        fns["triton_gae"] = lambda: triton_gae(r, v, m, gamma, lam)
    row = {"B": B, "T": T, "timings": {}, "peak_extra_bytes": {}, "errors": {}}
    for name, fn in fns.items():
        if time.perf_counter() > deadline:
            row["errors"][name] = "not run: time budget spent"
            continue
        try:
            row["timings"][name] = timed(fn, device, args.loop_repeats if name == "loop" else args.repeats)
            row["peak_extra_bytes"][name] = peak_extra(fn, device)
            print(f"  {B}x{T} {name:10s} {row['timings'][name]['median_s'] * 1e3:10.2f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 (report and go on: one run on a lent machine)
            row["errors"][name] = f"{type(e).__name__}: {e}"[:500]
            print(f"  {B}x{T} {name:10s} failed: {row['errors'][name]}", flush=True)

    # the CPU float64 reference
    t0 = time.perf_counter()
    x64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in x_cpu.items()}
    valid = x_cpu["response_mask"].bool()
    ref_gae = core.compute_gae(x64["rewards"], x64["values"], x64["response_mask"], gamma=gamma, lam=lam, whiten=True)
    ref_stage = core.compute_synapo_advantages(synapo, **x64)
    ref_vapo = core.compute_synapo_advantages(vapo, **x64)
    row["reference_s"] = time.perf_counter() - t0
    checks = {}
    for name, (ref_a, ref_g) in (("loop", ref_gae), ("gae", ref_gae), ("triton_gae", ref_gae)):
        if name in row["timings"]:
            a, g = fns[name]()
            checks[name] = {"advantages": max_diff(a, ref_a, valid), "returns": max_diff(g, ref_g, valid)}
    for name, ref in (("stage", ref_stage), ("vapo", ref_vapo)):
        if name in row["timings"]:
            out = fns[name]()
            c = {"advantages": max_diff(out.advantages, ref.advantages, valid)}
            c["returns"] = max_diff(out.returns, ref.returns, valid)
            if ref.global_returns is not None:
                c["global_returns"] = max_diff(out.global_returns, ref.global_returns, valid)
                c["start_mask_equal"] = bool(torch.equal(out.start_mask.cpu(), ref.start_mask))
            if ref.scvl is not None:
                c["scvl_pairs_equal"] = all(
                    torch.equal(p.cpu(), q) for p, q in zip(out.scvl, ref.scvl, strict=True)
                )  # fmt: skip
            checks[name] = c
    row["max_abs_diff_vs_cpu_float64"] = checks
    print(f"  {B}x{T} checks: {json.dumps(checks)}", flush=True)
    return row


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Advantage stage on one GPU: synapo_ext's torch path vs verl's per-token GAE loop",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        "CUDA-synchronised medians; `x loop` = loop time / time. Max abs diff: against the CPU float64 reference "
        "(valid tokens). Peak: extra GPU memory of one call over the inputs.",
        "",
        "| B | T | function | ms | x loop | peak extra MiB | max abs diff vs CPU float64 |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    for row in results:
        loop = row["timings"].get("loop", {}).get("median_s")
        for name, t in row["timings"].items():
            peak = row["peak_extra_bytes"].get(name)
            check = row["max_abs_diff_vs_cpu_float64"].get(name, {})
            ratio = f"{loop / t['median_s']:.1f}x" if loop else "-"
            lines.append(
                f"| {row['B']} | {row['T']} | {name} | {t['median_s'] * 1e3:.2f} | {ratio} | "
                f"{'-' if peak is None else f'{peak / 2**20:.0f}'} | "
                + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items())
                + " |"
            )
        for name, err in row["errors"].items():
            lines.append(f"| {row['B']} | {row['T']} | {name} | failed | | | {err[:200]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    start = time.perf_counter()
    args = Args(**vars(dataclass_parser(Args, __doc__.splitlines()[0], dashes=True).parse_args()))
    device = torch.device(args.device)
    from synapo_ext.core.backend import numba_available

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "triton": getattr(sys.modules.get("triton"), "__version__", "-") if TRITON else "-",
        "numba (CPU reference)": "yes" if numba_available() else "no",
        "cpus": str(os.cpu_count()),
    }
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    print(f"command: {command}\nversions: {versions}", flush=True)
    deadline = start + args.budget_s
    results = []
    for B, T in (tuple(int(n) for n in s.split("x")) for s in args.sizes.split(",")):
        if time.perf_counter() > deadline:
            results.append({"B": B, "T": T, "timings": {}, "errors": {"all": "not run: time budget spent"}})
            continue
        results.append(check_size(B, T, args, device, deadline))
    meta = {"command": command, "versions": versions, "args": asdict(args), "wall_s": time.perf_counter() - start}
    out = Path(args.out or os.environ.get("OUT") or default_out(results=args.results))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(meta | {"results": results}, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    print(f"wall {meta['wall_s']:.0f} s; wrote {out / 'gpu_check.md'} and .json")


if __name__ == "__main__":
    main()
