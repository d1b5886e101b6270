"""A whole `SynAPOTrainer` run (preset `synapo`) under DeepSpeed ZeRO-2 or ZeRO-3 on 2 gloo CPU ranks, by hand (not
part of the test suite: the project's TRL venv has no DeepSpeed; run it in the DeepSpeed venv, which has TRL too):

    /tmp/venvs/ds/bin/python tests/trl/_dist_trainer_run.py single OUT              # the 1-process reference
    /tmp/venvs/ds/bin/torchrun --nproc_per_node 2 tests/trl/_ds_trainer_run.py STAGE OUT    # STAGE 2 or 3

The same run as `_dist_trainer_run.py` (its rollouts, policy and settings: bf16=False, whiten_advantages=True, Adam
eps 1e-3; a value warm-up batch, STEPS steps, a checkpoint at SAVE_AT, `save_model`, then a fresh trainer resumes from
the checkpoint), with `SynAPOConfig(deepspeed=<ZeRO config>)`: the policy is prepared by transformers / accelerate's
DeepSpeed path (HF's `deepspeed_init`, its engine) and the critic by `prepare_critic` (an engine of its own).
accelerate ignores a DeepSpeed plugin on CPU (docs/trl_at_scale.md), so the type is forced right after the trainer
makes its accelerator (`ForcedDeepSpeedTrainer`).

Writes `<OUT>/zero<STAGE>/rank<r>.json` (the critic's and the policy's elements this rank holds, losses, the resumed
run's agreement) and on rank 0 `<OUT>/zero<STAGE>/states.safetensors`; when `<OUT>/single/states.safetensors` exists
(the reference, written by `_dist_trainer_run.py single <OUT>`), rank 0 adds the largest difference to it.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import deepspeed  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from synapo_ext.trl import SynAPOTrainer  # noqa: E402
from synapo_ext.trl.critic_weights import local_numel  # noqa: E402
from tests.trl._dist_trainer_run import SAVE_AT, build_trainer, digest, trainer_args  # noqa: E402


def ds_config(stage: int) -> dict:
    """The HF-style DeepSpeed config ("auto" filled from the training arguments by transformers)."""
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


class ForcedDeepSpeedTrainer(SynAPOTrainer):
    """accelerate keeps `MULTI_CPU` on CPU even with a DeepSpeed plugin: force the DeepSpeed type in both shared
    states, select the plugin and set up DeepSpeed's communication (on the gloo group accelerate made) right after
    the trainer makes its accelerator, before anything reads it."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        plugin = self.args.deepspeed_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
        self.accelerator.state.distributed_type = DistributedType.DEEPSPEED
        plugin.set_mixed_precision("no")
        plugin.select(_from_accelerator_state=True)
        self.accelerator.state.deepspeed_plugins = plugin
        self.is_deepspeed_enabled = True
        deepspeed.init_distributed(dist_backend="gloo")


def make_trainer(stage: int, out: str, world: int) -> SynAPOTrainer:
    return build_trainer(ForcedDeepSpeedTrainer, trainer_args(out, world, deepspeed=ds_config(stage)))


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on every rank (ZeRO-3 partitions gathered), float32 CPU."""
    module = getattr(model, "module", model)
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params) if params else torch.no_grad():
        return {name: value.detach().float().cpu().clone() for name, value in module.state_dict().items()}


def scheduler_steps(checkpoint: str) -> int | None:
    """`last_epoch` of the critic's LR scheduler saved in `checkpoint` (None when absent)."""
    path = os.path.join(checkpoint, "critic", "critic_scheduler.pt")
    return torch.load(path, weights_only=False).get("last_epoch") if os.path.exists(path) else None


def run(stage: int, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    world = int(os.environ["WORLD_SIZE"])
    trainer = make_trainer(stage, out, world)
    trainer.train()
    rank = trainer.accelerator.process_index
    critic_held = local_numel(trainer._critic.unwrapped)
    policy_held = local_numel(trainer.accelerator.unwrap_model(trainer.model_wrapped))
    critic, policy = full_state(trainer._critic.model), full_state(trainer.model_wrapped)
    trainer.save_model(os.path.join(out, "final"))
    logs = trainer.state.log_history

    resumed = make_trainer(stage, out, world)
    resumed.train(resume_from_checkpoint=os.path.join(out, "run", f"checkpoint-{SAVE_AT}"))
    critic_again, policy_again = full_state(resumed._critic.model), full_state(resumed.model_wrapped)
    losses = [e["loss"] for e in logs if "loss" in e]
    vf = [e[k] for e in logs for k in e if k.endswith("vf_loss") and "heldout" not in k]
    result = {
        "backend": trainer._critic.backend,
        "zero_stage": stage,
        "critic_held_total": critic_held,
        "policy_held_total": policy_held,
        "critic_engine_distinct": trainer._critic.engine is not trainer.model_wrapped,
        "losses": losses,
        "critic_vf_losses": vf,
        "finite": all(math.isfinite(x) for x in losses + vf),
        "critic_updates": trainer._critic_updates,
        "scvl_pairs": [e["synapo/scvl/pairs"] for e in logs if "synapo/scvl/pairs" in e],
        "resumed_critic_equal": digest(critic_again) == digest(critic),
        "resumed_policy_equal": digest(policy_again) == digest(policy),
        "resumed_critic_max_diff": max(float((critic_again[k] - critic[k]).abs().max()) for k in critic),
        "resumed_policy_max_diff": max(float((policy_again[k] - policy[k]).abs().max()) for k in policy),
        "checkpoint": sorted(os.listdir(os.path.join(out, "run", f"checkpoint-{SAVE_AT}"))),
        # critic LR scheduler steps by the checkpoint (the 1-process run: one per critic step, 3 at step 2)
        "critic_scheduler_steps": scheduler_steps(os.path.join(out, "run", f"checkpoint-{SAVE_AT}")),
        "export": sorted(os.listdir(os.path.join(out, "final", "critic"))),
    }
    if rank == 0:
        tensors = {f"critic.{k}": v for k, v in critic.items()} | {f"policy.{k}": v for k, v in policy.items()}
        save_file(tensors, os.path.join(out, "states.safetensors"))
        reference = os.path.join(os.path.dirname(out), "single", "states.safetensors")
        if os.path.exists(reference):
            single_checkpoint = os.path.join(os.path.dirname(out), "single", "run", f"checkpoint-{SAVE_AT}")
            result["critic_scheduler_steps_single"] = scheduler_steps(single_checkpoint)
            want = load_file(reference)
            for part in ("critic", "policy"):
                keys = [k for k in want if k.startswith(part + ".")]
                missing = [k for k in keys if k not in tensors]
                result[f"{part}_missing_vs_single"] = missing
                result[f"{part}_max_diff_vs_single"] = max(
                    float((tensors[k] - want[k]).abs().max()) for k in keys if k in tensors
                )
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    trainer.accelerator.wait_for_everyone()


def main(stage: int, out: str) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    run(stage, os.path.join(out, f"zero{stage}"))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
