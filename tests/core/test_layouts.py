"""Host-shaped inputs: strided views (verl slices `values[:, -response_length:]`) and integer hyper-parameters
(YAML configs give `gamma: 1`) give the same results as contiguous tensors and floats."""

import pytest
import torch

from synapo_ext.core import compute_gae, ea_gae_lambda, hvm_advantages, scvl_pairs, segment_ids

from .strategies import sparse_rewards, uniform


def strided(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as `x` in a non-contiguous layout."""
    if kind == "every_other_column":
        y = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)[:, ::2]
        y.copy_(x)
        return y
    if kind == "column_major":
        return x.t().contiguous().t()
    # "slice": the response part of a (prompt + response) batch
    y = torch.zeros(x.shape[0], x.shape[1] + 5, dtype=x.dtype)
    y[:, 5:] = x
    return y[:, 5:]


KINDS = ["every_other_column", "column_major", "slice"]


@pytest.fixture
def batch(gen):
    B, T = 3, 150  # T > 64 spans several blocks of a blocked scan
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 100:] = False
    mask[1, 20:40] = False
    mask[2, torch.rand(T, generator=gen) < 0.3] = False
    mask[2, 0] = True
    return dict(
        mask=mask,
        rewards=sparse_rewards(mask, gen, torch.float32, dense=True),
        values=uniform((B, T), gen, -1, 1, torch.float32),
        global_values=uniform((B, T), gen, -1, 1, torch.float32),
        lam=uniform((B, T), gen, 0.8, 1.0, torch.float32),
        entropy=uniform((B, T), gen, 0.0, 5.0, torch.float32),
        seg_ids=(torch.arange(T) // 17).expand(B, T).contiguous(),
        ids=torch.randint(0, 10, (B, T), generator=gen),
    )


def _assert_same(actual, expected, mask):
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a[mask], e[mask])


@pytest.mark.parametrize("kind", KINDS)
def test_compute_gae_strided(batch, kind):
    b = batch
    expected = compute_gae(b["rewards"], b["values"], b["mask"], gamma=0.99, lam=b["lam"], whiten=True)
    actual = compute_gae(
        strided(b["rewards"], kind),
        strided(b["values"], kind),
        strided(b["mask"], kind),
        gamma=0.99,
        lam=strided(b["lam"], kind),
        whiten=True,
    )
    _assert_same(actual, expected, b["mask"])


@pytest.mark.parametrize("kind", KINDS)
def test_hvm_advantages_strided(batch, kind):
    b = batch
    kwargs = dict(gamma=0.99, global_lam=0.95, global_weight=1.0)
    expected = hvm_advantages(
        b["rewards"], b["values"], b["global_values"], b["mask"], b["seg_ids"], lam=b["lam"], **kwargs
    )
    actual = hvm_advantages(
        *(strided(b[key], kind) for key in ("rewards", "values", "global_values", "mask", "seg_ids")),
        lam=strided(b["lam"], kind),
        **kwargs,
    )
    _assert_same(actual, expected, b["mask"])


@pytest.mark.parametrize("kind", KINDS)
def test_ea_gae_lambda_and_segments_strided(batch, kind):
    b = batch
    expected = ea_gae_lambda(b["mask"], b["entropy"], alpha=0.05, beta=0.05)
    actual = ea_gae_lambda(strided(b["mask"], kind), strided(b["entropy"], kind), alpha=0.05, beta=0.05)
    assert torch.equal(actual[b["mask"]], expected[b["mask"]])
    table = torch.zeros(10, dtype=torch.bool)
    table[3] = True
    expected = segment_ids(b["ids"], b["mask"], table, min_len=4)
    actual = segment_ids(strided(b["ids"], kind), strided(b["mask"], kind), table, min_len=4)
    assert torch.equal(actual[b["mask"]], expected[b["mask"]])


@pytest.mark.parametrize("kind", KINDS)
def test_scvl_pairs_strided(batch, kind):
    b = batch
    ids = b["ids"].clone()
    ids[1] = ids[0]
    ids[1, 60:] = (ids[0, 60:] + 1) % 10  # rows 0 and 1 share a 60-token prefix
    mask = torch.ones_like(b["mask"])
    scores, groups = torch.tensor([1.0, 0.0, 0.0]), [0, 0, 0]
    expected = scvl_pairs(ids, mask, scores, groups)
    actual = scvl_pairs(strided(ids, kind), strided(mask, kind), scores, groups)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))
    assert (0, 1, 60) in set(zip(*(index.tolist() for index in expected), strict=True))


def test_integer_hyper_parameters(batch):
    b = batch
    for lam in (0, 1):
        expected = compute_gae(b["rewards"], b["values"], b["mask"], gamma=1.0, lam=float(lam))
        actual = compute_gae(b["rewards"], b["values"], b["mask"], gamma=1, lam=lam)
        _assert_same(actual, expected, b["mask"])
    expected = hvm_advantages(
        b["rewards"],
        b["values"],
        b["global_values"],
        b["mask"],
        b["seg_ids"],
        gamma=1.0,
        lam=1.0,
        global_lam=1.0,
        global_weight=1.0,
    )
    actual = hvm_advantages(
        b["rewards"],
        b["values"],
        b["global_values"],
        b["mask"],
        b["seg_ids"],
        gamma=1,
        lam=1,
        global_lam=1,
        global_weight=1,
    )
    _assert_same(actual, expected, b["mask"])
    expected = ea_gae_lambda(b["mask"], alpha=1.0, beta=0.0)
    assert torch.equal(ea_gae_lambda(b["mask"], alpha=1, beta=0), expected)
