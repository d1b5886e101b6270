"""Saving and resuming `SynAPOTrainer`: the critic, its optimizer, scheduler and counters beside TRL's checkpoint,
written complete-or-absent after TRL's part (TRL's rotation of old checkpoints waits for it)."""

from __future__ import annotations

import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from .critic import check_resumable, load_critic_state, save_critic_state

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """The checkpoint methods of `SynAPOTrainer` (it provides `critic`, `critic_optimizer`, `_critic_lr_scheduler`
    and the `_warmup_*` / `_critic_updates` counters)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """TRL's `save_model`, plus the critic in `<output_dir>/critic/` (safetensors; `from_pretrained` loads it).
        Inside a checkpoint the critic part is written by `_save_checkpoint`, after TRL's part."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and not self._saving_checkpoint:
            save_critic_state(output_dir or self.args.output_dir, self.critic)

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
        if not self.args.should_save:
            return
        run_dir = self._get_output_dir(trial=trial)
        checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        counters = {
            "warmup_done": self._warmup_done,
            "warmup_finished": self._warmup_finished,
            "warmup_stop_reason": self._warmup_stop_reason,
            "critic_updates": self._critic_updates,
        }
        save_critic_state(checkpoint, self.critic, self.critic_optimizer, self._critic_lr_scheduler(), counters)
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """TRL's `train`; a checkpoint to resume from must be complete (its critic part is written last).

        Raises:
            IncompleteCheckpointError: the checkpoint's critic part is missing or partial, naming the last complete
                checkpoint beside it, if any.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: TRL's own error
        if isinstance(resume_from_checkpoint, str):
            check_resumable(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            counters = load_critic_state(checkpoint, self.critic, self.critic_optimizer, self._critic_lr_scheduler())
            self._warmup_done = counters["warmup_done"]
            self._warmup_finished = True  # a checkpoint comes after a training step, so after the warm-up
            self._warmup_stop_reason = counters.get("warmup_stop_reason")
            self._critic_updates = counters["critic_updates"]
