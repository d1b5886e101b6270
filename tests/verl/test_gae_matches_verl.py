"""Exact reductions against verl 0.9.1's own code (SPEC: "Must reduce exactly").

- `compute_gae(..., lam=<float>, whiten=True)` == `core_algos.compute_gae_advantage_return` (advantages and returns),
  with interior zeros in the mask (multi-turn tool tokens), gamma < 1, lam = 0 and lam = 1.
- Our whitening == `verl.utils.torch_functional.masked_whiten`.
- EA-GAE with lambda_min == lambda_max == c (a constant lambda) == verl with lam = c; with beta = 0 (VAPO's
  length-adaptive lambda, constant per row) == verl with a per-row (B,) lam tensor.
- HVM with one segment and global_weight 0 == verl on the local values (SPEC: "one segment and
  hvm_global_weight 0 -> EA-GAE on V_loc"); with lam = 1 its local targets == verl's returns.

Tolerances. float32: verl runs a T-step sequential loop, we run a blocked scan, so the two sum the same terms
in different orders and each carries a float32 rounding error (eps 1.2e-7) times the size of the running sums
(O(1) here) times a factor that grows with T. At the sizes below (T <= 1030) the largest differences seen
are 2.6e-6 (advantages) and 3.3e-6 (returns), a quarter of atol = rtol = 1e-5; at T = 4096 returns differ by
up to 2e-5, so keep T about 1k here. A real mistake gives far more: lam 0.949 instead of 0.95 moves the
whitened advantages by 1.5e-2. float64
inputs pin the math itself: returns at 1e-10; whitened advantages at 1e-8, because verl's `masked_mean` divides
by `count + 1e-8` where we divide by `count` (a shift of ~1e-9, invisible in float32).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")
from verl.trainer.ppo.core_algos import compute_gae_advantage_return  # noqa: E402
from verl.utils.torch_functional import masked_whiten  # noqa: E402

from synapo_ext.core import compute_gae, ea_gae_lambda, hvm_advantages  # noqa: E402

pytestmark = pytest.mark.verl

F32 = {"atol": 1e-5, "rtol": 1e-5}
F64 = {"atol": 1e-10, "rtol": 1e-10}
F64_WHITENED = {"atol": 1e-8, "rtol": 1e-8}

SHAPES = [(2, 1), (3, 7), (8, 64), (16, 300), (4, 1030)]  # 1030 > 16 * 64: the scan recurses twice
GAMMA_LAM = [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.97, 1.0), (0.0, 0.7)]


def make_batch(B: int, T: int, seed: int, *, dtype: torch.dtype = torch.float32, interior: bool = True):
    """Right-padded rows of random length with interior zero spans; finite garbage at masked positions.

    Rewards: a per-token KL-like term plus a 0/1 outcome on the row's last valid token. Values in [-1, 1].
    Returns (rewards, values, mask as float), the mask having >= 1 valid token per row and >= 2 in all.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # at least one full row, so the batch has >= 2 valid tokens when T > 1 ...
    if T == 1:
        lengths[:] = 1  # ... and with T == 1 every row holds its one token
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    if interior:
        for b in range(B):  # tool / observation spans inside the response; the last valid token stays valid
            L = int(lengths[b])
            for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
                if L < 3:
                    break
                start = int(torch.randint(0, L - 1, (1,), generator=g))
                stop = min(L - 1, start + int(torch.randint(1, max(2, L // 4), (1,), generator=g)))
                mask[b, start:stop] = 0
    rewards = 0.05 * torch.randn(B, T, generator=g, dtype=dtype)
    last = T - 1 - mask.flip(1).argmax(1)  # last valid position of each row
    rewards[torch.arange(B), last] += torch.randint(0, 2, (B,), generator=g).to(dtype)
    values = 2 * torch.rand(B, T, generator=g, dtype=dtype) - 1
    garbage = 100 * torch.randn(B, T, generator=g, dtype=dtype)  # must not leak into valid positions
    rewards = torch.where(mask.bool(), rewards, garbage)
    values = torch.where(mask.bool(), values, -garbage)
    return rewards, values, mask


def verl_gae(rewards, values, mask, gamma, lam):
    """verl's estimator exactly as ray_trainer calls it (it needs a numeric mask: `1 - mask`)."""
    return compute_gae_advantage_return(
        token_level_rewards=rewards, values=values, response_mask=mask, gamma=gamma, lam=lam
    )


def assert_valid_close(actual, expected, mask, **tol):
    """Compare only where the mask is 1: masked positions may hold any finite value."""
    valid = mask.bool()
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual[valid], expected[valid], **tol)


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_compute_gae_matches_verl(B, T, gamma, lam, seed):
    rewards, values, mask = make_batch(B, T, seed)
    adv_ref, ret_ref = verl_gae(rewards, values, mask, gamma, lam)
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=True)
    assert adv.dtype == ret.dtype == torch.float32
    assert_valid_close(adv, adv_ref, mask, **F32)
    assert_valid_close(ret, ret_ref, mask, **F32)


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("B,T", [(3, 7), (16, 300), (4, 1030)])
def test_compute_gae_matches_verl_float64(B, T, gamma, lam):
    rewards, values, mask = make_batch(B, T, seed=7, dtype=torch.float64)
    adv_ref, ret_ref = verl_gae(rewards, values, mask, gamma, lam)
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=True)
    assert adv.dtype == ret.dtype == torch.float64
    assert_valid_close(adv, adv_ref, mask, **F64_WHITENED)
    assert_valid_close(ret, ret_ref, mask, **F64)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32])
