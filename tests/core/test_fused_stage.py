"""The fused numba stage (one pass per row) gives the composed pure-torch stage's results, and writes only the
outputs asked for. The torch stage composes the public functions, each tested against the float64 reference."""

import dataclasses

import pytest
import torch

from synapo_ext.core import PRESETS, compute_synapo_advantages, params_from_preset
from synapo_ext.core.backend import numba_available, use_backend

needs_numba = pytest.mark.skipif(not numba_available(), reason="numba not installed")


def _batch(seed: int, dtype: torch.dtype = torch.float32, B: int = 12, T: int = 90):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=gen) > 0.5 * float(torch.rand(1, generator=gen))  # interior zeros
    mask[torch.arange(B), torch.randint(0, T, (B,), generator=gen)] = True
    if seed % 2:
        mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=gen)  # right-padded
    table = torch.zeros(7, dtype=torch.bool)
    table[0] = seed % 3 != 0  # every third case has no delimiter (the fallback chunks)
    ids = torch.randint(0, 7, (B, T), generator=gen)
    ids[:, :4] = 1
    scores = (torch.rand(B, generator=gen) > 0.5).float()
    return {
        "rewards": (torch.randn(B, T, generator=gen) * 0.1).to(dtype),
        "values": (torch.rand(B, T, generator=gen) * 2 - 1).to(dtype),
        "global_values": (torch.rand(B, T, generator=gen) * 2 - 1).to(dtype),
        "entropy": (torch.rand(B, T, generator=gen) * 3).to(dtype),
        "response_mask": mask.long() if seed % 4 == 1 else mask,
        "response_ids": ids.to((torch.long, torch.int32, torch.uint8)[seed % 3]),
        "boundary_table": table,
        "scores": scores,
        "group_ids": torch.arange(B) // 4,
    }


def _params(preset: str, seed: int):
    p = params_from_preset(preset, ea_gae_alpha=0.2, ea_gae_beta=(0.05, -0.3, 0.2)[seed % 3])
    return dataclasses.replace(
        p,
        gamma=(1.0, 0.9, 0.97)[seed % 3],
        hvm_min_len=(1, 3, 6)[seed % 3],
        hvm_max_len=(None, 5, 13)[seed // 3 % 3],
        hvm_fallback_len=(None, 4)[seed % 2],
        hvm_global_weight=(1.0, 0.5)[seed % 2],
    )


@needs_numba
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("seed", range(12))
def test_fused_stage_matches_the_torch_stage(preset, seed):
    x = _batch(seed, torch.float64 if seed % 5 == 0 else torch.float32)
    p = _params(preset, seed)
    with use_backend("torch"):
        expected = compute_synapo_advantages(p, **x, return_lam=True, return_seg_ids=True)
    with use_backend("numba"):
        out = compute_synapo_advantages(p, **x, return_lam=True, return_seg_ids=True)
    valid = x["response_mask"].bool()
    tol = {"atol": 3e-6, "rtol": 1e-5}
    # float64 inputs: float64 throughout, except that the composed path's lambda from the mask alone (no entropy) is
    # float32 (ea_gae_lambda's dtype rule) where the fused one keeps float64
    if x["rewards"].dtype == torch.float64 and (p.ea_gae_enabled or not p.length_adaptive_lambda):
        tol = {"atol": 1e-12, "rtol": 1e-12}
    for name in ("advantages", "returns", "global_returns"):
        want, got = getattr(expected, name), getattr(out, name)
        assert (want is None) == (got is None), name
        if want is not None:
            assert got.dtype == want.dtype, name
            torch.testing.assert_close(got[valid], want[valid], **tol, msg=name)
    if p.hvm_enabled:
        assert out.start_mask.dtype == torch.bool
        assert torch.equal(out.start_mask, expected.start_mask)
        assert torch.equal(out.seg_ids[valid], expected.seg_ids[valid])
    if isinstance(expected.lam, torch.Tensor):
        torch.testing.assert_close(out.lam[valid], expected.lam[valid])
    else:
        assert out.lam == expected.lam
    assert out.metrics.keys() == expected.metrics.keys()
    for key, value in expected.metrics.items():
        assert out.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    if p.scvl_enabled:
        assert all(torch.equal(a, b) for a, b in zip(out.scvl, expected.scvl, strict=True))


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=needs_numba)])
def test_lambda_and_segment_ids_only_when_asked(backend):
    x = _batch(1)
    with use_backend(backend):
        out = compute_synapo_advantages(params_from_preset("synapo"), **x)
        assert out.lam is None and out.seg_ids is None
        assert out.start_mask.dtype == torch.bool
        out = compute_synapo_advantages(params_from_preset("ppo"), **x)
        assert out.lam == params_from_preset("ppo").gae_lambda  # a constant costs nothing to return
        out = compute_synapo_advantages(params_from_preset("synapo"), **x, return_lam=True, return_seg_ids=True)
        assert out.lam.shape == x["rewards"].shape and out.seg_ids.dtype == torch.long


