"""The DeepSpeed pieces of `SynAPOTrainer`'s critic on 2 gloo CPU ranks, run by hand in a venv with DeepSpeed (no TRL
needed; not part of the test suite: the project's TRL venv has no DeepSpeed, and accelerate ignores a DeepSpeed plugin
on CPU, so the type is forced as in docs/trl_at_scale.md):

    torchrun --nproc_per_node 2 tests/trl/_ds_critic_check.py STAGE OUT    # STAGE 2 or 3

What the trainer does under DeepSpeed, in its order: the critic built by `init_critic_zero3` (ZeRO-3) or from the
config (ZeRO-2), `prepare_critic(policy=<the policy's engine>)` seeding it from the policy, an LR scheduler on
`PreparedCritic.base_optimizer`, `critic_step`s, a checkpoint (`save_critic_sharded`, the gathered export and
`save_critic_state(..., sharded_dir=)`), `check_critic_state`, and the reload (`load_critic_sharded`,
`load_critic_state(checkpoint, None, None, scheduler)`). Writes `<OUT>/rank<r>-<STAGE>.json`.
"""

from __future__ import annotations

import json
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
# synapo_ext.trl's __init__ imports TRL: load its critic, critic_weights and distributed modules without it
_package = types.ModuleType("synapo_ext.trl")
_package.__path__ = [os.path.join(ROOT, "synapo_ext", "trl")]
sys.modules["synapo_ext.trl"] = _package

import deepspeed  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DeepSpeedPlugin, DistributedType  # noqa: E402
from transformers import AutoModelForTokenClassification, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from synapo_ext.trl import critic as C  # noqa: E402
from synapo_ext.trl import critic_weights as W  # noqa: E402
from synapo_ext.trl import distributed as D  # noqa: E402


def make_policy() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=25,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


def forced_deepspeed_accelerator(stage: int) -> Accelerator:
    plugin = DeepSpeedPlugin(
        hf_ds_config={
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": "auto"},
            "gradient_clipping": "auto",
        }
    )
    accelerator = Accelerator(cpu=True, deepspeed_plugin=plugin)
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    plugin.set_mixed_precision("no")
    plugin.select(_from_accelerator_state=True)
    accelerator.state.deepspeed_plugins = plugin
    return accelerator


def main(stage: int, out: str) -> None:
    reference = C.build_critic(None, make_policy(), num_heads=2)  # one process's start (before ZeRO-3 is on)
    accelerator = forced_deepspeed_accelerator(stage)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = accelerator.process_index
    result = {"backend": D.critic_backend(accelerator), "zero_stage": D.zero_stage(accelerator)}

    config = accelerator.state.deepspeed_plugin.deepspeed_config | {
        "train_batch_size": 4,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": False},
    }
    policy = make_policy()
    engine, *_ = deepspeed.initialize(
        model=policy, optimizer=torch.optim.AdamW(policy.parameters(), lr=1e-2), config=config
    )
    if stage == 3:
        critic = W.init_critic_zero3(accelerator, policy.config, num_heads=2, micro_batch_size=2, max_grad_norm=1.0)
    else:
        critic = AutoModelForTokenClassification.from_config(W.critic_config(policy.config, num_heads=2))
    prepared = D.prepare_critic(
        accelerator, critic, learning_rate=1e-2, policy=engine, micro_batch_size=2, max_grad_norm=1.0, eps=1e-3
    )
    result["held_total"] = W.local_numel(prepared.unwrapped)
    start, want = W.full_critic_state_dict(prepared), reference.state_dict()
    if rank == 0:
        result["init_max_diff"] = max(float((start[k].float() - want[k].float()).abs().max()) for k in want)
    scheduler = torch.optim.lr_scheduler.LambdaLR(prepared.base_optimizer, lambda step: 0.5)
    generator = torch.Generator().manual_seed(rank)

    def steps(n: int) -> None:
        for _ in range(n):
            ids = torch.randint(3, 24, (2, 10), generator=generator)
            values = prepared.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
            D.critic_step(prepared, (values - 1).square().mean(), max_grad_norm=1.0)
            scheduler.step()

    steps(2)
    checkpoint = os.path.join(out, f"checkpoint-{stage}")
    W.save_critic_sharded(accelerator, prepared, checkpoint)
    state_dict = W.full_critic_state_dict(prepared)
    if rank == 0:
        counters = {"critic_updates": 2, "warmup_done": 0}
        C.save_critic_state(
            checkpoint, prepared.unwrapped, None, scheduler, counters, state_dict=state_dict, sharded_dir=W.SHARDED_DIR
        )
    accelerator.wait_for_everyone()
    C.check_critic_state(checkpoint)
    saved = {k: v.clone() for k, v in W.full_critic_state_dict(prepared).items()}
    steps(2)
    W.load_critic_sharded(accelerator, prepared, checkpoint)
    result["counters"] = C.load_critic_state(checkpoint, None, None, scheduler)
    after = W.full_critic_state_dict(prepared)
    if rank == 0:
        result["reload_equal"] = all(torch.equal(after[k], saved[k]) for k in saved)
    result["sharded_checkpoint"] = C.is_sharded_checkpoint(checkpoint)
    result["lr"] = prepared.optimizer.param_groups[0]["lr"]
    result["files"] = sorted(os.listdir(os.path.join(checkpoint, "critic")))
    with open(os.path.join(out, f"rank{rank}-{stage}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
