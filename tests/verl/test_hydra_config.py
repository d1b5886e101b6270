"""verl's `ppo_trainer` Hydra config with `algorithm.adv_estimator=synapo` and each preset passes verl's own
validation, as `python -m verl.trainer.main_ppo` runs it; a bad `+algorithm.synapo.*` fails naming the key."""

from __future__ import annotations

import pytest

pytest.importorskip("verl")

from hydra import compose, initialize_config_dir  # noqa: E402
from verl.trainer.ppo import utils as ppo_utils  # noqa: E402
from verl.utils.config import validate_config  # noqa: E402

from synapo_ext.core import PRESETS, params_from_preset  # noqa: E402
from synapo_ext.verl.config import HF_CONFIG_KEY, VERL_KEYS, params_from_hf_config  # noqa: E402

from .helpers import make_tokenizer, tiny_model_dir, verl_config_dir  # noqa: E402

pytestmark = pytest.mark.verl

BASE = [
    "actor_rollout_ref.rollout.n=4",
    "data.train_batch_size=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "critic.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "trainer.n_gpus_per_node=1",
]


@pytest.fixture(scope="module", autouse=True)
def model_path(tmp_path_factory):
    global MODEL
    MODEL = tiny_model_dir(make_tokenizer(), str(tmp_path_factory.mktemp("tiny")))
    return MODEL


MODEL = ""


def compose_cfg(*overrides: str):
    paths = [f"actor_rollout_ref.model.path={MODEL}", f"critic.model.path={MODEL}"]
    with initialize_config_dir(config_dir=verl_config_dir(), version_base=None):
        return compose(config_name="ppo_trainer", overrides=[*BASE, *paths, *overrides])


def main_ppo_validate(config) -> None:
    """What verl.trainer.main_ppo.main does before starting Ray (the names resolve to the patched functions)."""
    validate_config(
        config=config,
        use_reference_policy=ppo_utils.need_reference_policy(config),
        use_critic=ppo_utils.need_critic(config),
    )


def test_verl_defaults_match_our_table():
    cfg = compose_cfg("algorithm.adv_estimator=gae")
    from omegaconf import OmegaConf

    for name, (key, default) in VERL_KEYS.items():
        assert OmegaConf.select(cfg, key) == default, name
    assert cfg.actor_rollout_ref.actor.loss_agg_mode == "token-mean"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_passes_verl_validation(preset):
    cfg = compose_cfg("algorithm.adv_estimator=synapo", f"+algorithm.synapo.preset={preset}")
    main_ppo_validate(cfg)
    params = params_from_preset(preset)
    assert cfg.critic.enable is True  # turned on by itself
    # verl moves the actor once critic_warmup <= global step (from 1): N critic-only steps are N + 1
    assert cfg.trainer.critic_warmup == params.value_warmup_steps + 1
    assert cfg.actor_rollout_ref.actor.clip_ratio_high == params.clip_ratio_high
    assert cfg.actor_rollout_ref.actor.loss_agg_mode == "token-mean"
    assert cfg.algorithm.lam == params.gae_lambda
    assert params_from_hf_config(type("C", (), {HF_CONFIG_KEY: cfg.critic.model.override_config[HF_CONFIG_KEY]})) == (
        params
    )
    main_ppo_validate(cfg)  # idempotent: the TaskRunner calls need_critic again on the prepared config


def test_parameter_override_reaches_the_critic():
    cfg = compose_cfg("algorithm.adv_estimator=synapo", "+algorithm.synapo.ea_gae_beta=-0.05")
    main_ppo_validate(cfg)
    params = params_from_hf_config(type("C", (), {HF_CONFIG_KEY: cfg.critic.model.override_config[HF_CONFIG_KEY]}))
    assert params.ea_gae_beta == -0.05


def test_gae_config_is_untouched():
    cfg = compose_cfg("algorithm.adv_estimator=gae")
    before = cfg.copy()
    main_ppo_validate(cfg)
    assert cfg == before


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["+algorithm.synapo.preset=vapo2"], r"algorithm\.synapo\.preset"),
        (["+algorithm.synapo.scvl_margn=1"], r"algorithm\.synapo\.scvl_margn"),
        (["+algorithm.synapo.ea_gae_alpha=0"], r"algorithm\.synapo\.ea_gae_alpha"),
        (["actor_rollout_ref.rollout.n=1"], r"actor_rollout_ref\.rollout\.n"),
        (["critic.enable=False"], r"critic\.enable"),
        (["actor_rollout_ref.actor.clip_ratio_high=0.3"], r"clip_ratio_high.*algorithm\.synapo\.clip_ratio_high"),
        (["trainer.use_v1=False"], r"trainer\.use_v1"),
    ],
)
def test_bad_config_names_the_key(overrides, match):
    cfg = compose_cfg("algorithm.adv_estimator=synapo", *overrides)
    with pytest.raises(ValueError, match=match):
        main_ppo_validate(cfg)


@pytest.mark.parametrize(
    "override,error",
    [
        ("+algorithm.synapo.hvm_enabled=no", TypeError),
        ("+algorithm.synapo.ea_gae_alpha=abc", TypeError),
        ("+algorithm.synapo.scvl_weight=nan", ValueError),
        ("+algorithm.synapo.hvm_global_weight=inf", ValueError),
        ("+algorithm.synapo.ea_gae_beta=-inf", ValueError),
        ("+algorithm.synapo.clip_ratio_low=1.5", ValueError),
        ("+algorithm.synapo.ea_gae_lambda_min=0.9", ValueError),  # with ea_gae_lambda_max=0.5
    ],
)
def test_bad_synapo_value_is_refused_at_config_time(override, error):
    """verl's config is checked before any rollout; the error names the `algorithm.synapo.<field>` key."""
    key = override.split("=")[0].lstrip("+")
    overrides = [override]
    if "lambda_min" in override:
        overrides.append("+algorithm.synapo.ea_gae_lambda_max=0.5")
    cfg = compose_cfg("algorithm.adv_estimator=synapo", *overrides)
    with pytest.raises(error, match=key.replace(".", r"\.")):
        main_ppo_validate(cfg)
