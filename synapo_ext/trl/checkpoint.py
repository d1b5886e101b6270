"""Saving and resuming `SynAPOTrainer`: the critic, its optimizer, scheduler and counters beside TRL's checkpoint,
written complete-or-absent after TRL's part (TRL's rotation of old checkpoints waits for it)."""

from __future__ import annotations

import json
import os
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from .critic import (
    CRITIC_DIR,
    check_checkpoint_fits,
    check_resumable,
    is_sharded_checkpoint,
    load_critic_state,
    read_counters,
    save_critic_state,
)
from .critic_weights import SHARDED_DIR, full_critic_state_dict, load_critic_sharded, save_critic_sharded

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """The checkpoint methods of `SynAPOTrainer` (it provides `critic`, `critic_optimizer`, `_prepare_critic`,
    `_critic_backend`, `_critic_lr_scheduler` and the `_warmup_*` / `_critic_updates` counters).

    A checkpoint's critic part is `critic/` (complete-or-absent, main process): single process and DDP keep the
    weights (safetensors), optimizer, scheduler and counters there. FSDP2 and DeepSpeed keep the weights and
    optimizer in their training layout in `critic_sharded/` (every rank writes its shards, as the policy's), and
    `critic/` holds the plain safetensors export, the scheduler, the counters and a manifest listing the sharded
    files too.
    """

    def _critic_sharded(self) -> bool:
        return self._critic_backend in ("fsdp2", "deepspeed")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """TRL's `save_model`, plus the critic in `<output_dir>/critic/` (safetensors; `from_pretrained` loads it).
        Inside a checkpoint the critic part is written by `_save_checkpoint`, after TRL's part. Under FSDP2 /
        DeepSpeed the critic is gathered to the main process: call on every rank (as TRL's own `save_model`).

        With `push_to_hub`, the push that transformers makes inside its `save_model` is made here instead, once the
        critic is written, so the Hub repository gets `critic/` beside the policy."""
        super().save_model(output_dir, _internal_call=True)  # transformers would push before the critic exists
        if self._saving_checkpoint:
            return
        self._save_critic_export(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _name_critic_config(self, critic) -> None:
        """The critic's config names its heads (`id2label`: 0 local, 1 global with HVM; else 0 value) and carries
        the SynAPO parameters (`synapo_params`), so a saved critic says what it is."""
        config = getattr(critic, "config", None)
        if config is None:
            return
        labels = ["local", "global"] if self.synapo.hvm_enabled else ["value"]
        if getattr(config, "num_labels", len(labels)) == len(labels):
            config.id2label = dict(enumerate(labels))
            config.label2id = {label: i for i, label in enumerate(labels)}
        config.synapo_params = self.synapo.to_dict()
        config.synapo_preset = self.args.preset

    def _save_critic_export(self, output_dir: str | None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self._critic_sharded():
            prepared = self._prepare_critic()
            state_dict = full_critic_state_dict(prepared)  # collective
            if self.args.should_save:
                self._name_critic_config(prepared.unwrapped)
                save_critic_state(output_dir, prepared.unwrapped, state_dict=state_dict)
            self.accelerator.wait_for_everyone()
        elif self.args.should_save:
            self._name_critic_config(getattr(self.critic, "module", self.critic))
            save_critic_state(output_dir, self.critic)

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint, then the critic part (weights, optimizer, scheduler, counters) complete-or-absent, then
        TRL's rotation of old checkpoints: a kill at any point never leaves an incomplete newest checkpoint as the
        only one, and `train(resume_from_checkpoint=...)` refuses an incomplete one."""
        limit = self.args.save_total_limit
        self._saving_checkpoint, self.args.save_total_limit = True, None  # rotate only once the critic is written
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint, self.args.save_total_limit = False, limit
        run_dir = self._get_output_dir(trial=trial)
        checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        counters = {
            "warmup_done": self._warmup_done,
            "warmup_finished": self._warmup_finished,
            "warmup_stop_reason": self._warmup_stop_reason,
            "critic_updates": self._critic_updates,
            "run": self._critic_run(),  # what shaped the critic: checked first on resume
        }
        if self._critic_sharded():  # every rank: its shards, then the gathered export on the main process
            prepared = self._prepare_critic()
            save_critic_sharded(self.accelerator, prepared, checkpoint)
            state_dict = full_critic_state_dict(prepared)
            if self.args.should_save:
                save_critic_state(
                    checkpoint,
                    prepared.unwrapped,
                    None,
                    self._critic_lr_scheduler(),
                    counters,
                    state_dict=state_dict,
                    sharded_dir=SHARDED_DIR,
                )
            self.accelerator.wait_for_everyone()
        elif self.args.should_save:
            save_critic_state(checkpoint, self.critic, self.critic_optimizer, self._critic_lr_scheduler(), counters)
        pending, self._pending_push = getattr(self, "_pending_push", None), None
        if pending is not None:  # the checkpoint push TRL's part asked for, now that the critic part exists
            self._push_from_checkpoint(pending)
        if not self.args.should_save:
            return
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """transformers' checkpoint push (model files copied to `output_dir`, then uploaded), with the checkpoint's
        critic export (`critic/`: config and safetensors) copied beside them. Called by TRL's part of
        `_save_checkpoint` before the critic part exists: deferred until it does."""
        if self._saving_checkpoint:
            self._pending_push = checkpoint_folder
            return
        source = os.path.join(checkpoint_folder, CRITIC_DIR)
        if self.is_world_process_zero() and os.path.isdir(source):
            target = os.path.join(self.args.output_dir, CRITIC_DIR)
            os.makedirs(target, exist_ok=True)
            for name in os.listdir(source):
                if name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json")):
                    shutil.copy(os.path.join(source, name), os.path.join(target, name))
        super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card (no paper: SynAPO has none, and GRPO's DeepSeekMath is not its source), then what SynAPO adds:
        the method, the critic's folder and how to load both, the parameters the run used."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        heads = "two heads: 0 local (per token), 1 global (per HVM segment)" if self.synapo.hvm_enabled else "one head"
        params = json.dumps(self.synapo.to_dict(), indent=1, sort_keys=True)
        section = f"""
## SynAPO

Trained with SynAPO (preset `{self.args.preset}`): value-based PPO (VAPO, arXiv 2504.05118) with EA-GAE, HVM and
SCVL, by synapo-ext on TRL's GRPO pipeline. The policy is this repository's root; its critic
(a token-classification model, {heads}) is in `critic/`:

```python
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

policy = AutoModelForCausalLM.from_pretrained("<this repo>")
critic = AutoModelForTokenClassification.from_pretrained("<this repo>", subfolder="critic")
# train on: SynAPOTrainer(model="<this repo>", critic_model=critic, ...)
```

SynAPO parameters of this run:

```json
{params}
```
"""
        with open(path, "a") as f:
            f.write(section)

    def _critic_run(self) -> dict:
        """The settings that shape the critic: the preset, HVM (two heads) or not."""
        return {
            "preset": self.args.preset,
            "hvm_enabled": self.synapo.hvm_enabled,
            "num_heads": 2 if self.synapo.hvm_enabled else 1,
        }

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """TRL's `train`; a checkpoint to resume from must be complete and undamaged (its critic part is written
        last, with a SHA-256 of every file) and its critic must fit this run's, checked before TRL loads anything.

        Raises:
            IncompleteCheckpointError: the checkpoint's critic part is missing, partial or damaged
                (`DamagedCheckpointError`), naming the file and the last complete checkpoint beside it, if any.
            ValueError: the checkpoint's critic has another number of heads (preset / `hvm_enabled`), architecture
                or tensor shapes than this run's, naming the setting.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: TRL's own error
        if isinstance(resume_from_checkpoint, str):
            check_resumable(resume_from_checkpoint)
            check_checkpoint_fits(resume_from_checkpoint, self.critic, self._critic_run())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """TRL's, then the critic's: prepared first (the policy is by now), then restored from the checkpoint's critic
        part (FSDP2 / DeepSpeed: weights and optimizer from `critic_sharded/`, each rank its shards).

        Raises:
            ValueError: the checkpoint's critic layout (sharded or not) is not this run's backend's.
        """
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        prepared = self._prepare_critic()
        if self._critic_sharded() != is_sharded_checkpoint(checkpoint):
            raise ValueError(
                f"{checkpoint}'s critic was saved {'sharded' if is_sharded_checkpoint(checkpoint) else 'whole'} but "
                f"this run's critic is {self._critic_backend}: resume under the accelerate config that wrote it"
            )
        if self._critic_sharded():
            load_critic_sharded(self.accelerator, prepared, checkpoint)
            counters = load_critic_state(checkpoint, None, None, self._critic_lr_scheduler())
        else:
            counters = load_critic_state(checkpoint, self.critic, self.critic_optimizer, self._critic_lr_scheduler())
        counters = read_counters(checkpoint, counters)
        self._warmup_done = counters["warmup_done"]
        self._warmup_finished = True  # a checkpoint comes after a training step, so after the warm-up
        self._warmup_stop_reason = counters.get("warmup_stop_reason")
        self._critic_updates = counters["critic_updates"]
