"""verl's V1 trainer `_compute_advantage` (real method, stubbed TransferQueue) runs SynAPO for `synapo` and is
unchanged for `gae`."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("transfer_queue", reason="verl's V1 trainer needs TransferQueue (synapo-ext[verl] installs it)")

from omegaconf import OmegaConf  # noqa: E402
from transfer_queue import KVBatchMeta  # noqa: E402
from verl.trainer.ppo.v1 import trainer_base  # noqa: E402
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync  # noqa: E402

from synapo_ext.core import compute_synapo_advantages  # noqa: E402
from synapo_ext.patches.verl import apply_synapo_to_verl, revert_synapo_to_verl  # noqa: E402
from synapo_ext.verl.config import params_from_algorithm  # noqa: E402

from .helpers import FakeTQ, algorithm_config, make_tokenizer, padded, rollout_batch  # noqa: E402

pytestmark = pytest.mark.verl


def make_trainer(algorithm, tokenizer) -> PPOTrainerSync:
    trainer = PPOTrainerSync.__new__(PPOTrainerSync)  # PPOTrainer is abstract; skip __init__ (no Ray)
    trainer.config = OmegaConf.create(
        {"algorithm": algorithm, "actor_rollout_ref": {"rollout": {"n": 4}}, "trainer": {"critic_warmup": 0}}
    )
    trainer.global_steps = 1
    trainer.tokenizer = tokenizer
    return trainer


def load(tq: FakeTQ, batch: dict) -> KVBatchMeta:
    B = batch["responses"].shape[0]
    keys = [f"{batch['uid'][b]}_0_{b}" for b in range(B)]
    rows = {
        "uid": batch["uid"],
        "response_mask": batch["response_mask"],
        "rm_scores": batch["token_level_scores"],
        "responses": batch["responses"],
        "values": batch["values"],
        "entropy": batch["entropys"],
        "values_global": batch["values_global"].bfloat16(),  # the critic's infer_batch stores its dtype (bf16)
    }
    tq.load(keys, rows, full_fields=("values_global",))
    return KVBatchMeta(keys=keys, tags=[{}] * B, partition_id="train")


@pytest.fixture
def tq(monkeypatch):
    fake = FakeTQ()
    monkeypatch.setattr(trainer_base, "tq", fake)
    return fake


@pytest.mark.parametrize("preset", ["synapo", "vapo", "synapo-no-hvm", "ppo"])
def test_v1_compute_advantage_runs_synapo(tq, preset):
    tok = make_tokenizer()
    batch = rollout_batch(tok, seed=5)
    meta = load(tq, batch)
    algorithm = algorithm_config(preset)
    metrics: dict = {}
    make_trainer(algorithm, tok)._compute_advantage(meta, metrics)

    params = params_from_algorithm(algorithm)
    from synapo_ext.core import boundary_table_from_tokenizer

    ref = compute_synapo_advantages(
        params,
        rewards=batch["token_level_scores"],
        values=batch["values"],
        response_mask=batch["response_mask"],
        global_values=batch["values_global"].bfloat16().float() if params.hvm_enabled else None,
        entropy=batch["entropys"] if params.ea_gae_enabled else None,
        response_ids=batch["responses"],
        boundary_table=boundary_table_from_tokenizer(tok),
        scores=batch["token_level_scores"].sum(-1),
        group_ids=list(batch["uid"]),
    )
    T = batch["responses"].shape[1]
    rows = [tq.store[k] for k in meta.keys]
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(padded([r["advantages"] for r in rows], T)[mask], ref.advantages[mask])
    torch.testing.assert_close(padded([r["returns"] for r in rows], T)[mask], ref.returns[mask])
    if params.hvm_enabled:
        glob = padded([r["synapo_global_returns"] for r in rows], T)
        torch.testing.assert_close(glob[mask], ref.global_returns[mask])
        starts = padded([r["synapo_start_mask"] for r in rows], T)
        assert torch.equal(starts[mask].bool(), ref.start_mask[mask])
        # written back response-only, in the dtype the store holds (a dtype change is refused by the store)
        assert all(r["values_global"].dtype == torch.bfloat16 for r in rows)
        old = padded([r["values_global"].float() for r in rows], T)
        torch.testing.assert_close(old[mask], batch["values_global"].bfloat16().float()[mask])
        assert "synapo/hvm/segments_mean" in metrics
    if params.scvl_enabled:
        sign = torch.stack([r["synapo_scvl_sign"] for r in rows])
        assert int((sign > 0).sum()) == int((sign < 0).sum()) == ref.scvl.pos_index.numel() > 0
    if params.positive_lm_coef > 0:
        weight = torch.stack([r["synapo_lm_weight"] for r in rows])
        expected = params.positive_lm_coef * (batch["token_level_scores"].sum(-1) >= params.positive_lm_threshold)
        assert torch.equal(weight, expected.float())


def test_v1_gae_unchanged_by_plugin(monkeypatch):
    tok = make_tokenizer()
    batch = rollout_batch(tok, seed=9)
    algorithm = algorithm_config(None)
    algorithm.adv_estimator = "gae"
    algorithm.lam = 0.95

    def run():
        fake = FakeTQ()
        monkeypatch.setattr(trainer_base, "tq", fake)
        meta = load(fake, batch)
        make_trainer(algorithm, tok)._compute_advantage(meta, {})
        return fake.store

    with_plugin = run()
    revert_synapo_to_verl()
    try:
        assert getattr(trainer_base.PPOTrainer._compute_advantage, "__synapo_wraps__", None) is None
        without = run()
    finally:
        apply_synapo_to_verl()
    assert with_plugin.keys() == without.keys()
    for key in with_plugin:
        assert with_plugin[key].keys() == without[key].keys()
        for name in ("advantages", "returns"):
            assert torch.equal(with_plugin[key][name], without[key][name])


def test_advantage_step_traffic(monkeypatch):
    """Beyond verl's own read and write: one read (SynAPO's inputs and the mask), one write, and one read of the
    last written field (a small one; `values_global`, the field the store already holds, goes first)."""
    tok = make_tokenizer()
    batch = rollout_batch(tok, seed=3)
    calls = {}
    for estimator in ("gae", "synapo"):
        fake = FakeTQ()
        monkeypatch.setattr(trainer_base, "tq", fake)
        algorithm = algorithm_config("synapo" if estimator == "synapo" else None)
        algorithm.adv_estimator = estimator
        make_trainer(algorithm, tok)._compute_advantage(load(fake, batch), {})
        calls[estimator] = fake.calls
    gae, synapo = calls["gae"], calls["synapo"]
    assert [kind for kind, _ in gae] == ["get", "put"]
    assert [kind for kind, _ in synapo] == ["get", "get", "put", "put", "get"]
    assert synapo[1:3] == gae  # verl's own traffic, unchanged
    ours = synapo[3][1]
    assert ours[0] == "values_global" and synapo[4][1] == (ours[-1],)
    assert ours[-1] in ("synapo_lm_weight", "synapo_scvl_sign", "synapo_scvl_diverge", "synapo_scvl_partner")


def test_a_field_the_store_dropped_fails_the_step(tq, monkeypatch):
    """TransferQueue logs a refused field and drops the metadata of it and every later one: the step's read-back
    of the last field turns that into an error."""
    tok = make_tokenizer()
    batch = rollout_batch(tok, seed=2)
    meta = load(tq, batch)
    put = tq.kv_batch_put

    def dropping_put(keys, partition_id=None, fields=None):
        out = put(keys, partition_id, fields)
        if "values_global" in fields.keys():  # the controller refused the first field: later ones are lost
            for key in keys:
                for name in list(fields.keys())[1:]:
                    tq.store[key].pop(name, None)
        return out

    monkeypatch.setattr(tq, "kv_batch_put", dropping_put)
    with pytest.raises(RuntimeError, match="did not take the advantage step's fields"):
        make_trainer(algorithm_config("synapo"), tok)._compute_advantage(meta, {})
