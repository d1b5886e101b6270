"""Hypothesis strategies and comparison helpers shared by the core tests.

Hypothesis draws the structure of a case (shapes, mask pattern, hyper-parameters, a seed); the bulk values come from
a seeded `torch.Generator`, so long rows (T = 16384) stay cheap to draw. Magnitudes are realistic, so float32 is a
meaningful test: values in [-1, 1], rewards an outcome 0/1 on the last valid token plus optional small per-token
terms (|r| <= 0.01), entropies in [0, 5] nats.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
DEFAULT = settings(max_examples=200, deadline=None, suppress_health_check=_HEALTH)
SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=_HEALTH)

BIG_T = (4096, 16384)
MASK_DTYPES = (torch.bool, torch.int64, torch.int32, torch.float32)
ROW_KINDS = ("full", "right_pad", "interior", "one_token")
F32_ATOL = 1e-4
F64_ATOL = 1e-9


# ---------------------------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------------------------


def atol_for(dtype: torch.dtype) -> float:
    return F32_ATOL if dtype == torch.float32 else F64_ATOL


def assert_close_valid(actual: torch.Tensor, expected: torch.Tensor, response_mask: torch.Tensor, *, atol: float):
    """assert_close on the valid positions only (masked positions may hold anything)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    valid = response_mask.bool()
    torch.testing.assert_close(actual.detach().to(torch.float64)[valid], expected[valid], atol=atol, rtol=0)


def assert_equal_valid(a: torch.Tensor, b: torch.Tensor, response_mask: torch.Tensor):
    valid = response_mask.bool()
    assert torch.equal(a[valid], b[valid])


def whitened_atol(dtype: torch.dtype, std: float) -> float:
    """Whitening divides the float32 rounding of A (~1e-6) by the batch std: scale the tolerance for tiny stds."""
    return atol_for(dtype) * max(1.0, 1e-2 / std)


def scramble(x: torch.Tensor, response_mask: torch.Tensor, gen: torch.Generator, scale: float) -> torch.Tensor:
    """A copy of `x` with random finite values in [-scale, scale] at the masked positions."""
    masked = ~response_mask.bool()
    if x.dtype.is_floating_point:
        junk = (torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    else:
        junk = torch.randint(-int(scale), int(scale) + 1, x.shape, generator=gen)
    return torch.where(masked, junk.to(x.dtype), x)


def scramble_lam(lam, response_mask: torch.Tensor, gen: torch.Generator, scale: float | None = None):
    """A per-token lambda with junk at masked positions: in [0, 1] (scale None) or in [-scale, scale] (legal too:
    lambda need only be in [0, 1] at valid positions). A float lambda is returned as is."""
    if not isinstance(lam, torch.Tensor):
        return lam
    if scale is not None:
        return scramble(lam, response_mask, gen, scale)
    junk = torch.rand(lam.shape, generator=gen, dtype=torch.float64).to(lam.dtype)
    return torch.where(response_mask.bool(), lam, junk)


def uniform(shape, gen: torch.Generator, low: float, high: float, dtype: torch.dtype) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def generators(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))


@st.composite
def batch_shapes(draw, max_B: int = 6, max_T: int = 40) -> tuple[int, int]:
    """Mostly small (B, T); sometimes T of a few blocks of a blocked scan (65..300); rarely a long response
    (T in BIG_T) with B <= 2, so the loop reference stays fast."""
    size = draw(st.integers(0, 24))
    if size == 24:
        return draw(st.integers(1, 2)), draw(st.sampled_from(BIG_T))
    if size >= 20:
        return draw(st.integers(1, 3)), draw(st.integers(max_T + 1, 300))
    return draw(st.integers(1, max_B)), draw(st.integers(1, max_T))


