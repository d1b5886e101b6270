"""hvm_advantages against the float64 loop reference (SPEC "HVM" and "The core API")."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from synapo_ext.core import HVMResult, compute_gae, hvm_advantages, segment_ids

from .reference import ref_batch_std, ref_hvm_advantages
from .strategies import (
    DEFAULT,
    MASK_DTYPES,
    SLOW,
    assert_close_valid,
    assert_equal_valid,
    atol_for,
    float_lams,
    gae_cases,
    generators,
    hvm_cases,
    scramble,
    scramble_lam,
    sparse_rewards,
    uniform,
    whitened_atol,
)

FIELDS = ("advantages", "local_returns", "global_returns")


def _hyper(case, **overrides):
    kwargs = dict(
        gamma=case.gamma,
        lam=case.lam,
        global_lam=case.global_lam,
        global_weight=case.global_weight,
        whiten=case.whiten,
    )
    kwargs.update(overrides)
    return kwargs


def _run(case, **overrides):
    return hvm_advantages(
        case.rewards,
        case.local_values,
        case.global_values,
        case.response_mask,
        case.seg_ids,
        **_hyper(case, **overrides),
    )


def check_against_reference(case):
    if case.whiten and int(case.response_mask.bool().sum()) < 2:
        with pytest.raises(ValueError, match="response_mask"):
            _run(case)
        return
    result = _run(case)
    assert isinstance(result, HVMResult)
    inputs = (case.rewards, case.local_values, case.global_values, case.response_mask, case.seg_ids)
    ref = ref_hvm_advantages(*inputs, **_hyper(case))
    for field in FIELDS:
        actual = getattr(result, field)
        assert actual.dtype == case.dtype, field
        atol = atol_for(case.dtype)
        if field == "advantages" and case.whiten:
            raw = ref_hvm_advantages(*inputs, **_hyper(case, whiten=False)).advantages
            atol = whitened_atol(case.dtype, ref_batch_std(raw, case.response_mask))
        assert_close_valid(actual, getattr(ref, field), case.response_mask, atol=atol)
    assert result.start_mask.dtype == torch.bool
    assert_equal_valid(result.start_mask, ref.start_mask, case.response_mask)


@DEFAULT
@given(case=hvm_cases())
def test_hvm_advantages_match_reference(case):
    check_against_reference(case)


@pytest.mark.slow
@SLOW
@given(case=hvm_cases())
def test_hvm_advantages_match_reference_slow(case):
    check_against_reference(case)


@pytest.mark.parametrize("segment_every", [1, 37, 2000, None])
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (1.0, "near_one")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_rows(gen, segment_every, gamma, lam, dtype):
    B, T = 2, 16384
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 9000:] = False
    mask[1, torch.rand(T, generator=gen) < 0.05] = False
    position = mask.long().cumsum(dim=1) - 1  # index among valid tokens
    seg_ids = torch.zeros(B, T, dtype=torch.long) if segment_every is None else position.clamp(min=0) // segment_every
    if lam == "near_one":
        lam = (1.0 - 0.1 * torch.rand(B, T, generator=gen, dtype=torch.float64)).to(dtype)
    rewards = sparse_rewards(mask, gen, dtype, dense=True)
    local_values, global_values = uniform((B, T), gen, -1, 1, dtype), uniform((B, T), gen, -1, 1, dtype)
    kwargs = dict(gamma=gamma, lam=lam, global_lam=0.95, global_weight=1.0)
    result = hvm_advantages(rewards, local_values, global_values, mask, seg_ids, **kwargs)
    ref = ref_hvm_advantages(rewards, local_values, global_values, mask, seg_ids, **kwargs)
    for field in FIELDS:
        assert_close_valid(getattr(result, field), getattr(ref, field), mask, atol=atol_for(dtype))
    assert_equal_valid(result.start_mask, ref.start_mask, mask)


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------------


def test_hand_case_two_segments_gamma_one():
    # Two segments of two tokens: [0, 1] and [2, 3]; r = [0, 0, 0, 1]; gamma = lam = global_lam = 1, weight 1.
    # g = [V_glob[0], V_glob[2], 0] = [0.5, 0.6, 0]; R = [0, 1].
    # deltaG_1 = 1 + 0 - 0.6 = 0.4, AG_1 = 0.4; deltaG_0 = 0 + 0.6 - 0.5 = 0.1, AG_0 = 0.1 + 0.4 = 0.5.
    # Local, segment 1: t=3: 1 + g_2 (= 0) - 0.4 = 0.6; t=2: delta = 0 + 0.4 - 0.3 = 0.1, AL = 0.1 + 0.6 = 0.7.
    # Local, segment 0: t=1 bootstraps from g_1: 0 + 0.6 - 0.2 = 0.4; t=0: (0 + 0.2 - 0.1) + 0.4 = 0.5.
    # advantages = AL + AG_k = [0.5 + 0.5, 0.4 + 0.5, 0.7 + 0.4, 0.6 + 0.4] = [1.0, 0.9, 1.1, 1.0].
    # local_returns = in-segment reward + g_{k+1} = [0.6, 0.6, 1, 1]; global_returns (MC from s_k) = [1, 1, 1, 1].
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    local_values = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    global_values = torch.tensor([[0.5, -9.0, 0.6, -9.0]])  # only values at segment starts are used
    seg_ids = torch.tensor([[0, 0, 1, 1]])
    result = hvm_advantages(
        rewards,
        local_values,
        global_values,
        torch.ones(1, 4),
        seg_ids,
        gamma=1.0,
        lam=1.0,
        global_lam=1.0,
        global_weight=1.0,
    )
    torch.testing.assert_close(result.advantages, torch.tensor([[1.0, 0.9, 1.1, 1.0]]))
    torch.testing.assert_close(result.local_returns, torch.tensor([[0.6, 0.6, 1.0, 1.0]]))
    torch.testing.assert_close(result.global_returns, torch.ones(1, 4))
    assert result.start_mask.tolist() == [[True, False, True, False]]


def test_hand_case_gamma_half_with_interior_zero():
    # As above with gamma = 0.5 and a masked token between the segments (position 2: cut out).
    # n_k = [2, 2]; R_0 = 0, R_1 = 0 + 0.5 * 1 = 0.5.
    # deltaG_1 = 0.5 + 0.25 * 0 - 0.6 = -0.1 = AG_1; deltaG_0 = 0 + 0.25 * 0.6 - 0.5 = -0.35,
    # AG_0 = -0.35 + 0.25 * 1 * (-0.1) = -0.375.
    # Local, segment 1: t=4: 1 - 0.4 = 0.6; t=3: (0 + 0.5 * 0.4 - 0.3) + 0.5 * 0.6 = 0.2.
    # Local, segment 0: t=1: 0 + 0.5 * 0.6 - 0.2 = 0.1; t=0: (0 + 0.5 * 0.2 - 0.1) + 0.5 * 0.1 = 0.05.
    # advantages = [0.05 - 0.375, 0.1 - 0.375, _, 0.2 - 0.1, 0.6 - 0.1] = [-0.325, -0.275, _, 0.1, 0.5].
    # local_returns = [0.25 * 0.6, 0.5 * 0.6, _, 0.5 * 1, 1] = [0.15, 0.3, _, 0.5, 1];
    # global_returns = [0.5^3, 0.5^3, _, 0.5, 0.5] (MC return from s_k).
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    rewards = torch.tensor([[0.0, 0.0, 5.0, 0.0, 1.0]])
    local_values = torch.tensor([[0.1, 0.2, 5.0, 0.3, 0.4]])
    global_values = torch.tensor([[0.5, -9.0, 5.0, 0.6, -9.0]])
    seg_ids = torch.tensor([[0, 0, 0, 1, 1]])
    result = hvm_advantages(
        rewards, local_values, global_values, mask, seg_ids, gamma=0.5, lam=1.0, global_lam=1.0, global_weight=1.0
    )
    valid = mask.bool()
    torch.testing.assert_close(result.advantages[valid], torch.tensor([-0.325, -0.275, 0.1, 0.5]))
    torch.testing.assert_close(result.local_returns[valid], torch.tensor([0.15, 0.3, 0.5, 1.0]))
    torch.testing.assert_close(result.global_returns[valid], torch.tensor([0.125, 0.125, 0.5, 0.5]))
    assert result.start_mask[valid].tolist() == [True, False, True, False]


def test_global_lam_zero_and_weight():
    # global_lam = 0: AG_k = deltaG_k. Same setting as the gamma = 1 hand case: AG = [0.1, 0.4];
    # weight 2: advantages = AL + 2 * AG = [0.5 + 0.2, 0.4 + 0.2, 0.7 + 0.8, 0.6 + 0.8].
    result = hvm_advantages(
        torch.tensor([[0.0, 0.0, 0.0, 1.0]]),
        torch.tensor([[0.1, 0.2, 0.3, 0.4]]),
        torch.tensor([[0.5, 0.0, 0.6, 0.0]]),
        torch.ones(1, 4, dtype=torch.bool),
        torch.tensor([[0, 0, 1, 1]]),
        gamma=1.0,
        lam=1.0,
        global_lam=0.0,
        global_weight=2.0,
    )
    torch.testing.assert_close(result.advantages, torch.tensor([[0.7, 0.6, 1.5, 1.4]]))


# ---------------------------------------------------------------------------------------------------------------
# Exact reductions, dtypes, invariance
# ---------------------------------------------------------------------------------------------------------------


@DEFAULT
@given(case=gae_cases(whiten=False), global_values_seed=generators(), global_lam=float_lams)
def test_one_segment_weight_zero_is_compute_gae(case, global_values_seed, global_lam):
    # SPEC: one segment and global_weight 0 -> EA-GAE (compute_gae) on local_values. The single segment comes from
    # segment_ids with an all-False boundary table and no fallback.
    B, T = case.rewards.shape
    ids = torch.randint(0, 5, (B, T), generator=global_values_seed)
    seg_ids = segment_ids(ids, case.response_mask, torch.zeros(5, dtype=torch.bool))
    global_values = uniform((B, T), global_values_seed, -1.0, 1.0, case.dtype)
    result = hvm_advantages(
        case.rewards,
        case.values,
        global_values,
        case.response_mask,
        seg_ids,
        gamma=case.gamma,
        lam=case.lam,
        global_lam=global_lam,
        global_weight=0.0,
    )
    advantages, _ = compute_gae(case.rewards, case.values, case.response_mask, gamma=case.gamma, lam=case.lam)
    _, mc_returns = compute_gae(case.rewards, case.values, case.response_mask, gamma=case.gamma, lam=1.0)
    valid = case.response_mask.bool()
    torch.testing.assert_close(result.advantages[valid], advantages[valid])
    # Local targets: in-segment reward to the row's end plus g_K = 0 = the Monte-Carlo return, as is the global one.
    torch.testing.assert_close(result.local_returns[valid], mc_returns[valid])
    first = valid.long().argmax(dim=1)
    torch.testing.assert_close(
        result.global_returns[valid], mc_returns[torch.arange(B), first].unsqueeze(1).expand(B, T)[valid]
    )
    assert result.start_mask.sum().item() == B


def check_invariance(case, gen, scale, lam_scale=None):
    if case.whiten and int(case.response_mask.bool().sum()) < 2:
        case = case._replace(whiten=False)
    mask = case.response_mask
    expected = _run(case)
    T = mask.shape[1]
    junk_seg = torch.randint(0, T + 1, mask.shape, generator=gen)  # segment ids at masked positions: anything
    scrambled = case._replace(
        rewards=scramble(case.rewards, mask, gen, scale),
        local_values=scramble(case.local_values, mask, gen, scale),
        global_values=scramble(case.global_values, mask, gen, scale),
        lam=scramble_lam(case.lam, mask, gen, lam_scale),
        seg_ids=torch.where(mask.bool(), case.seg_ids, junk_seg),
    )
    actual = _run(scrambled)
    for field in (*FIELDS, "start_mask"):
        assert_equal_valid(getattr(actual, field), getattr(expected, field), mask)


@DEFAULT
@given(case=hvm_cases(), gen=generators(), scale=st.sampled_from([10.0, 1e6]))
def test_masked_positions_do_not_matter(case, gen, scale):
    check_invariance(case, gen, scale)


@DEFAULT
@given(case=hvm_cases(), gen=generators(), lam_scale=st.sampled_from([2.0, 10.0, 1e6]))
def test_masked_lam_outside_unit_interval_does_not_matter(case, gen, lam_scale):
    # docs/core_api.md: a lambda tensor need only be in [0, 1] at valid positions.
    check_invariance(case, gen, scale=0.0, lam_scale=lam_scale)


@pytest.mark.parametrize("junk", [10.0, 1e6])
@pytest.mark.parametrize("T", [128, 300])
def test_masked_lam_outside_unit_interval_explicit(gen, junk, T):
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 10:20] = True
    seg_ids = (torch.arange(T) // 4).expand(2, T).contiguous()
    rewards = sparse_rewards(mask, gen, torch.float32, dense=True)
    local_values, global_values = (
        uniform((2, T), gen, -1, 1, torch.float32),
        uniform((2, T), gen, -1, 1, torch.float32),
    )
    lam = torch.where(mask, uniform((2, T), gen, 0.0, 1.0, torch.float32), junk)
    kwargs = dict(gamma=1.0, lam=lam, global_lam=0.95, global_weight=1.0)
    result = hvm_advantages(rewards, local_values, global_values, mask, seg_ids, **kwargs)
    ref = ref_hvm_advantages(rewards, local_values, global_values, mask, seg_ids, **kwargs)
    for field in FIELDS:
        assert_close_valid(getattr(result, field), getattr(ref, field), mask, atol=1e-4)


def test_float64_in_float64_out():
    args = [torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3)]
    kwargs = dict(gamma=1.0, lam=1.0, global_lam=0.95, global_weight=1.0)
    mask, seg_ids = torch.ones(1, 3), torch.tensor([[0, 0, 1]])
    result = hvm_advantages(*args, mask, seg_ids, **kwargs)
    assert all(getattr(result, field).dtype == torch.float32 for field in FIELDS)
    for i in range(3):
        args64 = list(args)
        args64[i] = args64[i].double()
        result = hvm_advantages(*args64, mask, seg_ids, **kwargs)
        assert all(getattr(result, field).dtype == torch.float64 for field in FIELDS)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_mask_dtypes_agree(gen, mask_dtype):
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    seg_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]])
    rewards = sparse_rewards(mask, gen, torch.float32, dense=True)
    values = [uniform((2, 6), gen, -1, 1, torch.float32) for _ in range(2)]
    kwargs = dict(gamma=0.99, lam=0.95, global_lam=0.9, global_weight=1.0)
    expected = hvm_advantages(rewards, *values, mask, seg_ids, **kwargs)
    actual = hvm_advantages(rewards, *values, mask.to(mask_dtype), seg_ids, **kwargs)
    for field in (*FIELDS, "start_mask"):
        assert_equal_valid(getattr(actual, field), getattr(expected, field), mask)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def _inputs():
    return dict(
        rewards=torch.zeros(2, 4),
        local_values=torch.zeros(2, 4),
        global_values=torch.zeros(2, 4),
        response_mask=torch.ones(2, 4),
        seg_ids=torch.tensor([[0, 0, 1, 1], [0, 1, 2, 3]]),
    )


HYPER = dict(gamma=1.0, lam=1.0, global_lam=0.95, global_weight=1.0)


@pytest.mark.parametrize("argument", ["rewards", "local_values", "global_values", "seg_ids"])
def test_shape_mismatch(argument):
    inputs = _inputs()
    inputs[argument] = torch.cat([inputs[argument], inputs[argument][:, :1]], dim=1)  # (2, 5)
    with pytest.raises(ValueError, match=argument):
        hvm_advantages(**inputs, **HYPER)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("argument", ["rewards", "local_values", "global_values"])
def test_non_finite(bad, argument):
    inputs = _inputs()
    inputs[argument][1, 2] = bad
    with pytest.raises(ValueError, match=argument):
        hvm_advantages(**inputs, **HYPER)


def test_all_masked_row():
    inputs = _inputs()
    inputs["response_mask"][0] = 0
    with pytest.raises(ValueError, match="response_mask"):
        hvm_advantages(**inputs, **HYPER)


@pytest.mark.parametrize("bad", [2.0, 0.5])
def test_mask_values(bad):
    inputs = _inputs()
    inputs["response_mask"][0, 1] = bad
    with pytest.raises(ValueError, match="response_mask"):
        hvm_advantages(**inputs, **HYPER)


@pytest.mark.parametrize(
    "argument, value",
    [("gamma", 1.5), ("gamma", -0.5), ("lam", 1.5), ("lam", -0.1), ("global_lam", 1.5), ("global_lam", -0.1)],
)
def test_hyper_parameters_out_of_range(argument, value):
    with pytest.raises(ValueError, match=argument):
        hvm_advantages(**_inputs(), **{**HYPER, argument: value})


def test_lam_tensor_out_of_range():
    lam = torch.full((2, 4), 0.5)
    lam[0, 0] = -0.5
    with pytest.raises(ValueError, match="lam"):
        hvm_advantages(**_inputs(), **{**HYPER, "lam": lam})


def test_non_tensor():
    inputs = _inputs()
    inputs["seg_ids"] = inputs["seg_ids"].tolist()
    with pytest.raises(TypeError, match="seg_ids"):
        hvm_advantages(**inputs, **HYPER)
