"""The research write-up's spelling of the TRL usage, and keywords it does not know (each with a hint)."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from synapo_ext.trl import SynAPOConfig, SynAPOTrainer  # noqa: E402

from .tiny import first_char_reward, make_dataset, make_policy, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.trl

# The write-up's values; the tests add only use_cpu=True, sizes and (where it trains) a reward function.
WRITEUP = {
    "learning_rate": 1e-5,
    "ppo_epochs": 4,
    "hvm_enabled": True,
    "scvl_enabled": True,
    "ea_gae_enabled": True,
    "scvl_margin": 0.5,
    "scvl_weight": 0.1,
    "ea_gae_alpha": 0.1,
    "ea_gae_beta": 0.05,
}
SIZES = {
    "use_cpu": True,
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 8,
    "max_steps": 4,
    "value_warmup_steps": 1,
}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the write-up sets no output_dir: TRL writes under the working directory
    return tmp_path


def test_the_writeup_example_trains_and_keeps_the_values(in_tmp):
    model, tokenizer = make_policy(make_tokenizer()), make_tokenizer()
    config = SynAPOConfig(
        learning_rate=1e-5,
        ppo_epochs=4,
        hvm_enabled=True,
        scvl_enabled=True,
        ea_gae_enabled=True,
        scvl_margin=0.5,
        scvl_weight=0.1,
        ea_gae_alpha=0.1,
        ea_gae_beta=0.05,
        **SIZES,
    )
    trainer = SynAPOTrainer(
        model=model,
        tokenizer=tokenizer,
        config=config,
        train_dataset=make_dataset(),
        eval_dataset=make_dataset(8, seed=1),
        reward_funcs=[first_char_reward],  # the write-up's example has none; TRL needs a reward source
    )
    assert trainer.args is config and trainer.processing_class is tokenizer  # neither dropped
    for name, value in {**WRITEUP, **SIZES}.items():
        assert getattr(trainer.args, name) == value, name
    assert trainer.args.num_iterations == 4 and trainer.num_iterations == 4  # ppo_epochs is TRL's num_iterations
    params = trainer.synapo
    assert (params.ea_gae_alpha, params.ea_gae_beta, params.scvl_margin, params.scvl_weight) == (0.1, 0.05, 0.5, 0.1)
    trainer.train()
    assert trainer.state.global_step == 4
    assert trainer._critic_updates == 2  # one warm-up batch + one generation batch reused for the 4 PPO epochs


def test_the_writeup_example_without_a_reward_says_what_is_missing(in_tmp):
    config = SynAPOConfig(**WRITEUP, **SIZES)
    with pytest.raises(ValueError, match="reward_funcs"):
        SynAPOTrainer(model=make_policy(make_tokenizer()), tokenizer=make_tokenizer(), config=config,
                      train_dataset=make_dataset(), eval_dataset=make_dataset(8))  # fmt: skip


def test_config_and_args_together_must_agree(in_tmp):
    one, other = SynAPOConfig(**SIZES), SynAPOConfig(**SIZES)
    with pytest.raises(TypeError, match="`args` or `config`"):
        SynAPOTrainer(model=make_policy(make_tokenizer()), args=one, config=other,
                      processing_class=make_tokenizer(), reward_funcs=[first_char_reward])  # fmt: skip
    tok, tok2 = make_tokenizer(), make_tokenizer()
    with pytest.raises(TypeError, match="`processing_class` or `tokenizer`"):
        SynAPOTrainer(model=make_policy(tok), args=one, processing_class=tok, tokenizer=tok2,
                      reward_funcs=[first_char_reward])  # fmt: skip


@pytest.mark.parametrize(
    ("keyword", "hint"),
    [
        ("ref_model", "beta"),
        ("value_model", "critic_model"),
        ("reward_model", "reward_funcs"),
        ("ppo_epochs", r"SynAPOConfig\(ppo_epochs=...\)"),
        ("train_datset", "train_dataset"),
        ("zzz", "its arguments are"),
    ],
)
def test_unknown_trainer_keyword_says_what_to_write(keyword, hint):
    with pytest.raises(TypeError, match=hint):
        SynAPOTrainer(model=None, **{keyword: 1})  # refused before the model is looked at


@pytest.mark.parametrize(
    ("keyword", "hint"),
    [
        ("vf_coef", "critic_learning_rate"),
        ("num_ppo_epochs", "ppo_epochs"),
        ("cliprange", "epsilon"),
        ("tokenizer", "SynAPOTrainer"),
        ("scvl_margn", "did you mean `scvl_margin`"),
        ("zzz", "--help"),
    ],
)
def test_unknown_config_keyword_says_what_to_write(keyword, hint):
    with pytest.raises(TypeError, match=hint):
        SynAPOConfig(use_cpu=True, **{keyword: 1})


def test_ppo_epochs_and_num_iterations_must_agree():
    assert SynAPOConfig(use_cpu=True, ppo_epochs=3, num_iterations=3).num_iterations == 3
    with pytest.raises(ValueError, match="ppo_epochs"):
        SynAPOConfig(use_cpu=True, ppo_epochs=3, num_iterations=2)
    with pytest.raises(ValueError, match="ppo_epochs"):
        SynAPOConfig(use_cpu=True, ppo_epochs=0)
