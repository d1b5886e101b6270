"""Empty input: a batch of B = 0 rows gives empty outputs; rows with no valid token are skipped by the stage
(zeros, no SCVL pair, counted in `synapo/rows_empty`) and refused, naming `response_mask`, by the low-level
functions (SPEC "Bad input")."""

import pytest
import torch

from synapo_ext.core import (
    PRESETS,
    compute_gae,
    compute_synapo_advantages,
    ea_gae_lambda,
    hvm_advantages,
    params_from_preset,
    scvl_group_stats,
    scvl_pairs,
    segment_ids,
)
from synapo_ext.core.backend import numba_available, use_backend

from .test_stage import _batch

BACKENDS = ["torch", pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="no numba"))]
MASK_DTYPES = [torch.bool, torch.int64, torch.float32]


def _empty_batch(mask_dtype: torch.dtype, T: int = 5) -> dict:
    z = torch.zeros(0, T)
    return {
        "rewards": z,
        "values": z,
        "response_mask": torch.zeros(0, T, dtype=mask_dtype),
        "global_values": z,
        "entropy": z,
        "response_ids": torch.zeros(0, T, dtype=torch.long),
        "boundary_table": torch.ones(6, dtype=torch.bool),
        "scores": torch.zeros(0),
        "group_ids": [],
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("T", [0, 5])
def test_empty_batch_gives_empty_outputs(backend, mask_dtype, T):
    x = _empty_batch(mask_dtype, T)
    z, mask = x["rewards"], x["response_mask"]
    with use_backend(backend):
        assert ea_gae_lambda(mask, z, alpha=0.05, beta=0.1).shape == (0, T)
        for lam in (0.9, torch.zeros(0, T)):
            advantages, returns = compute_gae(z, z, mask, gamma=1.0, lam=lam, whiten=True)
            assert advantages.shape == returns.shape == (0, T)
        seg = segment_ids(x["response_ids"], mask, x["boundary_table"], min_len=2, max_len=3, fallback_len=2)
        assert seg.shape == (0, T) and seg.dtype == torch.long
        hvm = hvm_advantages(z, z, z, mask, seg, gamma=1.0, lam=0.9, global_lam=0.9, global_weight=1.0, whiten=True)
        assert all(t.shape == (0, T) for t in hvm)
        for group_ids in ([], torch.zeros(0, dtype=torch.long)):
            pairs = scvl_pairs(x["response_ids"], mask, x["scores"], group_ids)
            assert all(t.shape == (0,) and t.dtype == torch.long for t in pairs)
        assert scvl_group_stats(x["scores"], [])["groups"] == 0


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_stage_on_an_empty_batch(preset, mask_dtype):
    out = compute_synapo_advantages(params_from_preset(preset), **_empty_batch(mask_dtype))
    assert out.advantages.shape == out.returns.shape == (0, 5)
    assert out.metrics["synapo/rows_empty"] == 0.0
    assert out.valid_rows.shape == (0,)
    if out.scvl is not None:
        assert out.scvl.pos_index.numel() == 0 and out.metrics["synapo/scvl/pairs"] == 0.0


def _with_empty_rows(x: dict, empty: list[int], mask_dtype: torch.dtype) -> dict:
    """`x` with all-masked rows inserted at the positions `empty` of the result (their other inputs: noise)."""
    B = x["response_mask"].shape[0] + len(empty)
    keep = torch.tensor([b for b in range(B) if b not in empty])
    gen = torch.Generator().manual_seed(7)
    out = {"boundary_table": x["boundary_table"]}
    for name in ("rewards", "values", "global_values", "entropy", "response_ids", "response_mask", "scores"):
        src = x[name]
        noise = torch.randint(0, 6, (B, *src.shape[1:]), generator=gen).to(src.dtype)
        noise[keep] = src
        out[name] = noise
    out["response_mask"][empty] = False
    out["response_mask"] = out["response_mask"].to(mask_dtype)
    group_ids = ["pad"] * B
    for i, b in enumerate(keep.tolist()):
        group_ids[b] = x["group_ids"][i]
    out["group_ids"] = group_ids
    return out, keep


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_stage_skips_and_counts_rows_with_no_token(backend, preset, mask_dtype, gen):
    x = _batch(gen)
    params = params_from_preset(preset, ea_gae_alpha=0.2)
    padded, keep = _with_empty_rows(x, [0, 3, 4, 11], mask_dtype)
    with use_backend(backend):
        expected = compute_synapo_advantages(params, **x, return_lam=True, return_seg_ids=True)
        out = compute_synapo_advantages(params, **padded, return_lam=True, return_seg_ids=True)
    empty = torch.ones(out.advantages.shape[0], dtype=torch.bool)
    empty[keep] = False
    assert out.metrics.pop("synapo/rows_empty") == 4.0
    assert expected.metrics.pop("synapo/rows_empty") == 0.0
    assert out.metrics == expected.metrics
    assert torch.equal(out.valid_rows, ~empty)
    tensors = ["advantages", "returns", "global_returns", "start_mask", "seg_ids"]
    tensors += ["lam"] if isinstance(out.lam, torch.Tensor) else []
    for name in tensors:
        got, want = getattr(out, name), getattr(expected, name)
        if want is None:
            assert got is None, name
            continue
        assert torch.equal(got[keep], want), name
        assert not got[empty].any(), name  # zeros (False) on skipped rows
    if params.scvl_enabled:
        assert torch.equal(out.scvl.pos_index, keep[expected.scvl.pos_index])
        assert torch.equal(out.scvl.neg_index, keep[expected.scvl.neg_index])
        assert torch.equal(out.scvl.diverge_index, expected.scvl.diverge_index)
        assert torch.equal(out.scvl_pos_values, expected.scvl_pos_values)
        assert torch.equal(out.scvl_sides.rows, keep[expected.scvl_sides.rows])
        assert torch.equal(out.scvl_sides.partner_values, expected.scvl_sides.partner_values)
        assert out.scvl.pos_index.numel() > 0  # the case has pairs, so the index map is exercised
    if isinstance(out.lam, float):
        assert out.lam == expected.lam


def test_stage_with_every_row_empty(gen):
    x = _batch(gen, B=4)
    x["response_mask"] = torch.zeros_like(x["response_mask"])
    out = compute_synapo_advantages(params_from_preset("synapo"), **x)
    assert out.metrics["synapo/rows_empty"] == 4.0
    assert out.advantages.shape == x["rewards"].shape and not out.advantages.any() and not out.returns.any()
    assert out.scvl.pos_index.numel() == 0


@pytest.mark.parametrize("name", ["rewards", "values", "entropy", "scores", "group_ids"])
def test_stage_refuses_per_row_inputs_of_the_wrong_length(name, gen):
    x = _batch(gen)
    x["response_mask"][2] = False  # the skip-and-scatter path
    x[name] = x[name][:-1]
    with pytest.raises(ValueError, match=name):
        compute_synapo_advantages(params_from_preset("synapo"), **x)


def test_low_level_functions_refuse_an_empty_row(gen):
    x = _batch(gen, B=3)
    mask = x["response_mask"].clone()
    mask[1] = False
    with pytest.raises(ValueError, match="response_mask"):
        compute_gae(x["rewards"], x["values"], mask, gamma=1.0, lam=0.9)
    with pytest.raises(ValueError, match="response_mask"):
        segment_ids(x["response_ids"], mask, x["boundary_table"])
