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


@pytest.mark.parametrize(
    "name",
    [
        "gamma",
        "gae_lambda",
        "ea_gae_alpha",
        "ea_gae_beta",
        "ea_gae_lambda_max",
        "hvm_global_lambda",
        "hvm_global_weight",
        "scvl_threshold",
        "scvl_margin",
        "scvl_weight",
        "clip_ratio_low",
        "clip_ratio_high",
        "positive_lm_coef",
        "positive_lm_threshold",
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_name_the_field(name, bad):
    with pytest.raises(ValueError, match=f"`{name}` must be finite"):
        SynAPOParams(**{name: bad})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hvm_enabled": "no"}, "hvm_enabled"),  # a non-empty string is truthy: never read it as a boolean
        ({"scvl_enabled": 0}, "scvl_enabled"),
        ({"whiten_advantages": None}, "whiten_advantages"),
        ({"ea_gae_alpha": "abc"}, "ea_gae_alpha"),
        ({"gamma": "0.99"}, "gamma"),
        ({"scvl_margin": True}, "scvl_margin"),  # a boolean is not a number here
        ({"scvl_max_pairs": 2.0}, "scvl_max_pairs"),
        ({"hvm_min_len": "3"}, "hvm_min_len"),
        ({"value_warmup_steps": 1.5}, "value_warmup_steps"),
        ({"hvm_delimiters": [1]}, "hvm_delimiters"),
        ({"hvm_delimiters": None}, "hvm_delimiters"),
    ],
)
def test_wrong_types_name_the_field(kwargs, match):
    with pytest.raises(TypeError, match=f"`{match}`"):
        SynAPOParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hvm_global_weight": -0.5}, "hvm_global_weight"),
        ({"scvl_margin": -0.1}, "scvl_margin"),
        ({"positive_lm_coef": -0.1}, "positive_lm_coef"),
        ({"clip_ratio_high": -0.1}, "clip_ratio_high"),
        ({"clip_ratio_low": 1.0}, "clip_ratio_low"),
        ({"ea_gae_alpha": -1.0}, "ea_gae_alpha"),
        ({"ea_gae_lambda_max": 1.5}, "ea_gae_lambda_max"),
        ({"hvm_global_lambda": 2.0}, "hvm_global_lambda"),
        ({"hvm_fallback_len": 0}, "hvm_fallback_len"),
    ],
)
def test_out_of_range_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=f"`{match}`"):
        SynAPOParams(**kwargs)


def test_legal_values_of_other_types_pass():
    # ints for floats, None for optional ints, a tuple of delimiters, a negative beta (the prose's sign)
    p = SynAPOParams(gamma=1, ea_gae_beta=-0.5, hvm_max_len=None, hvm_fallback_len=None, hvm_delimiters=("\n\n", "."))
    assert p.hvm_delimiters == ["\n\n", "."]
    assert SynAPOParams(hvm_delimiters="\n").hvm_delimiters == ["\n"]
    for name in PRESETS:
        assert params_from_preset(name).to_dict() == dataclasses.asdict(params_from_preset(name))


def test_validation_runs_again_on_replace():
    with pytest.raises(ValueError, match="scvl_weight"):
        dataclasses.replace(SynAPOParams(), scvl_weight=float("nan"))


def test_positive_lm_threshold_is_its_own_field():
    p = SynAPOParams(scvl_threshold=0.9)
    assert (p.positive_lm_threshold, p.scvl_threshold) == (0.5, 0.9)


def test_one_rule_per_field_whose_kind_is_the_annotation():
    from synapo_ext.core._hparams import RULES

    annotations = SynAPOParams.__annotations__
    assert set(RULES) == {f.name for f in dataclasses.fields(SynAPOParams)}
    for name, rule in RULES.items():
        assert rule.annotation == annotations[name], name
