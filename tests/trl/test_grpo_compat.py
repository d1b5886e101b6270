"""A GRPOTrainer user's options on SynAPOTrainer: LoRA policies and critics, the config's positional argument, critics
for any causal LM, GRPO's reward normalisation refused by name, the off-policy mask kept per sequence."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402

from synapo_ext.trl import SynAPOConfig, SynAPOTrainer  # noqa: E402
from synapo_ext.trl.critic import build_critic, critic_values  # noqa: E402

from .tiny import first_char_reward, make_dataset, make_policy  # noqa: E402

pytestmark = pytest.mark.trl

needs_peft = pytest.mark.skipif(
    __import__("importlib").util.find_spec("peft") is None, reason="peft is not installed (the `trl` extra has it)"
)


def _lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kwargs)


def _backbone_equal(critic, reference: dict[str, torch.Tensor]) -> list[str]:
    """The critic's backbone tensors that differ from `reference` (the plain policy's state dict)."""
    state = critic.state_dict()
    return [k for k in state if not k.startswith("score.") and not torch.equal(state[k], reference[k])]


# --- SynAPOConfig's positional argument and the no-`args` trainer ----------------------------------------------


def test_positional_argument_is_output_dir():
    args = SynAPOConfig("out-dir", use_cpu=True, report_to=[])
    assert args.output_dir == "out-dir" and args.gamma == 1.0
    with pytest.raises(TypeError, match="one positional argument"):
        SynAPOConfig("out", 0.9)
    with pytest.raises(TypeError, match="output_dir"):
        SynAPOConfig("out", output_dir="other")


def test_trainer_without_args_names_its_output_dir_as_grpo(monkeypatch, tokenizer):
    # GRPOTrainer builds GRPOConfig(f"{model name}-GRPO"); SynAPOTrainer builds SynAPOConfig(f"{...}-SynAPO")
    # (use_cpu added: without a GPU both stop at transformers' bf16 check otherwise)
    from synapo_ext.trl import trainer as trainer_module

    made = []

    class CPUConfig(SynAPOConfig):
        def __init__(self, *args, **kwargs):
            made.append(args)
            super().__init__(*args, use_cpu=True, report_to=[], num_generations=4, **kwargs)

    monkeypatch.setattr(trainer_module, "SynAPOConfig", CPUConfig)
    policy = make_policy(tokenizer)
    policy.config._name_or_path = "org/tiny-policy"
    trainer = SynAPOTrainer(policy, [first_char_reward], train_dataset=make_dataset(8), processing_class=tokenizer)
    assert made == [("tiny-policy-SynAPO",)] and trainer.args.output_dir == "tiny-policy-SynAPO"


# --- GRPO's reward normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"scale_rewards": "group"}, "scale_rewards"),
        ({"scale_rewards": "batch"}, "scale_rewards"),
        ({"scale_rewards": True}, "scale_rewards"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
    ],
)
def test_grpo_reward_normalisation_is_refused_by_name(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        SynAPOConfig("out", use_cpu=True, report_to=[], **kwargs)


def test_reward_normalisation_defaults_are_the_ones_with_a_meaning():
    args = SynAPOConfig("out", use_cpu=True, report_to=[], scale_rewards=False)
    assert args.scale_rewards == "none" and args.multi_objective_aggregation == "sum_then_normalize"
    assert SynAPOConfig("out", use_cpu=True, report_to=[]).scale_rewards == "none"


# --- the off-policy sequence mask -----------------------------------------------------------------------------


def test_off_policy_mask_stays_per_sequence():
    # row 0: mean advantage > 0 (one negative token) -> kept whatever its KL; row 1: mean < 0 and high KL -> dropped;
    # row 2: mean < 0 and low KL -> kept. TRL's rule on (B, T) advantages would drop row 0's negative token alone.
    advantages = torch.tensor([[1.0, -0.5, 1.0], [-1.0, 0.2, -1.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logps = torch.full((3, 3), -1.0)
    sampling = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])  # KL 1, 1, 0
    keep = SynAPOTrainer.get_off_policy_mask(advantages, logps, sampling, mask, 0.5)
    assert keep.shape == (3, 1) and keep.squeeze(1).tolist() == [1.0, 0.0, 1.0]
    row_mean = ((advantages * mask).sum(1) / mask.sum(1)).unsqueeze(1)
    torch.testing.assert_close(keep, GRPOTrainer.get_off_policy_mask(row_mean, logps, sampling, mask, 0.5))


# --- a critic for any causal LM -------------------------------------------------------------------------------


def _tiny_granite(tokenizer):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GraniteForCausalLM(config)


def test_critic_for_a_model_type_with_no_token_classifier(tokenizer, tmp_path):
    # transformers has no GraniteForTokenClassification: a value head on AutoModel's backbone, seeded from the policy
    from transformers import AutoModelForTokenClassification

    policy = _tiny_granite(tokenizer)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForTokenClassification.from_config(policy.config)
    critic = build_critic(None, policy, num_heads=2)
    assert type(critic).__name__ == "GraniteValueModel"
    assert not _backbone_equal(critic, policy.state_dict())
    ids = torch.randint(3, len(tokenizer), (2, 7))
    values = critic_values(critic, ids, torch.ones_like(ids), 4)
    assert values.shape == (2, 4, 2) and values.abs().sum() == 0  # zero head
    critic.save_pretrained(tmp_path / "critic")  # a path to it loads as `critic_model`
    loaded = build_critic(str(tmp_path / "critic"), policy, num_heads=2)
    assert not _backbone_equal(loaded, critic.state_dict())


NO_TOKEN_CLASSIFIER = ("cohere2", "glm4_moe", "gemma3_text", "olmo2", "lfm2")  # falcon_h1, nemotron_h: slow on CPU


@pytest.mark.parametrize("model_type", NO_TOKEN_CLASSIFIER)
def test_critic_for_every_reported_model_type(model_type):
    # the model types of issue 23 (transformers has no *ForTokenClassification for them): a value-head critic seeded
    # from the policy's backbone, values (B, T, 2) from a zero head
    from transformers import AutoConfig, AutoModelForCausalLM

    small = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "head_dim": 8}
    small |= {"num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "eos_token_id": 1}
    config = AutoConfig.for_model(model_type, **small)
    if model_type == "glm4_moe":
        config.n_routed_experts, config.moe_intermediate_size, config.num_experts_per_tok = 4, 16, 2
        config.first_k_dense_replace, config.n_group, config.topk_group = 1, 1, 1
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config)
    critic = build_critic(None, policy, num_heads=2)
    assert type(critic).__name__.endswith("ValueModel")
    assert not _backbone_equal(critic, policy.state_dict())
    ids = torch.randint(2, 64, (2, 6))
    values = critic_values(critic, ids, torch.ones_like(ids), 3)
    assert values.shape == (2, 3, 2) and values.abs().sum() == 0


def test_critic_of_unknown_architecture_names_critic_model(tokenizer, monkeypatch):
    from transformers import AutoModel

    from synapo_ext.trl import critic_arch

    policy = _tiny_granite(tokenizer)
    monkeypatch.setattr(AutoModel, "_model_mapping", {})
    with pytest.raises(ValueError, match="critic_model"):
        critic_arch.critic_class(policy.config)


# --- LoRA / PEFT ----------------------------------------------------------------------------------------------


@needs_peft
@pytest.mark.parametrize("how", ["peft_config", "peft_model"])
def test_lora_policy_critic_starts_from_the_base_weights(make_trainer, tokenizer, how):
    from peft import get_peft_model

    policy = make_policy(tokenizer)
    base = {k: v.clone() for k, v in policy.state_dict().items()}
    model = get_peft_model(policy, _lora()) if how == "peft_model" else policy
    # seed 1: TRL seeds torch with args.seed before the critic is drawn; with the policy's seed (0) a random critic
    # would equal the policy by chance
    peft = {"peft_config": _lora()} if how == "peft_config" else None
    trainer = make_trainer(model=model, trainer_kwargs=peft, seed=1)
    assert type(trainer.model).__name__.startswith("Peft")
    assert not _backbone_equal(trainer.critic, base), "the critic's backbone is not the policy's base model"


@needs_peft
def test_lora_critic_trains_saves_and_resumes(make_trainer, tmp_path):
    trainer = make_trainer(
        "synapo", trainer_kwargs={"critic_peft_config": _lora()}, max_steps=1, save_strategy="steps", save_steps=1
    )
    assert type(trainer.critic).__name__.startswith("Peft")
    trainable = {n for n, p in trainer.critic.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable), sorted(trainable)
    before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    trainer.train()
    moved = [k for k, v in trainer.critic.state_dict().items() if not torch.equal(before[k], v)]
    assert moved and all("lora_B" in k or "score" in k for k in moved), moved  # lora_A moves once lora_B != 0
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "critic" / "adapter_model.safetensors").exists()
    assert not (checkpoint / "critic" / "model.safetensors").exists()

    resumed = make_trainer("synapo", trainer_kwargs={"critic_peft_config": _lora()}, max_steps=2)
    resumed.create_optimizer_and_scheduler(num_training_steps=2)  # what train() does before loading a checkpoint
    resumed._load_optimizer_and_scheduler(str(checkpoint))
    got = resumed.critic.state_dict()
    assert [k for k, v in trainer.critic.state_dict().items() if not torch.equal(got[k], v)] == []
    assert resumed._critic_updates == trainer._critic_updates

    whole = make_trainer("synapo")  # a whole critic refuses a PEFT checkpoint, naming the option
    whole.create_optimizer_and_scheduler(num_training_steps=2)
    with pytest.raises(ValueError, match="critic_peft_config"):
        whole._load_optimizer_and_scheduler(str(checkpoint))
    os.remove(checkpoint / "critic" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="incomplete"):
        resumed._load_optimizer_and_scheduler(str(checkpoint))


@needs_peft
def test_sharded_seeding_maps_a_lora_policy_to_its_base_weights(tokenizer):
    # FSDP2 / ZeRO-3 seed the critic parameter by parameter (critic_weights.load_critic_from_policy): a PEFT policy's
    # names (base_model.model.*, base_layer) map to the plain model's, adapters left out
    from peft import get_peft_model

    from synapo_ext.trl.critic_weights import _build as build_from_config
    from synapo_ext.trl.critic_weights import critic_config, load_critic_from_policy

    policy = make_policy(tokenizer)
    base = {k: v.clone() for k, v in policy.state_dict().items()}
    peft_policy = get_peft_model(policy, _lora())
    torch.manual_seed(1)
    critic = build_from_config(critic_config(policy.config, num_heads=1))
    fresh = load_critic_from_policy(critic, peft_policy)
    assert fresh == ["score.weight", "score.bias"], fresh
    assert not _backbone_equal(critic, base)
