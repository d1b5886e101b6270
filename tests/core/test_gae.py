"""compute_gae against the float64 loop reference (SPEC "The core API"; docs/core_api.md)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from synapo_ext.core import compute_gae, masked_whiten

from .reference import ref_batch_std, ref_compute_gae
from .strategies import (
    DEFAULT,
    MASK_DTYPES,
    SLOW,
    assert_close_valid,
    assert_equal_valid,
    atol_for,
    gae_cases,
    generators,
    scramble,
    scramble_lam,
    sparse_rewards,
    uniform,
    whitened_atol,
)


def check_against_reference(case):
    kwargs = dict(gamma=case.gamma, lam=case.lam, whiten=case.whiten)
    if case.whiten and int(case.response_mask.bool().sum()) < 2:
        with pytest.raises(ValueError, match="response_mask"):
            compute_gae(case.rewards, case.values, case.response_mask, **kwargs)
        return
    advantages, returns = compute_gae(case.rewards, case.values, case.response_mask, **kwargs)
    ref_advantages, ref_returns = ref_compute_gae(case.rewards, case.values, case.response_mask, **kwargs)
    assert advantages.dtype == case.dtype and returns.dtype == case.dtype
    assert advantages.shape == returns.shape == case.rewards.shape
    assert_close_valid(returns, ref_returns, case.response_mask, atol=atol_for(case.dtype))
    atol = atol_for(case.dtype)
    if case.whiten:
        raw, _ = ref_compute_gae(case.rewards, case.values, case.response_mask, gamma=case.gamma, lam=case.lam)
        atol = whitened_atol(case.dtype, ref_batch_std(raw, case.response_mask))
    assert_close_valid(advantages, ref_advantages, case.response_mask, atol=atol)


@DEFAULT
@given(case=gae_cases())
def test_compute_gae_matches_reference(case):
    check_against_reference(case)


@pytest.mark.slow
@SLOW
@given(case=gae_cases())
def test_compute_gae_matches_reference_slow(case):
    check_against_reference(case)


# Long responses: the recursion runs 16384 steps (products of gamma * lam underflow; lam has exact zeros).
@pytest.mark.parametrize("gamma", [1.0, 0.99])
@pytest.mark.parametrize("lam_kind", ["one", "0.95", "near_one", "zeros_ones"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compute_gae_long_rows(gen, gamma, lam_kind, dtype):
    B, T = 2, 16384
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 10000:] = False  # right padding
    mask[1, 5000:5100] = False  # an interior observation block
    mask[1, torch.rand(T, generator=gen) < 0.05] = False  # scattered interior zeros
    rewards = sparse_rewards(mask, gen, dtype, dense=True)
    values = uniform((B, T), gen, -1.0, 1.0, dtype)
    u = torch.rand(B, T, generator=gen, dtype=torch.float64)
    lam = {
        "one": 1.0,
        "0.95": 0.95,
        "near_one": (1.0 - 0.1 * u).to(dtype),
        "zeros_ones": torch.where(u < 0.01, 0.0, torch.where(u < 0.5, 1.0, 1.0 - 0.1 * u)).to(dtype),
    }[lam_kind]
    advantages, returns = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_advantages, ref_returns = ref_compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert advantages.dtype == dtype
    assert_close_valid(advantages, ref_advantages, mask, atol=atol_for(dtype))
    assert_close_valid(returns, ref_returns, mask, atol=atol_for(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------------


def test_spec_example_interior_zeros_gamma_lam_one():
    # SPEC's example: mask [1,1,1,0,0,1,1,1], outcome 1 on the last token, gamma = lam = 1.
    # With gamma = lam = 1 GAE telescopes: A_t = sum_{t' >= t} r_t' - V_t = 1 - V_t at every valid t, and the
    # masked tokens 3, 4 are skipped (their values 9.0 are never used); returns = A + V = 1.
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25, 0.125, 9.0, 9.0, 0.0, -0.5, 0.75]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    valid = mask.bool()
    torch.testing.assert_close(advantages[valid], torch.tensor([0.5, 0.75, 0.875, 1.0, 1.5, 0.25]))
    torch.testing.assert_close(returns[valid], torch.ones(6))


def test_hand_case_gamma_lam_half_with_interior_zero():
    # Valid tokens 0 and 2 (token 1 is cut out): r = [0, 1], V = [0.5, 0.25], gamma = lam = 0.5.
    # t=2: delta = 1 + 0.5*0 - 0.25 = 0.75, A = 0.75.
    # t=0: delta = 0 + 0.5*0.25 - 0.5 = -0.375, A = -0.375 + 0.5*0.5*0.75 = -0.1875.
    # returns = A + V = [0.3125, 1.0].
    mask = torch.tensor([[True, False, True]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, -7.0, 0.25]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(advantages[mask], torch.tensor([-0.1875, 0.75]))
    torch.testing.assert_close(returns[mask], torch.tensor([0.3125, 1.0]))


def test_lam_zero_is_one_step_td():
    # lam = 0: A_t = delta_t = r_t + gamma * V_{t+1} - V_t (V after the last valid token = 0).
    # Row [1,1,1,0]: gamma = 0.9, r = [0, 0, 1], V = [0.1, 0.2, 0.3]:
    # A = [0 + 0.9*0.2 - 0.1, 0 + 0.9*0.3 - 0.2, 1 - 0.3] = [0.08, 0.07, 0.7].
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    advantages, _ = compute_gae(rewards, values, mask, gamma=0.9, lam=0.0)
    torch.testing.assert_close(advantages[:, :3], torch.tensor([[0.08, 0.07, 0.7]]))


def test_rows_of_length_one():
    # T = 1: A = r - V, returns = r; and a single valid token in a padded row behaves the same.
    rewards = torch.tensor([[1.0], [0.0]])
    values = torch.tensor([[0.25], [0.5]])
    advantages, returns = compute_gae(rewards, values, torch.ones(2, 1, dtype=torch.bool), gamma=0.99, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.75], [-0.5]]))
    torch.testing.assert_close(returns, rewards)
    mask = torch.tensor([[0, 0, 1, 0]])
    advantages, returns = compute_gae(
        torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[3.0, 3.0, 0.25, 3.0]]), mask, gamma=0.99, lam=0.95
    )
    torch.testing.assert_close(advantages[0, 2], torch.tensor(0.75))
    torch.testing.assert_close(returns[0, 2], torch.tensor(1.0))


def test_whiten_hand_case():
    # r = 0 and gamma = lam = 1, so A_t = -V_t (the deltas telescope to the first value):
    # row 0 (V = [1, 2]) gives A = [-1, -2], row 1 (V = [3]) gives A = [-3]. Batch mean -2, unbiased variance
    # (1 + 0 + 1) / (3 - 1) = 1, so whitened = (A + 2) / sqrt(1 + 1e-8) = [1, 0, -1] / sqrt(1 + 1e-8).
    # Returns are taken before whitening: A + V = 0.
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rewards = torch.zeros(2, 3, dtype=torch.float64)
    values = torch.tensor([[1.0, 2.0, 5.0], [3.0, 5.0, 5.0]], dtype=torch.float64)
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0, whiten=True)
    valid = mask.bool()
    expected = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64) / math.sqrt(1.0 + 1e-8)
    torch.testing.assert_close(advantages[valid], expected)
    torch.testing.assert_close(returns[valid], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("split", [1, 3, 5])
def test_whiten_across_processes_matches_the_whole_batch(split):
    """Two "processes" (threads), each with its own rows, whiten with the statistics of both: the result is the
    one-process whitening of the whole batch (rows 0..split-1 on one, the rest on the other; a process may hold
    only padding rows)."""
    import threading

    gen = torch.Generator().manual_seed(split)
    values = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 3 + 1
    mask = torch.rand(6, 9, generator=gen) > 0.3
    if split == 5:
        mask[5] = False  # the second process holds one row, without a valid token
    expected = masked_whiten(values, mask)

    barrier, deposits, results = threading.Barrier(2), {}, {}

    def process(rank: int, rows: slice) -> None:
        def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
            deposits[rank] = t.clone()
            barrier.wait()
            total = deposits[0] + deposits[1]
            barrier.wait()  # both have read before the next reduction overwrites a deposit
            return total

        results[rank] = masked_whiten(values[rows], mask[rows], sum_over_processes=sum_over_processes)

    threads = [threading.Thread(target=process, args=(0, slice(0, split))),
               threading.Thread(target=process, args=(1, slice(split, 6)))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    actual = torch.cat([results[0], results[1]])
    torch.testing.assert_close(actual[mask], expected[mask], rtol=0, atol=1e-12)
    # one process: the identity reduction is the plain whitening
    alone = masked_whiten(values, mask, sum_over_processes=lambda t: t)
    torch.testing.assert_close(alone[mask], expected[mask], rtol=0, atol=1e-12)


def test_masked_whiten_errors_name_the_argument():
    values, mask = torch.randn(2, 3), torch.ones(2, 3)
    with pytest.raises(TypeError, match="`values`"):
        masked_whiten(values.long(), mask)
    with pytest.raises(ValueError, match="`mask`"):
        masked_whiten(values, mask[:, :2])
    with pytest.raises(ValueError, match="`values`"):
        masked_whiten(torch.tensor([[1.0, float("nan"), 0.0]]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="`mask` must hold only 0 and 1"):
        masked_whiten(values, mask * 2)
    with pytest.raises(TypeError, match="`sum_over_processes`"):
        masked_whiten(values, mask, sum_over_processes=1.0)
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        masked_whiten(values, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    torch.testing.assert_close(masked_whiten(values, mask.long()), masked_whiten(values, mask.bool()))


# ---------------------------------------------------------------------------------------------------------------
# Exact reductions and dtypes
# ---------------------------------------------------------------------------------------------------------------


@DEFAULT
@given(case=gae_cases(), lam=st.sampled_from([0.0, 0.5, 0.95, 1.0]))
def test_constant_lam_tensor_equals_float_lam(case, lam):
    lam_tensor = torch.full(case.rewards.shape, lam, dtype=case.dtype)
    expected = compute_gae(case.rewards, case.values, case.response_mask, gamma=case.gamma, lam=lam)
    actual = compute_gae(case.rewards, case.values, case.response_mask, gamma=case.gamma, lam=lam_tensor)
    valid = case.response_mask.bool()
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a[valid], e[valid])


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_mask_dtypes_agree(gen, mask_dtype):
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    rewards, values = sparse_rewards(mask, gen, torch.float32, dense=True), uniform((2, 5), gen, -1, 1, torch.float32)
    expected = compute_gae(rewards, values, mask, gamma=0.99, lam=0.9)
    actual = compute_gae(rewards, values, mask.to(mask_dtype), gamma=0.99, lam=0.9)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == torch.float32
        assert_equal_valid(a, e, mask)


def test_float64_in_float64_out():
    mask = torch.ones(2, 4)
    r32, v32 = torch.zeros(2, 4), torch.ones(2, 4)
    for rewards, values in [(r32.double(), v32.double()), (r32, v32.double()), (r32.double(), v32)]:
        advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
        assert advantages.dtype == returns.dtype == torch.float64
    lam64 = torch.full((2, 4), 0.5, dtype=torch.float64)
    advantages, returns = compute_gae(r32, v32, mask, gamma=1.0, lam=lam64)
    assert advantages.dtype == torch.float64
    advantages, returns = compute_gae(r32, v32, mask, gamma=1.0, lam=0.5)
    assert advantages.dtype == returns.dtype == torch.float32


@pytest.mark.verl
def test_matches_verl_compute_gae_advantage_return(gen):
    # SPEC: constant lambda -> verl's compute_gae_advantage_return (verl always whitens).
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    mask = torch.ones(4, 64)
    mask[0, 40:] = 0
    mask[1, 10:20] = 0
    mask[2, torch.rand(64, generator=gen) < 0.3] = 0
    mask[2, 0] = 1
    rewards = sparse_rewards(mask, gen, torch.float32, dense=True)
    values = uniform((4, 64), gen, -1.0, 1.0, torch.float32)
    expected = core_algos.compute_gae_advantage_return(rewards, values, mask, gamma=0.99, lam=0.95)
    actual = compute_gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a[mask.bool()], e[mask.bool()])


# ---------------------------------------------------------------------------------------------------------------
# Invariance to masked positions
# ---------------------------------------------------------------------------------------------------------------


def check_invariance(case, gen, scale, lam_scale=None):
    mask = case.response_mask
    kwargs = dict(gamma=case.gamma, whiten=case.whiten and int(mask.bool().sum()) >= 2)
    expected = compute_gae(case.rewards, case.values, mask, lam=case.lam, **kwargs)
    rewards, values = scramble(case.rewards, mask, gen, scale), scramble(case.values, mask, gen, scale)
    actual = compute_gae(rewards, values, mask, lam=scramble_lam(case.lam, mask, gen, lam_scale), **kwargs)
    for a, e in zip(actual, expected, strict=True):
        assert_equal_valid(a, e, mask)


@DEFAULT
@given(case=gae_cases(), gen=generators())
def test_masked_positions_do_not_matter(case, gen):
    check_invariance(case, gen, scale=10.0)


@DEFAULT
@given(case=gae_cases(), gen=generators())
def test_huge_finite_values_at_masked_positions_do_not_matter(case, gen):
    check_invariance(case, gen, scale=1e6)


@DEFAULT
@given(case=gae_cases(), gen=generators(), lam_scale=st.sampled_from([2.0, 10.0, 1e6]))
def test_masked_lam_outside_unit_interval_does_not_matter(case, gen, lam_scale):
    # docs/core_api.md: a lambda tensor need only be in [0, 1] at valid positions.
    check_invariance(case, gen, scale=0.0, lam_scale=lam_scale)


@pytest.mark.parametrize("junk", [10.0, 1e6])
@pytest.mark.parametrize("T", [128, 300])
def test_masked_lam_outside_unit_interval_explicit(gen, junk, T):
    # Short rows in long padding: lambda is junk (> 1) on every masked token, fine everywhere valid.
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 10:20] = True
    rewards = sparse_rewards(mask, gen, torch.float32, dense=True)
    values = uniform((2, T), gen, -1.0, 1.0, torch.float32)
    lam = torch.where(mask, uniform((2, T), gen, 0.0, 1.0, torch.float32), junk)
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=lam)
    ref_advantages, ref_returns = ref_compute_gae(rewards, values, mask, gamma=1.0, lam=lam)
    assert_close_valid(advantages, ref_advantages, mask, atol=1e-4)
    assert_close_valid(returns, ref_returns, mask, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def _inputs():
    return torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool)


@pytest.mark.parametrize(
    "argument, replace",
    [
        ("values", lambda r, v, m: (r, torch.zeros(2, 5), m)),
        ("values", lambda r, v, m: (r, torch.zeros(4), m)),
        ("rewards", lambda r, v, m: (torch.zeros(3, 4), v, m)),
        ("response_mask", lambda r, v, m: (torch.zeros(2, 5), torch.zeros(2, 5), m)),
    ],
)
def test_shape_mismatch(argument, replace):
    rewards, values, mask = replace(*_inputs())
    with pytest.raises(ValueError, match=argument):
        compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)


def test_lam_tensor_shape_mismatch():
    rewards, values, mask = _inputs()
    with pytest.raises(ValueError, match="lam"):
        compute_gae(rewards, values, mask, gamma=1.0, lam=torch.ones(2, 5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("argument", ["rewards", "values"])
@pytest.mark.parametrize("position", [(0, 1), (1, 3)])
def test_non_finite(bad, argument, position):
    rewards, values, mask = _inputs()
    mask[1, 3] = False  # also a masked position: SPEC checks the whole tensor
    {"rewards": rewards, "values": values}[argument][position] = bad
    with pytest.raises(ValueError, match=argument):
        compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)


def test_all_masked_row():
    rewards, values, mask = _inputs()
    mask[1] = False
    with pytest.raises(ValueError, match="response_mask"):
        compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)


@pytest.mark.parametrize(
    "mask", [torch.tensor([[1, 2, 1, 0]]), torch.tensor([[1.0, 0.5, 1.0, 0.0]]), torch.tensor([[1, -1, 1, 0]])]
)
def test_mask_values_other_than_zero_one(mask):
    with pytest.raises(ValueError, match="response_mask"):
        compute_gae(torch.zeros(1, 4), torch.zeros(1, 4), mask, gamma=1.0, lam=1.0)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_lam_out_of_range(lam):
    with pytest.raises(ValueError, match="lam"):
        compute_gae(*_inputs(), gamma=1.0, lam=lam)


def test_lam_tensor_out_of_range_at_valid_position():
    lam = torch.full((2, 4), 0.5)
    lam[1, 2] = 1.5
    with pytest.raises(ValueError, match="lam"):
        compute_gae(*_inputs(), gamma=1.0, lam=lam)


@pytest.mark.parametrize("gamma", [-0.1, 1.01, float("nan")])
def test_gamma_out_of_range(gamma):
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(*_inputs(), gamma=gamma, lam=1.0)


def test_whiten_needs_two_valid_tokens():
    mask = torch.tensor([[False, True, False]])
    with pytest.raises(ValueError, match="response_mask"):
        compute_gae(torch.zeros(1, 3), torch.zeros(1, 3), mask, gamma=1.0, lam=1.0, whiten=True)


@pytest.mark.parametrize("argument", ["rewards", "values", "response_mask"])
def test_non_tensor(argument):
    inputs = dict(zip(["rewards", "values", "response_mask"], _inputs(), strict=True))
    inputs[argument] = inputs[argument].tolist()
    with pytest.raises(TypeError, match=argument):
        compute_gae(**inputs, gamma=1.0, lam=1.0)


@pytest.mark.parametrize(("B", "T"), [(1, 1), (1, 64), (1, 256), (1, 16384), (3, 64), (2, 130)])
def test_reverse_linear_scan_leaves_its_inputs_alone(B, T):
    """One row of one block (or block starts of one block, one level down) is a permuted view that is already
    contiguous: the scan must still work on a copy, not on the caller's tensors."""
    from synapo_ext.core import reverse_linear_scan

    gen = torch.Generator().manual_seed(B * 1000 + T)
    a, b = torch.rand(B, T, generator=gen, dtype=torch.float64), torch.randn(B, T, generator=gen, dtype=torch.float64)
    a0, b0 = a.clone(), b.clone()
    x = reverse_linear_scan(a, b)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    expected, running = torch.empty_like(b), torch.zeros(B, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        running = a[:, t] * running + b[:, t]
        expected[:, t] = running
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
