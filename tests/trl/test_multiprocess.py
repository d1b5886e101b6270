"""Two ranks under torchrun (gloo, CPU): the critic stays identical, SCVL groups are whole or gathered."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")

pytestmark = pytest.mark.trl


def test_two_ranks_keep_one_critic(tmp_path, torchrun):
    torchrun("_dist_run.py", str(tmp_path), timeout=420, env={"ACCELERATE_USE_CPU": "true"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for layout in ("whole_groups", "split_groups"):
        r0, r1 = ranks[0][layout], ranks[1][layout]
        assert r0["critic_moved"], layout
        assert r0["critic"] == r1["critic"], f"{layout}: the critic differs across ranks"
        assert r0["policy"] == r1["policy"], f"{layout}: the policy differs across ranks"
        assert r0["scvl_pairs"] == r1["scvl_pairs"] and sum(r0["scvl_pairs"]) > 0, (layout, r0["scvl_pairs"])
        assert r0["warmup"] == r1["warmup"] == [2, "plateau"], (layout, r0["warmup"], r1["warmup"])
    for rank in ranks:
        assert "num_generations" in rank["illegal"]["error"]
