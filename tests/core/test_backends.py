"""The backend choice: where `compute_synapo_advantages` runs (the fused stage's kernels or the torch stage; the fused
stage is compared with the torch stage in test_fused_stage.py), local to each thread, numba's settings untouched."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from synapo_ext.core import compute_gae, ea_gae_lambda, hvm_advantages, scvl_pairs, segment_ids
from synapo_ext.core.backend import current_backend, numba_available, use_backend

needs_numba = pytest.mark.skipif(not numba_available(), reason="numba not installed (pip install numba)")


def _case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 6, (1,), generator=gen))
    T = int(torch.randint(1, 150, (1,), generator=gen))
    mask = torch.rand(B, T, generator=gen) > 0.4 * torch.rand(1, generator=gen)
    mask[torch.arange(B), torch.randint(0, T, (B,), generator=gen)] = True  # no empty row
    table = torch.zeros(6, dtype=torch.bool)
    table[0] = seed % 3 != 0  # every third case has no delimiter at all
    return {
        "mask": mask,
        "rewards": torch.randn(B, T, generator=gen) * 0.01,
        "values": torch.rand(B, T, generator=gen) * 2 - 1,
        "global_values": torch.rand(B, T, generator=gen) * 2 - 1,
        "entropy": torch.rand(B, T, generator=gen) * 3,
        "ids": torch.randint(0, 6, (B, T), generator=gen),
        "table": table,
        "scores": (torch.rand(B, generator=gen) > 0.5).float(),
        "gamma": (1.0, 0.9, 0.0)[seed % 3],
        "segments": {"min_len": (1, 3, 7)[seed % 3], "max_len": (None, 5, 11)[seed // 3 % 3], "fallback_len": 4},
    }


def _run(c):
    lam = ea_gae_lambda(c["mask"], c["entropy"], alpha=0.3, beta=-0.2)
    seg = segment_ids(c["ids"], c["mask"], c["table"], **c["segments"])
    gae = compute_gae(c["rewards"], c["values"], c["mask"], gamma=c["gamma"], lam=lam)
    hvm = hvm_advantages(
        c["rewards"], c["values"], c["global_values"], c["mask"], seg, gamma=c["gamma"], lam=lam, global_lam=0.9,
        global_weight=0.7,
    )  # fmt: skip
    pairs = scvl_pairs(c["ids"], c["mask"], c["scores"], torch.arange(c["mask"].shape[0]) // 2, max_pairs=2)
    return lam, seg, gae, hvm, pairs


def test_public_functions_are_torch_on_every_backend():
    """The public functions have one implementation (torch); the backend only chooses how
    `compute_synapo_advantages` runs (fused or torch), so they give the same bits under every choice."""
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(4, 30, generator=gen) > 0.3
    mask[:, 0] = True
    rewards, values = torch.randn(4, 30, generator=gen), torch.randn(4, 30, generator=gen)
    entropy = torch.rand(4, 30, generator=gen) * 3
    results = []
    for name in ("torch", "numba") if numba_available() else ("torch", "auto"):
        with use_backend(name):
            lam = ea_gae_lambda(mask, entropy, alpha=0.3, beta=-0.2)
            results.append((lam, *compute_gae(rewards, values, mask, gamma=0.9, lam=lam, whiten=True)))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_backend_switch():
    with use_backend("torch"):
        assert current_backend() == "torch"
    with pytest.raises(ValueError, match="name"):
        with use_backend("cuda"):
            pass


# --- the choice of backend (these run without numba too) ---


def test_backend_choice_is_local_to_each_thread(monkeypatch):
    monkeypatch.delenv("SYNAPO_EXT_BACKEND", raising=False)
    inside = threading.Barrier(2)
    seen: dict[str, str] = {}

    def worker():
        seen["other thread, before"] = current_backend()
        inside.wait(timeout=10)  # the main thread is inside its `use_backend("torch")` block now
        seen["other thread, during"] = current_backend()
        inside.wait(timeout=10)

    with use_backend("torch"):
        thread = threading.Thread(target=worker)
        thread.start()
        inside.wait(timeout=10)
        inside.wait(timeout=10)
        thread.join(timeout=10)
        assert current_backend() == "torch"
    assert seen == {"other thread, before": "auto", "other thread, during": "auto"}
    assert current_backend() == "auto"


def test_torch_backend_and_non_cpu_tensors_run_the_torch_stage():
    from synapo_ext.core import backend

    assert backend.fused_kernels(torch.empty(2, 3, device="meta")) is None
    with use_backend("torch"):
        assert backend.fused_kernels(torch.zeros(2, 3)) is None


@needs_numba
def test_numba_backend_refuses_non_cpu_tensors():
    from synapo_ext.core import backend

    with use_backend("numba"), pytest.raises(ValueError, match="CPU"):
        backend.fused_kernels(torch.empty(2, 3, device="meta"))


@needs_numba
def test_numba_settings_are_left_alone():
    code = """
import os, numba, torch
os.environ.pop("NUMBA_THREADING_LAYER", None)
before = numba.config.THREADING_LAYER
from synapo_ext.core import compute_synapo_advantages, params_from_preset
from synapo_ext.core.backend import PARALLEL_MIN_ELEMENTS, use_backend
with use_backend("numba"):
    for n in (8, PARALLEL_MIN_ELEMENTS):  # the serial and the parallel kernels
        x = torch.zeros(1, n)
        compute_synapo_advantages(params_from_preset("ppo"), rewards=x, values=x, response_mask=torch.ones(1, n))
assert numba.config.THREADING_LAYER == before, (before, numba.config.THREADING_LAYER)
print("ok", before)
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.parametrize("seed", range(12))
def test_torch_row_blocks_do_not_change_results(seed, monkeypatch):
    """The pure-torch path runs on blocks of rows (bounded temporaries): blocks of one or two rows give bitwise the
    results of one block for the whole batch."""
    from synapo_ext.core import _blocks, masked_whiten

    c = _case(seed + 100)
    c["mask"][0, :] = True  # every case has 2 valid tokens or more for the whitening
    with use_backend("torch"):
        whole = _run(c), masked_whiten(c["values"], c["mask"])
        T = c["mask"].shape[1]
        monkeypatch.setattr(_blocks, "CPU_BLOCK_TOKENS", T * (1 + seed % 2))  # one or two rows a block
        assert len(_blocks.row_blocks(c["mask"].shape, "cpu")) == -(-c["mask"].shape[0] // (1 + seed % 2))
        blocked = _run(c), masked_whiten(c["values"], c["mask"])
    flat = [torch.utils._pytree.tree_leaves(x) for x in (whole, blocked)]
    assert len(flat[0]) == len(flat[1]) > 10
    for a, b in zip(*flat, strict=True):
        assert torch.equal(a, b)


def test_segment_ids_dtype():
    c = _case(3)
    for backend in ("torch", "numba") if numba_available() else ("torch",):
        with use_backend(backend):
            seg64 = segment_ids(c["ids"], c["mask"], c["table"], **c["segments"])
            seg32 = segment_ids(c["ids"], c["mask"], c["table"], **c["segments"], dtype=torch.int32)
        assert seg64.dtype == torch.int64 and seg32.dtype == torch.int32 and torch.equal(seg32.long(), seg64)
    with pytest.raises(ValueError, match="`dtype`"):
        segment_ids(c["ids"], c["mask"], c["table"], dtype=torch.float32)
