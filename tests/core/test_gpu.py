"""The core functions on CUDA tensors against the float64 loop reference (skipped without a GPU)."""

import pytest
import torch

from synapo_ext.core import compute_gae, ea_gae_lambda, hvm_advantages, scvl_loss, scvl_pairs, segment_ids

from .reference import (
    ref_compute_gae,
    ref_ea_gae_lambda,
    ref_hvm_advantages,
    ref_scvl_loss,
    ref_scvl_pairs,
    ref_segment_ids,
)
from .strategies import assert_close_valid, assert_equal_valid, sparse_rewards, uniform

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"


@pytest.fixture(params=[40, 16384], ids=["T40", "T16384"])
def batch(request):
    gen = torch.Generator().manual_seed(7)
    B, T = 3, request.param
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T // 2 :] = False
    mask[1, torch.rand(T, generator=gen) < 0.2] = False
    mask[1, 0] = True
    mask[2, 1:] = False  # one valid token
    ids = torch.randint(0, 50, (B, T), generator=gen)
    table = torch.zeros(50, dtype=torch.bool)
    table[[3, 17]] = True
    return dict(
        mask=mask,
        rewards=sparse_rewards(mask, gen, torch.float32, dense=True),
        values=uniform((B, T), gen, -1, 1, torch.float32),
        global_values=uniform((B, T), gen, -1, 1, torch.float32),
        entropy=uniform((B, T), gen, 0, 5, torch.float32),
        ids=ids,
        table=table,
    )


def _cuda(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def test_ea_gae_lambda_and_compute_gae_on_cuda(batch):
    b = batch
    lam = ea_gae_lambda(_cuda(b["mask"]), _cuda(b["entropy"]), alpha=0.05, beta=0.05)
    assert lam.device.type == "cuda"
    assert_close_valid(
        lam.cpu(), ref_ea_gae_lambda(b["mask"], b["entropy"], alpha=0.05, beta=0.05), b["mask"], atol=1e-4
    )
    lam = lam.cpu()
    for whiten in (False, True):
        out = compute_gae(
            *(_cuda(b[k]) for k in ("rewards", "values", "mask")), gamma=0.99, lam=_cuda(lam), whiten=whiten
        )
        ref = ref_compute_gae(b["rewards"], b["values"], b["mask"], gamma=0.99, lam=lam, whiten=whiten)
        for actual, expected in zip(out, ref, strict=True):
            assert actual.device.type == "cuda"
            assert_close_valid(actual.cpu(), expected, b["mask"], atol=1e-4)


def test_segments_and_hvm_on_cuda(batch):
    b = batch
    seg = segment_ids(_cuda(b["ids"]), _cuda(b["mask"]), _cuda(b["table"]), min_len=3, max_len=500)
    ref_seg = ref_segment_ids(b["ids"], b["mask"], b["table"], min_len=3, max_len=500)
    assert_equal_valid(seg.cpu(), ref_seg, b["mask"])
    kwargs = dict(gamma=1.0, lam=0.95, global_lam=0.95, global_weight=1.0)
    result = hvm_advantages(*(_cuda(b[k]) for k in ("rewards", "values", "global_values", "mask")), seg, **kwargs)
    ref = ref_hvm_advantages(b["rewards"], b["values"], b["global_values"], b["mask"], ref_seg, **kwargs)
    for field in ("advantages", "local_returns", "global_returns"):
        assert_close_valid(getattr(result, field).cpu(), getattr(ref, field), b["mask"], atol=1e-4)
    assert_equal_valid(result.start_mask.cpu(), ref.start_mask, b["mask"])


def test_scvl_on_cuda():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 9], [5, 1, 1, 0], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
    scores, groups = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long)
    pairs = scvl_pairs(_cuda(ids), _cuda(mask), _cuda(scores), _cuda(groups))
    expected = ref_scvl_pairs(ids, mask, scores, groups)
    assert list(zip(*(index.cpu().tolist() for index in pairs), strict=True)) == expected
    values = torch.linspace(-1, 1, 16).reshape(4, 4)
    loss = scvl_loss(_cuda(values), *pairs, margin=0.5)
    torch.testing.assert_close(
        loss.cpu().double(),
        torch.tensor(ref_scvl_loss(values, expected, margin=0.5), dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("preset", ["synapo", "vapo", "ppo"])
def test_stage_on_cuda_matches_the_cpu_stage(batch, preset):
    from synapo_ext.core import compute_synapo_advantages, params_from_preset
    from synapo_ext.core.backend import use_backend

    b = batch
    x = {
        "rewards": b["rewards"],
        "values": b["values"],
        "response_mask": b["mask"],
        "global_values": b["global_values"],
        "entropy": b["entropy"],
        "response_ids": b["ids"],
        "boundary_table": b["table"],
        "scores": torch.tensor([1.0, 0.0, 1.0]),
        "group_ids": torch.zeros(3, dtype=torch.long),
    }
    params = params_from_preset(preset)
    with use_backend("torch"):
        expected = compute_synapo_advantages(params, **x)
    out = compute_synapo_advantages(params, **{k: _cuda(v) for k, v in x.items()})
    valid = b["mask"]
    for name in ("advantages", "returns", "global_returns"):
        if getattr(expected, name) is not None:
            torch.testing.assert_close(
                getattr(out, name).cpu()[valid], getattr(expected, name)[valid], atol=1e-5, rtol=1e-5
            )
    if expected.start_mask is not None:
        assert torch.equal(out.start_mask.cpu(), expected.start_mask)
    if expected.scvl is not None:
        assert all(torch.equal(p.cpu(), q) for p, q in zip(out.scvl, expected.scvl, strict=True))
