"""Run by test_trl_scale.py: a whole `SynAPOTrainer` run (preset `synapo`) in one process, or on 2 gloo ranks under
`torchrun` with DDP or forced FSDP2, on the same rollouts.

`python _dist_trainer_run.py MODES OUT`: MODES is "single" (one process, the whole batch), or "ddp", "fsdp2" or
"ddp,fsdp2" under torchrun (each rank half of the batch; the modes one after the other, each in `<OUT>/<mode>/`).
Each run takes STEPS steps (a value warm-up batch first) with a checkpoint at step SAVE_AT and saves the model; a
second trainer then resumes from that checkpoint and takes the last steps again. Writes `<OUT>/<mode>/rank<r>.json`
(backend, the critic's elements this rank holds, the resumed run's agreement) and, on rank 0,
`<OUT>/<mode>/states.safetensors` (the critic's and policy's full final states, compared across world sizes).

The rollouts come from a `rollout_func` (TRL's hook for custom generation): fixed completions of 7 tokens per prompt,
two starting with a digit (reward 1) and two not in each group of 4, so every rank holds the same number of tokens,
SCVL pairs and HVM segments as the other and the 1-process run sees exactly the union of the ranks' rows. Everything
else (the policy's loss and step, the critic's values, the SynAPO stage, the critic's update, checkpoints) is the
trainer's real code.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from synapo_ext.trl import SynAPOConfig, SynAPOTrainer  # noqa: E402
from synapo_ext.trl.critic_weights import local_numel  # noqa: E402
from tests.trl.tiny import first_char_reward, make_dataset, make_policy, make_tokenizer  # noqa: E402

STEPS, SAVE_AT, GROUP, ROWS = 3, 2, 4, 8  # ROWS: the global rollout batch (2 groups)
TEMPLATES = ("{s}.{s}\n\n{s}+{s}", "{s}+1\n\n{s}.a", "a{s}.\n\n{s}{s}b", "b.{s}\n\nc{s}d")  # 7 tokens each


def rollout(prompts: list[str], trainer) -> dict:
    """Fixed completions: row i of a group gets TEMPLATES[i % GROUP] filled with the prompt's sum (one digit)."""
    tok = trainer.processing_class
    completions = []
    for i, prompt in enumerate(prompts):
        a, b = prompt.rstrip("=").split("+")
        completions.append(TEMPLATES[i % GROUP].format(s=int(a) + int(b)))
    return {
        "prompt_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in prompts],
        "completion_ids": [tok(c, add_special_tokens=False)["input_ids"] for c in completions],
        "logprobs": None,
    }


class ForcedFSDP2Trainer(SynAPOTrainer):
    """accelerate never selects FSDP on CPU (its state turns GPU-like types only into FSDP; docs/trl_at_scale.md);
    `fully_shard` itself runs on CPU + gloo, so force the type in both shared states right after the trainer makes
    its accelerator, before anything reads it."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.accelerator.state.distributed_type = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True


def untied_policy(tok):
    """The tiny policy with its LM head untied from the embedding (accelerate's FSDP2 prepare re-materialises the
    parameters by name, which splits tied weights on CPU; untied here, every run trains the same parameters)."""
    policy = make_policy(tok, seed=0)
    policy.config.tie_word_embeddings = False
    policy.lm_head.weight = nn.Parameter(policy.model.embed_tokens.weight.detach().clone())
    return policy


def trainer_args(out: str, world: int, **extra) -> SynAPOConfig:
    """The run's settings (shared with _ds_trainer_run.py); `extra`: more `SynAPOConfig` fields."""
    return SynAPOConfig(
        output_dir=os.path.join(out, "run"),
        preset="synapo",
        use_cpu=True,
        report_to=[],
        save_strategy="steps",
        save_steps=SAVE_AT,
        disable_tqdm=True,
        num_generations=GROUP,
        per_device_train_batch_size=ROWS // world,
        max_completion_length=8,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-2,
        critic_learning_rate=1e-2,
        # Adam's eps well above float noise: with 1e-8 an element whose gradient cancels to ~1e-10 moves by +-lr on
        # a sign flip of its rounding, so a reduction over 2 ranks vs 1 process shows as lr-sized differences
        adam_epsilon=1e-3,
        bf16=False,  # TRL's default is True: CPU autocast in bf16, whose rounding depends on the batch's split
        value_warmup_steps=1,
        whiten_advantages=True,  # over every process's tokens: SynAPOTrainer sums the statistics across processes
        seed=0,
        **extra,
    )


def build_trainer(cls: type[SynAPOTrainer], args: SynAPOConfig) -> SynAPOTrainer:
    """`cls` on the run's policy, reward, data and fixed rollouts."""
    tok = make_tokenizer()
    return cls(
        model=untied_policy(tok),
        reward_funcs=[first_char_reward],
        args=args,
        train_dataset=make_dataset(),
        processing_class=tok,
        rollout_func=rollout,
    )


def make_trainer(mode: str, out: str, world: int, resume: bool = False) -> SynAPOTrainer:
    return build_trainer(ForcedFSDP2Trainer if mode == "fsdp2" else SynAPOTrainer, trainer_args(out, world))


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on every rank (gathered from FSDP2 shards), float32 CPU."""
    if any(hasattr(p, "to_local") for p in model.parameters()):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        state = getattr(model, "module", model).state_dict()
    return {name: value.detach().float().cpu().clone() for name, value in state.items()}


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, value in sorted(state.items()):
        h.update(name.encode())
        h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()


def run(mode: str, out: str) -> None:
    """One mode's run, resume and files in `out` (see the module's docstring)."""
    os.makedirs(out, exist_ok=True)
    world = 1 if mode == "single" else int(os.environ["WORLD_SIZE"])
    trainer = make_trainer(mode, out, world)
    trainer.train()
    rank = trainer.accelerator.process_index
    held, total = local_numel(trainer._critic.unwrapped)
    critic, policy = full_state(trainer._critic.model), full_state(trainer.model)
    trainer.save_model(os.path.join(out, "final"))

    resumed = make_trainer(mode, out, world)
    resumed.train(resume_from_checkpoint=os.path.join(out, "run", f"checkpoint-{SAVE_AT}"))
    critic_again, policy_again = full_state(resumed._critic.model), full_state(resumed.model)
    result = {
        "backend": trainer._critic.backend,
        "held": held,
        "total": total,
        "critic_updates": trainer._critic_updates,
        "warmup_done": trainer._warmup_done,
        "scvl_pairs": [e["synapo/scvl/pairs"] for e in trainer.state.log_history if "synapo/scvl/pairs" in e],
        "resumed_critic_equal": digest(critic_again) == digest(critic),
        "resumed_policy_equal": digest(policy_again) == digest(policy),
        "checkpoint": sorted(os.listdir(os.path.join(out, "run", f"checkpoint-{SAVE_AT}"))),
        "export": sorted(os.listdir(os.path.join(out, "final", "critic"))),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if rank == 0:
        tensors = {f"critic.{k}": v for k, v in critic.items()} | {f"policy.{k}": v for k, v in policy.items()}
        save_file(tensors, os.path.join(out, "states.safetensors"))
    trainer.accelerator.wait_for_everyone()


def main(modes: str, out: str) -> None:
    """`modes`: "single", or comma-separated 2-rank modes ("ddp,fsdp2") run one after the other in this job."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for mode in modes.split(","):
        run(mode, os.path.join(out, mode))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