def test_compute_gae_matches_verl_any_mask_dtype(mask_dtype):
    # verl gets the mask as ray_trainer has it (int64 attention mask); ours accepts bool, int and float.
    rewards, values, mask = make_batch(8, 200, seed=3)
    adv_ref, ret_ref = verl_gae(rewards, values, mask.long(), 1.0, 0.95)
    adv, ret = compute_gae(rewards, values, mask.to(mask_dtype), gamma=1.0, lam=0.95, whiten=True)
    assert_valid_close(adv, adv_ref, mask, **F32)
    assert_valid_close(ret, ret_ref, mask, **F32)


@pytest.mark.parametrize("B,T", [(2, 1), (1, 2), (8, 64), (16, 300)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitening_matches_verl_masked_whiten(B, T, seed):
    rewards, values, mask = make_batch(B, T, seed)
    raw, _ = compute_gae(rewards, values, mask, gamma=0.99, lam=0.95)
    white, _ = compute_gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True)
    assert_valid_close(white, masked_whiten(raw, mask), mask, **F32)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.95, 1.0])
@pytest.mark.parametrize("beta", [0.0, 0.05, -0.05])
def test_ea_gae_constant_lambda_matches_verl(lam, beta):
    # lambda_min == lambda_max pins EA-GAE's lambda to a constant whatever the length and entropy.
    rewards, values, mask = make_batch(16, 300, seed=11)
    entropy = 3 * torch.rand(16, 300, generator=torch.Generator().manual_seed(12))
    lam_t = ea_gae_lambda(mask, entropy, alpha=0.05, beta=beta, lambda_min=lam, lambda_max=lam)
    assert_valid_close(lam_t, torch.full_like(lam_t, lam), mask, atol=0.0, rtol=0.0)
    adv_ref, ret_ref = verl_gae(rewards, values, mask, 1.0, lam)
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=lam_t, whiten=True)
    assert_valid_close(adv, adv_ref, mask, **F32)
    assert_valid_close(ret, ret_ref, mask, **F32)


@pytest.mark.parametrize("alpha", [0.05, 0.5])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_ea_gae_beta0_is_vapo_length_adaptive_gae(alpha, with_entropy):
    # beta = 0: lambda_b = clip(1 - 1 / (alpha * l_b), 0, 1), one value per row. verl's loop broadcasts a (B,)
    # lam against its (B,) running advantage, so verl itself computes VAPO's length-adaptive GAE.
    B, T = 16, 300
    rewards, values, mask = make_batch(B, T, seed=21)
    entropy = 3 * torch.rand(B, T, generator=torch.Generator().manual_seed(22)) if with_entropy else None
    lam_t = ea_gae_lambda(mask, entropy, alpha=alpha, beta=0.0)
    lam_row = (1 - 1 / (alpha * mask.sum(1))).clamp(0.0, 1.0)  # (B,)
    assert_valid_close(lam_t, lam_row[:, None].expand(B, T), mask, **F32)
    adv_ref, ret_ref = verl_gae(rewards, values, mask, 1.0, lam_row)
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=lam_t, whiten=True)
    assert_valid_close(adv, adv_ref, mask, **F32)
    assert_valid_close(ret, ret_ref, mask, **F32)


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("B,T", [(3, 7), (16, 300), (4, 1030)])
def test_hvm_one_segment_no_global_weight_matches_verl(B, T, gamma, lam):
    rewards, values, mask = make_batch(B, T, seed=31)
    global_values = torch.rand(B, T, generator=torch.Generator().manual_seed(32))  # must not matter
    seg_ids = torch.zeros(B, T, dtype=torch.long)
    adv_ref, ret_ref = verl_gae(rewards, values, mask, gamma, lam)
    kwargs = dict(gamma=gamma, lam=lam, global_lam=0.95, global_weight=0.0, whiten=True)
    res = hvm_advantages(rewards, values, global_values, mask, seg_ids, **kwargs)
    assert_valid_close(res.advantages, adv_ref, mask, **F32)
    if lam == 1.0:  # local targets are Monte-Carlo inside the (single) segment, bootstrapped by g_K = 0
        assert_valid_close(res.local_returns, ret_ref, mask, **F32)
