"""The numba kernels and the pure-torch path give the same results (both are also checked against the float64
reference by the other tests: CI runs tests/core once per backend)."""

import pytest
import torch

from synapo_ext.core import compute_gae, ea_gae_lambda, hvm_advantages, scvl_pairs, segment_ids
from synapo_ext.core.backend import current_backend, numba_available, use_backend

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba not installed (pip install synapo-ext[fast])")


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


@pytest.mark.parametrize("seed", range(60))
def test_numba_matches_torch(seed):
    c = _case(seed)
    with use_backend("torch"):
        expected = _run(c)
    with use_backend("numba"):
        actual = _run(c)
    valid = c["mask"]
    lam_t, seg_t, gae_t, hvm_t, pairs_t = expected
    lam_n, seg_n, gae_n, hvm_n, pairs_n = actual
    torch.testing.assert_close(lam_n[valid], lam_t[valid])
    assert torch.equal(seg_n[valid], seg_t[valid])
    for a, b in zip(gae_n, gae_t, strict=True):
        torch.testing.assert_close(a[valid], b[valid], atol=2e-6, rtol=0)
    for a, b in zip(hvm_n[:3], hvm_t[:3], strict=True):
        torch.testing.assert_close(a[valid], b[valid], atol=2e-6, rtol=0)
    assert torch.equal(hvm_n.start_mask, hvm_t.start_mask)
    assert all(torch.equal(a, b) for a, b in zip(pairs_n, pairs_t, strict=True))


def test_backend_switch():
    with use_backend("torch"):
        assert current_backend() == "torch"
    with pytest.raises(ValueError, match="name"):
        with use_backend("cuda"):
            pass
