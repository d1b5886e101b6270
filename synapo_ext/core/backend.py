"""Which implementation runs: compiled numba kernels on CPU when installed, else the pure-torch path.

Both are exact implementations of the same formulas and are tested against the same float64 reference.
Every operation (`OPERATIONS`) has one entry in a registry: its torch implementation (registered next to its
public function) and optionally a numba one (registered below). `implementation(op, *tensors)` is the only place
that chooses, so a new kernel (e.g. a GPU one) registers in one place.

Choose with the environment variable `SYNAPO_EXT_BACKEND` (`auto`, `torch`, `numba`) or `use_backend(...)`, which
is local to the calling thread / task (a context variable), not to the process: `auto` (default) takes numba for
CPU tensors when it imports, torch otherwise (GPU tensors always use torch). numba's own settings are left as the
user set them, and its thread pool is not used: large batches run the serial kernels on blocks of rows in plain
threads (see `_numba_kernels.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from types import ModuleType, SimpleNamespace

import torch

__all__ = [
    "BACKENDS",
    "OPERATIONS",
    "current_backend",
    "implementation",
    "numba_available",
    "register",
    "use_backend",
]

BACKENDS = ("auto", "torch", "numba")
OPERATIONS = (
    "ea_gae_lambda",
    "gae",
    "whiten",
    "segment_ids",
    "hvm",
    "row_lengths",
    "divergence",
    "masked_stats",
    "stage_mask",
    "stage",
)
_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("synapo_ext_backend", default=None)
_REGISTRY: dict[str, dict[str, Callable]] = {op: {} for op in OPERATIONS}
_kernels: ModuleType | None = None  # the compiled kernel module, imported on first use
_numba_unusable = False  # numba is installed but failed to import (auto then runs torch)
_log = logging.getLogger(__name__)

# Below this many tokens the kernels run in the caller's thread alone: starting threads would cost more than
# they save.
PARALLEL_MIN_ELEMENTS = 1 << 20


@functools.lru_cache(maxsize=1)
def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def current_backend() -> str:
    """The backend chosen in this context: `use_backend`'s, else `SYNAPO_EXT_BACKEND`, else `auto`."""
    name = _choice.get() or os.environ.get("SYNAPO_EXT_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"`SYNAPO_EXT_BACKEND` must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with backend `name` (`auto`, `torch` or `numba`), in this thread / task only."""
    if name not in BACKENDS:
        raise ValueError(f"`name` must be one of {BACKENDS}, got {name!r}")
    if name == "numba" and not numba_available():
        raise ImportError("the numba backend needs numba (a dependency of synapo-ext): pip install numba")
    token = _choice.set(name)
    try:
        yield
    finally:
        _choice.reset(token)


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` implements operation `op` on `backend` (`torch`, or `numba` taking the kernels first).

    Raises:
        ValueError: an unknown operation, or a different function already registered for (op, backend).
    """
    if op not in _REGISTRY:
        raise ValueError(f"`op` must be one of {OPERATIONS}, got {op!r}")

    def decorate(fn: Callable) -> Callable:
        known = _REGISTRY[op].get(backend)
        if known is not None and known.__qualname__ != fn.__qualname__:
            raise ValueError(f"{op!r} already has a {backend!r} implementation: {known.__qualname__}")
        _REGISTRY[op][backend] = fn
        return fn

    return decorate


def implementation(op: str, *tensors: torch.Tensor | None) -> Callable:
    """The implementation of `op` to run on these tensors under the current backend choice.

    Raises:
        ValueError: the numba backend was chosen for tensors that are not on the CPU.
    """
    impls = _REGISTRY[op]
    name = current_backend()
    present = [t for t in tensors if t is not None]
    on_cpu = all(t.device.type == "cpu" for t in present)
    if name == "numba" and not on_cpu:
        raise ValueError("the numba backend runs on CPU tensors only")
    fallback = name == "auto" and (_numba_unusable or not numba_available())
    if name == "torch" or not on_cpu or "numba" not in impls or fallback:
        return impls["torch"]
    try:
        kernels = _load_kernels()
    except ImportError:  # installed but unusable (e.g. a numpy it does not support): auto falls back to torch
        if name == "numba":
            raise
        _log.warning("numba is installed but does not import: the core runs its pure-torch path", exc_info=True)
        _mark_numba_unusable()
        return impls["torch"]
    large = max((t.numel() for t in present), default=0) >= PARALLEL_MIN_ELEMENTS
    return functools.partial(impls["numba"], kernels.PARALLEL if large else kernels.SERIAL)


def _mark_numba_unusable() -> None:
    global _numba_unusable
    _numba_unusable = True


def _load_kernels() -> ModuleType:
    global _kernels
    if _kernels is None:
        from . import _numba_kernels, _numba_stage  # noqa: F401 (_numba_stage adds the fused stage's kernels)

        _kernels = _numba_kernels
    return _kernels


def as_numpy(x: torch.Tensor):
    """A contiguous CPU tensor's memory as a numpy array (no copy when already contiguous)."""
    return x.detach().contiguous().numpy()


# Tensor-level wrappers around the kernels: allocate outputs, pass numpy views, return tensors.


def _lam_array(lam: torch.Tensor | float, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    if isinstance(lam, torch.Tensor):
        return lam.to(dtype).contiguous(), True
    return torch.full((1, 1), float(lam), dtype=dtype), False


@register("gae", "numba")
def numba_gae(
    k: SimpleNamespace, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, lam, gamma: float, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    advantages = torch.empty(rewards.shape, dtype=dtype)
    returns = torch.empty_like(advantages)
    lam_t, per_token = _lam_array(lam, dtype)
    k.gae_rows(
        as_numpy(rewards.to(dtype)),
        as_numpy(values.to(dtype)),
        as_numpy(mask),
        as_numpy(lam_t),
        per_token,
        gamma,
        as_numpy(advantages),
        as_numpy(returns),
    )
    return advantages, returns


@register("whiten", "numba")
def numba_whiten(k: SimpleNamespace, x: torch.Tensor, mask: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """(x - mean) * rsqrt(var + 1e-8) over valid tokens, float64 sums (two passes: mean, then centred squares);
    into `x` itself with `inplace`."""
    sums = torch.empty(x.shape[0], 2, dtype=torch.float64)
    counts = torch.empty(x.shape[0], dtype=torch.int64)
    k.masked_row_sums(as_numpy(x), as_numpy(mask), 0.0, as_numpy(sums), as_numpy(counts))
    count = int(counts.sum())
    if count == 0:  # an empty batch
        return x
    if count < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens in `response_mask`, got {count}")
    mean = float(sums[:, 0].sum()) / count
    k.masked_row_sums(as_numpy(x), as_numpy(mask), mean, as_numpy(sums), as_numpy(counts))
    var = float(sums[:, 1].sum()) / (count - 1)
    return (x.sub_(mean) if inplace else x - mean).mul_((var + 1e-8) ** -0.5)


@register("ea_gae_lambda", "numba")
def numba_ea_gae_lambda(
    k: SimpleNamespace, mask, entropy, alpha, beta, eps, lambda_min, lambda_max, dtype
) -> torch.Tensor:
    out = torch.empty(mask.shape, dtype=dtype)
    has_entropy = entropy is not None
    entropy_t = entropy.to(dtype) if has_entropy else torch.zeros(1, 1, dtype=dtype)
    k.ea_gae_lambda_rows(
        as_numpy(mask), as_numpy(entropy_t), has_entropy, alpha, beta, eps, lambda_min, lambda_max, as_numpy(out)
    )
    return out


@register("segment_ids", "numba")
def numba_segment_ids(
    k: SimpleNamespace, ids, mask, table, min_len, max_len, fallback_len, dtype=torch.int64
) -> torch.Tensor:
    out = torch.empty(ids.shape, dtype=dtype)
    k.segment_rows(
        as_numpy(ids.long()), as_numpy(mask), as_numpy(table), min_len, max_len or 0, fallback_len or 0, as_numpy(out)
    )
    return out


@register("hvm", "numba")
def numba_hvm(k: SimpleNamespace, r, v_loc, v_glob, mask, seg_ids, lam, gamma, global_lam, global_weight, dtype):
    advantages, local_returns, global_returns = (torch.empty(r.shape, dtype=dtype) for _ in range(3))
    start_mask = torch.empty(r.shape, dtype=torch.bool)
    lam_t, per_token = _lam_array(lam, dtype)
    k.hvm_rows(
        as_numpy(r.to(dtype)),
        as_numpy(v_loc.to(dtype)),
        as_numpy(v_glob.to(dtype)),
        as_numpy(mask),
        as_numpy(seg_ids.long()),
        as_numpy(lam_t),
        per_token,
        gamma,
        global_lam,
        float(global_weight),
        as_numpy(advantages),
        as_numpy(local_returns),
        as_numpy(global_returns),
        as_numpy(start_mask),
    )
    return advantages, local_returns, global_returns, start_mask


@register("row_lengths", "numba")
def numba_row_lengths(k: SimpleNamespace, mask: torch.Tensor) -> torch.Tensor:
    """Last valid position + 1 of each row, int64 (B,)."""
    out = torch.empty(mask.shape[0], dtype=torch.long)
    k.row_lengths(as_numpy(mask), as_numpy(out))
    return out


@register("divergence", "numba")
def numba_divergence(k: SimpleNamespace, ids, pos, neg, shortest) -> torch.Tensor:
    out = torch.empty_like(pos)
    k.divergence(as_numpy(ids), as_numpy(pos), as_numpy(neg), as_numpy(shortest), as_numpy(out))
    return out


@register("masked_stats", "torch")
def torch_masked_stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """(mean, min, max) of `x` over the valid tokens of a bool `mask` (at least one)."""
    valid = x[mask]
    return float(valid.double().mean()), float(valid.min()), float(valid.max())


@register("masked_stats", "numba")
def numba_masked_stats(k: SimpleNamespace, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    stats = torch.empty(x.shape[0], 4, dtype=torch.float64)
    k.masked_row_stats(as_numpy(x), as_numpy(mask), as_numpy(stats))
    return float(stats[:, 0].sum() / stats[:, 3].sum()), float(stats[:, 1].min()), float(stats[:, 2].max())


def masked_stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """(mean, min, max) of `x` over the valid tokens of a bool `mask` (at least one)."""
    return implementation("masked_stats", x)(x, mask)
