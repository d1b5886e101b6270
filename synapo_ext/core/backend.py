"""Where the advantage stage runs: fused compiled kernels on CPU when numba imports, else the pure-torch stage.

This is the one choice the core makes about speed: `compute_synapo_advantages` asks `fused_kernels(...)` once per
call and runs either the fused stage (`synapo_ext.core.fast`: one compiled pass per row) or the torch stage that
composes the public functions. The public functions themselves are torch only. Both stages are tested against the
same float64 reference and against each other.

Choose with the environment variable `SYNAPO_EXT_BACKEND` (`auto`, `torch`, `numba`) or `use_backend(...)`, which
is local to the calling thread / task (a context variable), not to the process: `auto` (default) takes numba for
CPU tensors when it imports, torch otherwise (GPU tensors always use torch). numba's own settings are left as the
user set them, and its thread pool is not used: large batches run the serial kernels on blocks of rows in plain
threads (see `fast/kernels.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator
from types import SimpleNamespace

import torch

__all__ = ["BACKENDS", "PARALLEL_MIN_ELEMENTS", "current_backend", "fused_kernels", "numba_available", "use_backend"]

BACKENDS = ("auto", "torch", "numba")
_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("synapo_ext_backend", default=None)
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


def fused_kernels(*tensors: torch.Tensor | None) -> SimpleNamespace | None:
    """The fused stage's kernels for these tensors under the current choice (serial, or on blocks of rows in
    threads from `PARALLEL_MIN_ELEMENTS` elements), or None: run the torch stage.

    Raises:
        ValueError: the numba backend was chosen for tensors that are not on the CPU.
    """
    global _numba_unusable
    name = current_backend()
    present = [t for t in tensors if t is not None]
    on_cpu = all(t.device.type == "cpu" for t in present)
    if name == "numba" and not on_cpu:
        raise ValueError("the numba backend runs on CPU tensors only")
    if name == "torch" or not on_cpu or (name == "auto" and (_numba_unusable or not numba_available())):
        return None
    try:
        from .fast import kernels
    except ImportError:  # installed but unusable (e.g. a numpy it does not support): auto falls back to torch
        if name == "numba":
            raise
        _log.warning("numba is installed but does not import: the core runs its pure-torch path", exc_info=True)
        _numba_unusable = True
        return None
    large = max((t.numel() for t in present), default=0) >= PARALLEL_MIN_ELEMENTS
    return kernels.PARALLEL if large else kernels.SERIAL