@st.composite
def response_masks(draw, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """bool (B, T): each row full, right-padded, right-padded with interior zeros, or a single valid token."""
    rows = []
    for _ in range(B):
        kind = draw(st.sampled_from(ROW_KINDS))
        row = torch.zeros(T, dtype=torch.bool)
        if kind == "full":
            row[:] = True
        elif kind == "one_token":
            row[draw(st.integers(0, T - 1))] = True
        else:
            n = draw(st.integers(1, T))
            row[:n] = True
            if kind == "interior":
                hole_rate = draw(st.sampled_from([0.1, 0.3, 0.7]))
                row &= torch.rand(T, generator=gen) >= hole_rate
                if not row.any():
                    row[n - 1] = True
        rows.append(row)
    return torch.stack(rows)


def as_mask_dtype(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask.to(dtype)


def last_valid_onehot(mask: torch.Tensor) -> torch.Tensor:
    """bool (B, T), True at each row's last valid token."""
    T = mask.shape[1]
    last = (torch.arange(T) * mask.long()).argmax(dim=1)
    return torch.nn.functional.one_hot(last, T).bool()


def sparse_rewards(mask: torch.Tensor, gen: torch.Generator, dtype: torch.dtype, dense: bool) -> torch.Tensor:
    """Outcome 0/1 on the last valid token, plus (if dense) per-token terms in [-0.01, 0.01] at valid tokens."""
    B, T = mask.shape
    outcome = (torch.rand(B, 1, generator=gen) < 0.5).to(torch.float64)
    rewards = outcome * last_valid_onehot(mask)
    if dense:
        rewards = rewards + uniform((B, T), gen, -0.01, 0.01, torch.float64) * mask
    return rewards.to(dtype)


gammas = st.one_of(st.sampled_from([1.0, 0.99, 0.5, 0.0]), st.floats(0.0, 1.0))
float_lams = st.one_of(st.sampled_from([0.0, 1.0, 0.95]), st.floats(0.0, 1.0))
float_dtypes = st.sampled_from([torch.float32, torch.float32, torch.float32, torch.float64])


@st.composite
def lams(draw, B: int, T: int, gen: torch.Generator, dtype: torch.dtype):
    """A float lambda, or a per-token (B, T) lambda tensor (uniform, near 1, or mixing exact 0s and 1s)."""
    kind = draw(st.sampled_from(["float", "float", "uniform", "near_one", "zeros_ones"]))
    if kind == "float":
        return draw(float_lams)
    u = torch.rand(B, T, generator=gen, dtype=torch.float64)
    if kind == "uniform":
        lam = u
    elif kind == "near_one":
        lam = 1.0 - 0.1 * u
    else:
        pick = torch.rand(B, T, generator=gen)
        lam = torch.where(pick < 0.3, 0.0, torch.where(pick < 0.6, 1.0, u))
    return lam.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------


class GAECase(NamedTuple):
    rewards: torch.Tensor
    values: torch.Tensor
    response_mask: torch.Tensor
    gamma: float
    lam: float | torch.Tensor
    whiten: bool
    dtype: torch.dtype


@st.composite
def gae_cases(draw, whiten=None) -> GAECase:
    B, T = draw(batch_shapes())
    gen = draw(generators())
    dtype = draw(float_dtypes)
    mask = draw(response_masks(B, T, gen))
    rewards = sparse_rewards(mask, gen, dtype, dense=draw(st.booleans()))
    values = uniform((B, T), gen, -1.0, 1.0, dtype)
    lam = draw(lams(B, T, gen, dtype))
    whiten = draw(st.booleans()) if whiten is None else whiten
    mask = as_mask_dtype(mask, draw(st.sampled_from(MASK_DTYPES)))
    return GAECase(rewards, values, mask, draw(gammas), lam, whiten, dtype)


class EALambdaCase(NamedTuple):
    response_mask: torch.Tensor
    entropy: torch.Tensor | None
    alpha: float
    beta: float
    lambda_min: float
    lambda_max: float
    dtype: torch.dtype


@st.composite
def ea_lambda_cases(draw) -> EALambdaCase:
    B, T = draw(batch_shapes())
    gen = draw(generators())
    dtype = draw(float_dtypes)
    mask = draw(response_masks(B, T, gen))
    entropy = None if draw(st.integers(0, 4)) == 0 else uniform((B, T), gen, 0.0, 5.0, dtype)
    alpha = draw(st.one_of(st.sampled_from([0.05, 1.0]), st.floats(1e-3, 2.0)))
    beta = draw(st.one_of(st.sampled_from([0.0, 0.05, -0.05, -1.0]), st.floats(-2.0, 2.0)))
    bound = st.sampled_from([0.0, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0)
    lo, hi = sorted([draw(bound), draw(bound)])
    if draw(st.booleans()):
        lo, hi = 0.0, 1.0  # the defaults
    mask = as_mask_dtype(mask, draw(st.sampled_from(MASK_DTYPES)))
    return EALambdaCase(mask, entropy, alpha, beta, lo, hi, dtype)


class SegmentCase(NamedTuple):
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    boundary_table: torch.Tensor
    min_len: int
    max_len: int | None
    fallback_len: int | None


@st.composite
def segment_cases(draw) -> SegmentCase:
    B, T = draw(batch_shapes())
    gen = draw(generators())
    mask = draw(response_masks(B, T, gen))
    V = draw(st.integers(1, 8))
    table = torch.tensor(draw(st.lists(st.booleans(), min_size=V, max_size=V)), dtype=torch.bool)
    ids = torch.randint(0, V, (B, T), generator=gen)
    min_len = draw(st.integers(1, 5))
    max_len = draw(st.none() | st.integers(1, 8))
    fallback_len = draw(st.none() | st.integers(1, 6))
    mask = as_mask_dtype(mask, draw(st.sampled_from(MASK_DTYPES)))
    return SegmentCase(ids, mask, table, min_len, max_len, fallback_len)


@st.composite
def seg_ids_for(draw, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """int64 (B, T) segment ids 0..K-1 along the valid tokens (forward-filled at masked positions)."""
    B, T = mask.shape
    new_segment_rate = draw(st.sampled_from([0.0, 0.02, 0.3, 1.0]))
    starts = (torch.rand(B, T, generator=gen) < new_segment_rate) & mask.bool()
    first_valid = (mask.bool().long().cumsum(dim=1) == 1) & mask.bool()
    starts &= ~first_valid
    return starts.long().cumsum(dim=1)


class HVMCase(NamedTuple):
    rewards: torch.Tensor
    local_values: torch.Tensor
    global_values: torch.Tensor
    response_mask: torch.Tensor
    seg_ids: torch.Tensor
    gamma: float
    lam: float | torch.Tensor
    global_lam: float
    global_weight: float
    whiten: bool
    dtype: torch.dtype


@st.composite
def hvm_cases(draw, whiten=None) -> HVMCase:
    B, T = draw(batch_shapes())
    gen = draw(generators())
    dtype = draw(float_dtypes)
    mask = draw(response_masks(B, T, gen))
    seg_ids = draw(seg_ids_for(mask, gen))
    rewards = sparse_rewards(mask, gen, dtype, dense=draw(st.booleans()))
    local_values = uniform((B, T), gen, -1.0, 1.0, dtype)
    global_values = uniform((B, T), gen, -1.0, 1.0, dtype)
    lam = draw(lams(B, T, gen, dtype))
    global_lam = draw(float_lams)
    global_weight = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 2.0)))
    whiten = draw(st.booleans()) if whiten is None else whiten
    mask = as_mask_dtype(mask, draw(st.sampled_from(MASK_DTYPES)))
    return HVMCase(
        rewards,
        local_values,
        global_values,
        mask,
        seg_ids,
        draw(gammas),
        lam,
        global_lam,
        global_weight,
        whiten,
        dtype,
    )


class SCVLCase(NamedTuple):
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    scores: torch.Tensor
    group_ids: object
    threshold: float
    max_pairs: int


@st.composite
def scvl_cases(draw) -> SCVLCase:
    """Groups of responses that share long prefixes: each row copies its group's base sequence, then diverges."""
    B = draw(st.integers(1, 12))
    T = draw(st.integers(1, 24))
    gen = draw(generators())
    n_groups = draw(st.integers(1, 4))
    group_of_row = torch.randint(0, n_groups, (B,), generator=gen)
    vocab = draw(st.integers(2, 4))
    base = torch.randint(0, vocab, (n_groups, T), generator=gen)[group_of_row]  # (B, T)
    diverge_at = torch.randint(0, T + 1, (B, 1), generator=gen)
    noise = torch.randint(0, vocab, (B, T), generator=gen)
    ids = torch.where(torch.arange(T) < diverge_at, base, noise)
    mask = draw(response_masks(B, T, gen))
    # Right padding (positions from the row's length on) holds a pad id; interior masked tokens keep real ids.
    padding = torch.arange(T) >= (torch.arange(1, T + 1) * mask.long()).max(dim=1, keepdim=True).values
    ids = torch.where(padding, torch.full_like(ids, vocab + 7), ids)
    if draw(st.booleans()):
        scores = torch.randint(0, 2, (B,), generator=gen).float()
        threshold = 0.5
    else:
        scores = torch.rand(B, generator=gen)
        threshold = draw(st.sampled_from([0.5, 0.0, 1.0]) | st.floats(0.0, 1.0))
    form = draw(st.sampled_from(["tensor", "str_list", "int_list", "str_tuple"]))
    labels = [int(g) for g in group_of_row]
    group_ids = {
        "tensor": group_of_row,
        "str_list": [f"uid-{g}" for g in labels],
        "int_list": labels,
        "str_tuple": tuple(f"uid-{g}" for g in labels),
    }[form]
    mask = as_mask_dtype(mask, draw(st.sampled_from(MASK_DTYPES)))
    return SCVLCase(ids, mask, scores, group_ids, threshold, draw(st.integers(1, 20)))
