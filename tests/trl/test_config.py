"""SynAPOConfig: presets, overrides, the core's fields and defaults, the command line, bad values."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("trl")

from trl import TrlParser  # noqa: E402

from synapo_ext.core import PRESETS, SynAPOParams, params_from_preset  # noqa: E402
from synapo_ext.trl import SynAPOConfig  # noqa: E402
from synapo_ext.trl.config import PRESET_FIELDS  # noqa: E402

pytestmark = pytest.mark.trl


def _config(**kwargs):
    return SynAPOConfig(output_dir="unused", use_cpu=True, report_to=[], **kwargs)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_resolves_to_the_core_preset(preset):
    args = _config(preset=preset)
    assert args.synapo_params() == params_from_preset(preset)
    assert args.epsilon_high == params_from_preset(preset).clip_ratio_high  # clip-higher through TRL's field
    assert args.loss_type == "dapo"  # token-level loss (VAPO)


def test_explicit_value_wins_over_the_preset():
    args = _config(preset="ppo", hvm_enabled=True, critic_lambda=1.0, epsilon_high=0.3, value_warmup_steps=3)
    params = args.synapo_params()
    assert params.hvm_enabled and params.critic_lambda == 1.0 and params.value_warmup_steps == 3
    assert params.clip_ratio_high == 0.3 and not params.scvl_enabled


def test_every_core_field_is_a_config_field_with_the_same_default():
    config_fields = {f.name: f for f in dataclasses.fields(SynAPOConfig)}
    for f in dataclasses.fields(SynAPOParams):
        assert f.name in config_fields, f.name
        if f.name in PRESET_FIELDS:
            assert config_fields[f.name].default is None  # "the preset's value"
        elif f.name not in ("clip_ratio_low", "clip_ratio_high"):  # computed from epsilon / epsilon_high
            assert config_fields[f.name].default == f.default, f.name
            assert config_fields[f.name].metadata.get("help"), f.name


def test_command_line(capsys):
    parser = TrlParser((SynAPOConfig,))
    (args,) = parser.parse_args_and_config(
        [
            "--output_dir",
            "x",
            "--use_cpu",
            "true",
            "--preset",
            "vapo",
            "--scvl_enabled",
            "true",
            "--scvl_margin",
            "0.3",
        ]
        + ["--hvm_delimiters", "##", "Step", "--critic_learning_rate", "3e-4", "--cliprange_value", "0.2"]
    )
    assert args.preset == "vapo" and args.scvl_enabled and args.scvl_margin == 0.3
    assert args.hvm_delimiters == ["##", "Step"] and args.critic_learning_rate == 3e-4
    assert args.synapo_params().value_warmup_steps == 50
    with pytest.raises(SystemExit):
        parser.parse_args_and_config(["--help"])
    out = capsys.readouterr().out
    for option in ("--preset", "--ea_gae_beta", "--hvm_delimiters", "--scvl_margin", "--value_warmup_steps"):
        assert option in out


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"preset": "nope"}, "preset"),
        ({"num_generations": 1, "generation_batch_size": 8}, "num_generations"),
        ({"critic_epochs": 0}, "critic_epochs"),
        ({"critic_learning_rate": 0.0}, "critic_learning_rate"),
        ({"ea_gae_alpha": 0.0}, "ea_gae_alpha"),
        ({"preset": "synapo", "critic_lambda": 0.9}, "critic_lambda"),
        # the critic's settings, refused at construction (not after the first rollout)
        ({"critic_lr_scheduler_type": "bogus"}, "critic_lr_scheduler_type"),
        ({"critic_lr_scheduler_type": "reduce_lr_on_plateau"}, "critic_lr_scheduler_type"),  # needs a metric
        ({"critic_max_grad_norm": -1.0}, "critic_max_grad_norm"),
        ({"critic_max_grad_norm": float("nan")}, "critic_max_grad_norm"),
        ({"critic_learning_rate": float("inf")}, "critic_learning_rate"),
        ({"critic_learning_rate": float("nan")}, "critic_learning_rate"),
        ({"critic_weight_decay": -0.1}, "critic_weight_decay"),
        ({"cliprange_value": float("inf")}, "cliprange_value"),
        ({"cliprange_value": 0.0}, "cliprange_value"),
        ({"critic_mini_batch_size": 0}, "critic_mini_batch_size"),
        ({"value_warmup_target_ev": 2.0}, "value_warmup_target_ev"),
        ({"value_warmup_patience": 0}, "value_warmup_patience"),
    ],
)
def test_bad_values_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        _config(**kwargs)


def test_critic_settings_that_are_legal():
    args = _config(critic_max_grad_norm=None, cliprange_value=None, critic_lr_scheduler_type="cosine")
    assert args.critic_max_grad_norm is None and args.critic_lr_scheduler_type == "cosine"
    assert _config(critic_max_grad_norm=0.0).critic_max_grad_norm == 0.0  # 0: clipping off


@pytest.mark.parametrize(
    ("value", "error"),
    [(float("nan"), ValueError), (-1e-5, ValueError), (float("inf"), ValueError), ("1e-5", TypeError)],
)
def test_a_bad_learning_rate_is_refused_at_construction(value, error):
    # used to pass, and AdamW refused it at the first step (NaN: trained with a NaN step size)
    with pytest.raises(error, match="`learning_rate`"):
        _config(learning_rate=value)


def test_a_learning_rate_string_names_the_yaml_pitfall():
    with pytest.raises(TypeError, match="YAML"):
        _config(learning_rate="1e-5")


@pytest.mark.parametrize(("name", "value"), [("adam_beta2", 1.0), ("adam_epsilon", -1.0), ("weight_decay", "0.1")])
def test_other_optimizer_settings_the_critic_shares_are_checked(name, value):
    with pytest.raises((TypeError, ValueError), match=f"`{name}`"):
        _config(**{name: value})


def test_assigning_the_preset_after_construction_is_refused():
    args = _config(preset="synapo")
    with pytest.raises(AttributeError, match="preset.*SynAPOConfig\\(preset='vapo'"):
        args.preset = "vapo"  # used to be silently ignored: hvm_enabled etc. stayed the synapo preset's
    assert args.preset == "synapo" and args.synapo_params() == params_from_preset("synapo")
    with pytest.raises(AttributeError, match="num_iterations"):
        args.ppo_epochs = 3


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("learning_rate", float("nan"), ValueError),
        ("critic_learning_rate", -1.0, ValueError),
        ("scvl_margin", float("nan"), ValueError),
        ("hvm_enabled", "no", TypeError),
    ],
)
def test_assignments_after_construction_are_checked(name, value, error):
    args = _config()
    with pytest.raises(error, match=f"`{name}`"):
        setattr(args, name, value)


def test_legal_assignments_after_construction_still_work():
    import copy
    import pickle

    args = _config()
    args.learning_rate, args.scvl_margin, args.num_iterations = 3e-4, 0.2, 2
    assert (args.learning_rate, args.synapo_params().scvl_margin) == (3e-4, 0.2)
    assert pickle.loads(pickle.dumps(args)).learning_rate == 3e-4 and copy.deepcopy(args).scvl_margin == 0.2


def test_the_parameter_doc_names_trl_fields_that_exist():
    """docs/parameters.md's TRL column (synapo_ext.params_doc) against SynAPOConfig itself."""
    import dataclasses

    from synapo_ext import params_doc
    from synapo_ext.core import SynAPOParams
    from synapo_ext.trl import SynAPOConfig
    from synapo_ext.trl.config import PRESET_FIELDS

    config_fields = {f.name for f in dataclasses.fields(SynAPOConfig)}
    for f in dataclasses.fields(SynAPOParams):
        assert f.name in config_fields, f.name
    assert set(params_doc.TRL_PRESET_FIELDS) == set(PRESET_FIELDS)
    config = SynAPOConfig(output_dir="out", use_cpu=True, preset="vapo", epsilon=0.15, epsilon_high=0.3)
    assert (config.clip_ratio_low, config.clip_ratio_high) == (0.15, 0.3)  # what TRL_NOTES says
