"""SynAPOParams and the presets: SPEC's defaults, one table, errors naming the field."""

import dataclasses

import pytest

from synapo_ext.core import PRESETS, SynAPOParams, params_from_preset


def test_defaults_are_spec_defaults():
    p = SynAPOParams()
    # SPEC: gamma 1.0, critic_lambda 1.0, alpha 0.05, beta 0.05, lambda clip [0, 1], global lambda 0.95,
    # global weight 1.0, SCVL threshold 0.5 / margin 0.5 / weight 0.1 / 16 pairs, clip 0.2 / 0.28, mu 0.1
    assert (p.gamma, p.critic_lambda, p.ea_gae_alpha, p.ea_gae_beta) == (1.0, 1.0, 0.05, 0.05)
    assert (p.ea_gae_lambda_min, p.ea_gae_lambda_max) == (0.0, 1.0)
    assert (p.hvm_global_lambda, p.hvm_global_weight, p.hvm_delimiters) == (0.95, 1.0, ["\n\n"])
    assert (p.scvl_threshold, p.scvl_margin, p.scvl_weight, p.scvl_max_pairs) == (0.5, 0.5, 0.1, 16)
    assert (p.clip_ratio_low, p.clip_ratio_high, p.positive_lm_coef) == (0.2, 0.28, 0.1)
    assert p.hvm_enabled and p.scvl_enabled and p.ea_gae_enabled and p.length_adaptive_lambda


def test_presets_switch_exactly_their_parts():
    parts = {
        name: (p.hvm_enabled, p.scvl_enabled, p.ea_gae_enabled, p.length_adaptive_lambda)
        for name, p in ((n, params_from_preset(n)) for n in PRESETS)
    }
    assert parts == {
        "ppo": (False, False, False, False),
        "vapo": (False, False, False, True),
        "synapo": (True, True, True, True),
        "synapo-no-hvm": (False, True, True, True),
        "synapo-no-scvl": (True, False, True, True),
        "synapo-no-eagae": (True, True, False, True),
    }
    ppo = params_from_preset("ppo")
    assert (ppo.clip_ratio_high, ppo.positive_lm_coef, ppo.value_warmup_steps) == (0.2, 0.0, 0)
    vapo = params_from_preset("vapo")
    assert (vapo.clip_ratio_high, vapo.positive_lm_coef, vapo.critic_lambda) == (0.28, 0.1, 1.0)


def test_every_preset_key_is_a_field():
    names = {f.name for f in dataclasses.fields(SynAPOParams)}
    for preset, overrides in PRESETS.items():
        assert set(overrides) <= names, preset


def test_every_field_has_help():
    for f in dataclasses.fields(SynAPOParams):
        assert f.metadata.get("help"), f.name
        assert f.name in SynAPOParams.__doc__ or f.name.startswith("ea_gae_lambda_"), f.name


def test_overrides_apply_on_top_of_the_preset():
    p = params_from_preset("vapo", ea_gae_alpha=0.1, gamma=0.99)
    assert (p.ea_gae_alpha, p.gamma, p.hvm_enabled) == (0.1, 0.99, False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 1.5}, "gamma"),
        ({"gae_lambda": -0.1}, "gae_lambda"),
        ({"ea_gae_alpha": 0.0}, "ea_gae_alpha"),
        ({"ea_gae_lambda_min": 0.8, "ea_gae_lambda_max": 0.5}, "ea_gae_lambda_min"),
        ({"critic_lambda": 0.9}, "critic_lambda"),  # HVM on needs Monte-Carlo targets
        ({"hvm_delimiters": []}, "hvm_delimiters"),
        ({"hvm_min_len": 0}, "hvm_min_len"),
        ({"hvm_max_len": 0}, "hvm_max_len"),
        ({"scvl_max_pairs": 0}, "scvl_max_pairs"),
        ({"value_warmup_steps": -1}, "value_warmup_steps"),
        ({"scvl_weight": -1.0}, "scvl_weight"),
        ({"length_adaptive_lambda": False}, "length_adaptive_lambda"),  # EA-GAE on needs it
    ],
)
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynAPOParams(**kwargs)


def test_critic_lambda_is_free_without_hvm():
    assert params_from_preset("synapo-no-hvm", critic_lambda=0.9).critic_lambda == 0.9


def test_unknown_preset_and_parameter():
    with pytest.raises(ValueError, match="preset"):
        params_from_preset("dapo")
    with pytest.raises(ValueError, match="scvl_marign"):
        params_from_preset("synapo", scvl_marign=0.3)
