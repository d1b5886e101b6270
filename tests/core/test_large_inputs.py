"""Large finite inputs and unusual integer dtypes: whitening accumulates in float64 on every backend (float32
sums and squares overflow), and token ids of any integer dtype give the int64 results (SPEC "Bad input")."""

import pytest
import torch

from synapo_ext.core import compute_gae, hvm_advantages, masked_whiten, scvl_pairs, segment_ids
from synapo_ext.core.backend import numba_available, use_backend

from .reference import ref_compute_gae, ref_hvm_advantages

BACKENDS = ["torch", pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="no numba"))]


def _outcome_batch(scale: float, gen: torch.Generator, B: int = 6, T: int = 12):
    """Rewards `scale * score` on each row's last valid token, values in [-1, 1], right-padded rows."""
    lengths = torch.randint(2, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None] < lengths[:, None]
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scale * torch.rand(B, generator=gen)
    values = torch.rand(B, T, generator=gen) * 2 - 1
    return rewards, values, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e20, 3e38])
def test_whitened_gae_of_huge_rewards_matches_float64(backend, scale, gen):
    rewards, values, mask = _outcome_batch(scale, gen)
    with use_backend(backend):
        advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0, whiten=True)
    ref_advantages, ref_returns = ref_compute_gae(rewards, values, mask, gamma=1.0, lam=1.0, whiten=True)
    assert bool(torch.isfinite(advantages).all())
    # whitened advantages are O(1): float32 rounding of the inputs, not zeros (1e20) or NaN (3e38)
    torch.testing.assert_close(advantages[mask].double(), ref_advantages[mask], rtol=1e-5, atol=1e-5)
    assert float(advantages[mask].abs().max()) > 0.5
    torch.testing.assert_close(returns[mask].double(), ref_returns[mask], rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whitened_hvm_of_huge_rewards_matches_float64(backend, gen):
    rewards, values, mask = _outcome_batch(1e20, gen)
    seg = torch.arange(mask.shape[1]).expand_as(mask) // 4
    kwargs = dict(gamma=1.0, lam=0.9, global_lam=0.95, global_weight=1.0, whiten=True)
    with use_backend(backend):
        out = hvm_advantages(rewards, values, values, mask, seg, **kwargs)
    ref = ref_hvm_advantages(rewards, values, values, mask, seg, **kwargs)
    torch.testing.assert_close(out.advantages[mask].double(), ref.advantages[mask], rtol=1e-5, atol=1e-5)


def test_masked_whiten_keeps_the_dtype_and_ignores_masked_entries():
    x = torch.tensor([[1e20, -1e20, 3.0e38]])
    mask = torch.tensor([[True, True, False]])
    out = masked_whiten(x, mask)
    # mean 0, unbiased var 2e40: (+-1e20) / sqrt(2e40) = +-1/sqrt(2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[mask], torch.tensor([2**-0.5, -(2**-0.5)]))


INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_ids_of_any_integer_dtype(backend, dtype, gen):
    B, T = 6, 30
    ids = torch.randint(0, 6, (B, T), generator=gen)
    ids[:, :4] = 1
    mask = torch.arange(T)[None] < torch.randint(8, T + 1, (B,), generator=gen)[:, None]
    table = torch.zeros(6, dtype=torch.bool)
    table[0] = True
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    groups = torch.arange(B) // 3
    with use_backend(backend):
        seg = segment_ids(ids.to(dtype), mask, table, min_len=2, fallback_len=5)
        pairs = scvl_pairs(ids.to(dtype), mask, scores, groups)
        expected_seg = segment_ids(ids, mask, table, min_len=2, fallback_len=5)
        expected_pairs = scvl_pairs(ids, mask, scores, groups)
    assert seg.dtype == torch.long and torch.equal(seg[mask], expected_seg[mask])
    assert all(torch.equal(a, b) for a, b in zip(pairs, expected_pairs, strict=True))
    assert expected_pairs.pos_index.numel() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_ids_must_be_integers(dtype):
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="response_ids"):
        segment_ids(torch.zeros(2, 3, dtype=dtype), mask, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="response_ids"):
        scvl_pairs(torch.zeros(2, 3, dtype=dtype), mask, torch.tensor([1.0, 0.0]), [0, 0])
