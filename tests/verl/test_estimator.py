"""verl's own `compute_advantage` runs our estimator for `synapo`, and is untouched for every other estimator."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("transfer_queue", reason="verl's V1 trainer needs TransferQueue (synapo-ext[verl] installs it)")

from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos, ray_trainer  # noqa: E402
from verl.trainer.ppo.v1 import utils as v1_utils  # noqa: E402

from synapo_ext.core import PRESETS, boundary_table_from_tokenizer, compute_synapo_advantages  # noqa: E402
from synapo_ext.patches.verl import apply_synapo_to_verl, revert_synapo_to_verl  # noqa: E402
from synapo_ext.verl.config import params_from_algorithm  # noqa: E402
from synapo_ext.verl.estimator import StepContext, compute_synapo_advantage, step_context  # noqa: E402

from .helpers import algorithm_config, make_tokenizer, rollout_batch  # noqa: E402

pytestmark = pytest.mark.verl

TENSORS = ("responses", "response_mask", "token_level_scores", "token_level_rewards", "values", "values_global")


def to_data(batch: dict, entropy_key: str = "entropys") -> DataProto:
    tensors = {k: batch[k] for k in TENSORS}
    tensors[entropy_key] = batch["entropys"]
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": batch["uid"]})


def core_reference(batch: dict, tokenizer, algorithm) -> object:
    params = params_from_algorithm(algorithm)
    return compute_synapo_advantages(
        params,
        rewards=batch["token_level_rewards"],
        values=batch["values"],
        response_mask=batch["response_mask"],
        global_values=batch["values_global"] if params.hvm_enabled else None,
        entropy=batch["entropys"] if params.ea_gae_enabled else None,
        response_ids=batch["responses"],
        boundary_table=boundary_table_from_tokenizer(tokenizer, params.hvm_delimiters),
        scores=batch["token_level_scores"].sum(-1),
        group_ids=list(batch["uid"]) if params.scvl_enabled else None,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("entry", ["ray_trainer", "v1_utils"])
def test_verl_compute_advantage_runs_synapo(tokenizer, preset, entry):
    batch = rollout_batch(tokenizer, seed=hash(preset) % 100)
    algorithm = algorithm_config(preset)
    ctx = StepContext(tokenizer=tokenizer)
    with step_context(ctx):
        if entry == "ray_trainer":
            data = ray_trainer.compute_advantage(to_data(batch), "synapo", config=algorithm)
        else:
            data = v1_utils.compute_advantage_for_multi_trajectories(
                to_data(batch), batch_keys=[], adv_estimator="synapo", config=algorithm
            )
    ref = core_reference(batch, tokenizer, algorithm)
    mask = batch["response_mask"].bool()
    assert torch.equal(data.batch["advantages"][mask], ref.advantages[mask])
    assert torch.equal(data.batch["returns"][mask], ref.returns[mask])
    assert ctx.result is not None and torch.equal(ctx.result.advantages, ref.advantages)
    if PRESETS[preset].get("scvl_enabled", True):
        assert ctx.result.scvl.pos_index.numel() > 0  # mixed groups give pairs


def test_padding_rows_get_zero(tokenizer):
    batch = rollout_batch(tokenizer)
    batch["response_mask"][-1] = 0  # verl's synthetic padding sample (its own uid group)
    batch["uid"][-1] = "pad0"
    with step_context(StepContext(tokenizer=tokenizer)):
        data = ray_trainer.compute_advantage(to_data(batch), "synapo", config=algorithm_config("synapo"))
    assert torch.equal(data.batch["advantages"][-1], torch.zeros(batch["responses"].shape[1]))
    assert torch.isfinite(data.batch["advantages"]).all()


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo"])
def test_other_estimators_bit_identical_with_and_without_plugin(tokenizer, estimator):
    batch = rollout_batch(tokenizer, seed=3)
    config = algorithm_config(None)
    config.adv_estimator = estimator

    def run():
        data = ray_trainer.compute_advantage(to_data(batch), estimator, gamma=0.99, lam=0.95, config=config)
        return data.batch["advantages"], data.batch["returns"]

    with_plugin = run()
    assert getattr(ray_trainer.compute_advantage, "__synapo_wraps__", None) is not None
    revert_synapo_to_verl()
    try:
        assert getattr(ray_trainer.compute_advantage, "__synapo_wraps__", None) is None
        without = run()
    finally:
        apply_synapo_to_verl()
    for a, b in zip(with_plugin, without, strict=True):
        assert torch.equal(a, b)


def test_estimator_without_patch_inputs_fails_clearly():
    fn = core_algos.get_adv_estimator_fn("synapo")
    assert fn is compute_synapo_advantage
    mask = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="without `values`"):
        fn(token_level_rewards=mask, response_mask=mask, config=algorithm_config("synapo"))


def test_hvm_without_delimiter_token_names_the_key():
    tok = make_tokenizer(with_delimiter=False)
    batch = rollout_batch(tok)
    with step_context(StepContext(tokenizer=tok)), pytest.raises(ValueError, match="algorithm.synapo.hvm_delimiters"):
        ray_trainer.compute_advantage(to_data(batch), "synapo", config=algorithm_config("synapo"))


def test_group_of_one_with_scvl_names_the_key(tokenizer):
    batch = rollout_batch(tokenizer)
    batch["uid"][0] = "lonely"
    with step_context(StepContext(tokenizer=tokenizer)), pytest.raises(ValueError, match="`uid`.*rollout.n"):
        ray_trainer.compute_advantage(to_data(batch), "synapo", config=algorithm_config("synapo"))
    # the same batch is fine without SCVL
    with step_context(StepContext(tokenizer=tokenizer)):
        ray_trainer.compute_advantage(to_data(batch), "synapo", config=algorithm_config("synapo-no-scvl"))


@pytest.mark.parametrize(
    "node,match",
    [({"preset": "vapo2"}, "algorithm.synapo.preset"), ({"ea_gae_betta": 0.1}, "algorithm.synapo.ea_gae_betta")],
)
def test_unknown_preset_or_parameter_names_the_key(tokenizer, node, match):
    batch = rollout_batch(tokenizer)
    node = dict(node)
    algorithm = algorithm_config(node.pop("preset", None), **node)
    with step_context(StepContext(tokenizer=tokenizer)), pytest.raises(ValueError, match=match):
        ray_trainer.compute_advantage(to_data(batch), "synapo", config=algorithm)