@needs_numba
@pytest.mark.parametrize("name", ["rewards", "values", "global_values", "entropy"])
def test_fused_stage_refuses_non_finite_inputs_by_name(name):
    x = _batch(2)
    x[name] = x[name].clone()
    x[name][3, -1] = float("nan")  # a masked position counts too
    with use_backend("numba"), pytest.raises(ValueError, match=name):
        compute_synapo_advantages(params_from_preset("synapo"), **x)


@needs_numba
def test_fused_stage_bf16_inputs_compute_in_float32():
    x = _batch(3)
    for name in ("rewards", "values", "global_values", "entropy"):
        x[name] = x[name].bfloat16()
    with use_backend("torch"):
        expected = compute_synapo_advantages(params_from_preset("synapo"), **x)
    with use_backend("numba"):
        out = compute_synapo_advantages(params_from_preset("synapo"), **x)
    assert out.advantages.dtype == torch.float32
    valid = x["response_mask"].bool()
    torch.testing.assert_close(out.advantages[valid], expected.advantages[valid], atol=3e-6, rtol=1e-5)


@needs_numba
@pytest.mark.parametrize("preset", ["synapo", "vapo"])
def test_row_parallel_kernels_match_the_serial_ones(preset, monkeypatch):
    from synapo_ext.core import backend

    x = _batch(4)
    x["rewards"][2, 0] = float("inf")  # a flagged row in the parallel loop too
    p = _params(preset, 4)
    with use_backend("numba"):
        with pytest.raises(ValueError, match="rewards"):
            compute_synapo_advantages(p, **x)
        x["rewards"][2, 0] = 0.0
        expected = compute_synapo_advantages(p, **x, return_lam=True)
        monkeypatch.setattr(backend, "PARALLEL_MIN_ELEMENTS", 0)  # every batch takes the row-parallel kernels
        out = compute_synapo_advantages(p, **x, return_lam=True)
        with pytest.raises(ValueError, match="rewards"):
            compute_synapo_advantages(p, **(x | {"rewards": x["rewards"].clone().fill_(float("nan"))}))
    for name in ("advantages", "returns", "global_returns", "start_mask", "lam"):
        want, got = getattr(expected, name), getattr(out, name)
        assert (want is None and got is None) or torch.equal(got, want), name


MASK_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=needs_numba)])
def test_stage_reads_a_mask_of_any_dtype_the_same(backend):
    """The mask goes into the stage as it comes (no conversion to int64 first): every dtype, with its -0.0 and its
    empty rows, gives the bool mask's results exactly."""
    x = _batch(5)
    mask = x["response_mask"].bool().clone()
    mask[[2, 7]] = False  # empty rows: skipped and counted
    p = _params("synapo", 5)
    with use_backend(backend):
        expected = compute_synapo_advantages(p, **(x | {"response_mask": mask}), return_lam=True)
        for dtype in MASK_DTYPES:
            m = mask.to(dtype)
            if dtype.is_floating_point:
                m = torch.where(mask, m, -0.0)  # -0.0 is a 0
            out = compute_synapo_advantages(p, **(x | {"response_mask": m}), return_lam=True)
            assert out.metrics == expected.metrics, dtype
            for name in ("advantages", "returns", "global_returns", "start_mask", "lam", "valid_rows"):
                assert torch.equal(getattr(out, name), getattr(expected, name)), (dtype, name)
            assert all(torch.equal(a, b) for a, b in zip(out.scvl, expected.scvl, strict=True)), dtype


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=needs_numba)])
@pytest.mark.parametrize(
    ("dtype", "bad"),
    [(d, v) for d in (torch.int64, torch.int16) for v in (2, -1)]
    + [(d, v) for d in (torch.float32, torch.bfloat16, torch.float64) for v in (2.0, -1.0, 0.5, float("nan"))],
)
def test_stage_refuses_a_mask_value_other_than_0_and_1(backend, dtype, bad):
    x = _batch(6)
    mask = x["response_mask"].to(dtype)
    mask[4, -1] = bad  # a padding position counts too
    with use_backend(backend), pytest.raises(ValueError, match="response_mask"):
        compute_synapo_advantages(_params("vapo", 6), **(x | {"response_mask": mask}))


@needs_numba
def test_row_blocks_cover_every_row_once_and_raise_a_workers_error(monkeypatch):
    """PARALLEL runs a kernel on blocks of rows in threads: each row once, per-row arguments sliced, others whole,
    and an error in any block reaches the caller."""
    from synapo_ext.core.fast import kernels

    seen = []

    def kernel(rows, table, out):
        seen.append((rows.copy(), table.shape))
        out[:] = rows * 2
        if 13 in rows:
            raise RuntimeError("row 13")

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    run = kernels._row_blocks(kernel, [0, 2])
    rows, table, out = torch.arange(40).numpy(), torch.zeros(40).numpy(), torch.zeros(40, dtype=torch.long).numpy()
    with pytest.raises(RuntimeError, match="row 13"):
        run(rows, table, out)
    rows = torch.arange(50, 90).numpy()
    seen.clear()
    run(rows, table, out)
    assert sorted(int(r) for block, _ in seen for r in block) == list(range(50, 90))
    assert len(seen) == 3 * kernels.BLOCKS_PER_THREAD and all(shape == (40,) for _, shape in seen)
    assert (out == rows * 2).all()
