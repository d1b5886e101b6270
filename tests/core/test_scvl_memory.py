"""SCVL pairs are formed per group: memory O(sum of group_size^2), never O(B^2), with the same pairs as before."""

import subprocess
import sys

import pytest
import torch

from synapo_ext.core import scvl_pairs
from synapo_ext.core.scvl import group_codes

from .reference import ref_scvl_pairs


def test_group_codes_of_tensors_follow_first_appearance(gen):
    ids = torch.randint(-5, 40, (300,), generator=gen)
    codes = group_codes(ids, 300)
    assert torch.equal(codes, group_codes(ids.tolist(), 300))  # the dict-based path over Python ints
    assert codes[0] == 0 and int(codes.max()) + 1 == ids.unique().numel()
    assert torch.equal(group_codes(torch.tensor([7, 7, 2, 9, 2]), 5), torch.tensor([0, 0, 1, 2, 1]))


@pytest.mark.parametrize("group_size", [1, 2, 5, 16])
def test_many_interleaved_groups_match_reference(group_size, gen):
    B, T = 80, 12
    ids = torch.randint(0, 3, (B, T), generator=gen)
    ids[:, :2] = 1
    mask = torch.arange(T)[None] < torch.randint(3, T + 1, (B,), generator=gen)[:, None]
    scores = (torch.rand(B, generator=gen) > 0.5).float()
    group_ids = torch.randperm(B, generator=gen) // group_size  # groups interleaved across the batch
    pairs = scvl_pairs(ids, mask, scores, group_ids, max_pairs=3)
    expected = ref_scvl_pairs(ids, mask, scores, group_ids, max_pairs=3)
    assert list(zip(*(t.tolist() for t in pairs), strict=True)) == [tuple(p) for p in expected]


def test_memory_does_not_grow_as_b_squared():
    # B = 32768 short rows in groups of 8: a (B, B) candidate matrix alone is 1 GiB; per group it is 64 KiB of pairs
    code = """
import resource, torch
from synapo_ext.core import scvl_pairs
from synapo_ext.core.backend import use_backend
B, T = 32768, 6
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, 4, (B, T), generator=gen)
mask = torch.ones(B, T, dtype=torch.bool)
scores = (torch.arange(B) % 2).float()
groups = torch.arange(B) // 8
with use_backend("torch"):
    scvl_pairs(ids[:64], mask[:64], scores[:64], groups[:64])  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pairs = scvl_pairs(ids, mask, scores, groups)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(pairs.pos_index.numel(), (after - before) // 1024)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    n_pairs, grown_mib = (int(x) for x in result.stdout.split())
    assert 0 < n_pairs <= 4096 * 16
    assert grown_mib < 200, f"peak memory grew by {grown_mib} MiB"
