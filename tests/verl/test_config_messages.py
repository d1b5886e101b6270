"""verl's SynAPO configuration errors speak the user's terms: the value they wrote, the closest valid names."""

import pytest

pytest.importorskip("omegaconf")

from omegaconf import OmegaConf  # noqa: E402

from synapo_ext.verl.config import params_from_algorithm, prepare_config  # noqa: E402


def _config(synapo: dict, **trainer) -> OmegaConf:
    return OmegaConf.create(
        {
            "algorithm": {"adv_estimator": "synapo", "synapo": synapo},
            "trainer": trainer,
            "critic": {"model": {"override_config": {}}},
            "actor_rollout_ref": {"rollout": {"n": 4}},
        }
    )


def test_a_conflict_shows_the_value_the_user_wrote():
    with pytest.raises(ValueError) as err:
        prepare_config(_config({"value_warmup_steps": 10}, critic_warmup=5))
    message = str(err.value)
    assert "`algorithm.synapo.value_warmup_steps=10`" in message and "value_warmup_steps=11" not in message
    assert "`trainer.critic_warmup=5`" in message and "sets `trainer.critic_warmup=11`" in message


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("scvl_wieght", "scvl_weight"), ("prest", "preset"), ("value_warmup_step", "value_warmup_steps")],
)
def test_a_misspelt_key_gets_the_closest_names(typo, suggestion):
    with pytest.raises(ValueError, match=f"did you mean `algorithm.synapo.{suggestion}`"):
        params_from_algorithm(OmegaConf.create({"synapo": {typo: 1}}))


def test_a_misspelt_preset_gets_the_closest_name():
    with pytest.raises(ValueError, match="did you mean `vapo`"):
        params_from_algorithm(OmegaConf.create({"synapo": {"preset": "vapoo"}}))
