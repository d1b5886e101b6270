"""Saving and resuming `SynAPOTrainer`: the critic, its optimizer, scheduler and counters beside TRL's checkpoint,
written complete-or-absent after TRL's part (TRL's rotation of old checkpoints waits for it)."""

from __future__ import annotations

import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from .critic import (
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
        DeepSpeed the critic is gathered to the main process: call on every rank (as TRL's own `save_model`)."""
        super().save_model(output_dir, _internal_call)
        if self._saving_checkpoint:
            return
        output_dir = output_dir or self.args.output_dir
        if self._critic_sharded():
            prepared = self._prepare_critic()
            state_dict = full_critic_state_dict(prepared)  # collective
            if self.args.should_save:
                save_critic_state(output_dir, prepared.unwrapped, state_dict=state_dict)
            self.accelerator.wait_for_everyone()
        elif self.args.should_save:
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
        if not self.args.should_save:
            return
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

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
