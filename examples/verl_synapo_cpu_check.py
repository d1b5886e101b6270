"""What of examples/verl_synapo.sh runs on a CPU-only machine (no GPU, no downloads), in about half a minute:

1. the plugin is installed (`verl.plugins` entry point) and registered `synapo` in verl;
2. verl's `ppo_trainer` config with `algorithm.adv_estimator=synapo` and the preset passes verl's own validation,
   with the VAPO pieces written onto verl's keys;
3. verl's own `compute_advantage` runs SynAPO on a synthetic rollout batch (EA-GAE, HVM, SCVL).

Not here (needs a GPU): vLLM rollouts, flash-attention value models, the Ray training loop itself.
tests/verl runs the two-head critic through verl's FSDP2 engine on CPU with test-only shims.

    python examples/verl_synapo_cpu_check.py [preset]
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile

import torch
import transformers
import verl
from hydra import compose, initialize_config_dir
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from verl import DataProto
from verl.trainer.ppo import core_algos, ray_trainer
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

from synapo_ext.verl.estimator import StepContext, step_context


def tiny_model(path: str) -> transformers.PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "\n\n": 2, **{c: i + 3 for i, c in enumerate("0123456789+-=. abcdefghij")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex("\n\n|[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    cfg = transformers.Qwen2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def main(preset: str = "synapo") -> None:
    eps = [ep.value for ep in importlib.metadata.entry_points(group="verl.plugins") if ep.name == "synapo"]
    print(f"1. entry point: {eps}; registered: {core_algos.get_adv_estimator_fn('synapo').__module__}")

    path = tempfile.mkdtemp(prefix="synapo_cpu_check_")
    tokenizer = tiny_model(path)
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    overrides = [
        "algorithm.adv_estimator=synapo",
        f"+algorithm.synapo.preset={preset}",
        f"actor_rollout_ref.model.path={path}",
        f"critic.model.path={path}",
        "actor_rollout_ref.rollout.n=4",
        "data.train_batch_size=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "critic.ppo_micro_batch_size_per_gpu=2",
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    actor = config.actor_rollout_ref.actor
    print(
        f"2. verl validation passed: critic.enable={config.critic.enable} "
        f"critic_warmup={config.trainer.critic_warmup} clip_ratio=({actor.clip_ratio_low}, {actor.clip_ratio_high}) "
        f"loss_agg_mode={actor.loss_agg_mode} lam={config.algorithm.lam}"
    )

    B, T, n = 8, 32, 4
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(3, len(tokenizer), (B, T), generator=g)
    responses[:, ::7] = tokenizer.convert_tokens_to_ids("\n\n")
    responses[:, :5] = responses[0, :5]  # a shared prefix inside each group
    mask = torch.ones(B, T)
    scores = torch.zeros(B, T)
    scores[:, -1] = torch.tensor([1.0, 0.0] * (B // 2))
    data = DataProto.from_dict(
        tensors={
            "responses": responses, "response_mask": mask, "token_level_scores": scores,
            "token_level_rewards": scores, "values": torch.rand(B, T, generator=g),
            "values_global": torch.rand(B, T, generator=g), "entropys": torch.rand(B, T, generator=g),
        },
        non_tensors={"uid": [f"prompt{b // n}" for b in range(B)]},
    )  # fmt: skip
    ctx = StepContext(tokenizer=tokenizer)
    with step_context(ctx):
        data = ray_trainer.compute_advantage(data, "synapo", config=config.algorithm)
    adv = data.batch["advantages"]
    print(f"3. verl compute_advantage(synapo): advantages mean {adv.mean():+.3f} std {adv.std():.3f}")
    for key, value in sorted(ctx.result.metrics.items()):
        print(f"   {key} = {value:.4g}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
