"""`SynAPOTrainer`: value-based PPO (VAPO / SynAPO) on TRL's GRPO pipeline.

References: SPEC (../shared/SPEC.md); VAPO, arXiv 2504.05118; TRL issue #4525 (custom advantages through a
`GRPOTrainer` subclass overriding `_generate_and_score_completions`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os

import torch
from transformers import get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from trl import GRPOTrainer

from ..core import boundary_table_from_tokenizer, compute_synapo_advantages, scvl_group_stats
from ._compat import check_hooks, check_old_logps_condition, check_rollout_output, trl_runs_old_logps
from ._spelling import RENAMED_TRAINER_KEYWORDS, one_of, unknown_keyword_message
from .config import SynAPOConfig
from .critic import build_critic, check_resumable, critic_values, load_critic_state, save_critic_state
from .update import CriticBatch, critic_health, scvl_sides, update_critic
from .warmup import ValueWarmupMixin

__all__ = ["SynAPOTrainer"]

logger = logging.getLogger(__name__)

check_hooks(GRPOTrainer)  # the private methods wrapped below (synapo_ext/trl/_compat.py states each assumption)
check_old_logps_condition(GRPOTrainer)

TRAINER_PARAMETERS = (*inspect.signature(GRPOTrainer.__init__).parameters, "critic_model", "config", "tokenizer")[1:]


class SynAPOTrainer(ValueWarmupMixin, GRPOTrainer):
    """GRPO's trainer with a learned critic: per-token `(B, T)` advantages from `synapo_ext.core` replace GRPO's
    group-normalised ones; everything else (generation, vLLM, reward functions, the clipped token-level policy loss,
    logging) is TRL's.

    What changes, each by wrapping `super()`:
    - `_generate_and_score_completions`: after TRL's rollout, the critic's values, the rollout-time entropy and the
      rewards go through `compute_synapo_advantages` (EA-GAE, HVM, SCVL pairs); the critic then takes its own
      optimizer steps on the batch (prompt groups intact) and `output["advantages"]` becomes `(B, T)`. Before the first
      rollout the critic alone trains on rollout batches (VAPO's value pretraining) until `core.warmup`'s rule stops
      it: `value_warmup_steps` is the cap, `value_warmup_target_ev` / `value_warmup_patience` end it earlier.
    - `_get_per_token_logps_and_entropies`: keeps the entropy of TRL's old-log-prob pass (no extra forward when TRL
      runs one) and the with-grad log-probs of the loss pass (for the positive-example LM loss).
    - `_calculate_rewards`: keeps the raw rewards (TRL's output holds only normalised advantages).
    - `_compute_loss`: adds `positive_lm_coef` * NLL of the correct responses.
    - `save_model`, `_save_checkpoint`, `_load_optimizer_and_scheduler`: the critic, its optimizer, scheduler and
      counters, written complete-or-absent after TRL's part of a checkpoint (TRL's rotation of old checkpoints waits
      for it); `train` refuses to resume from a checkpoint whose critic part is missing or partial.

    Args:
        critic_model: a path / hub id of a token-classification model, a model, or `None` (initialised from the
            policy's weights, or from `args.critic_model_name_or_path` when set).
        config: the research write-up's name of `args` (a `SynAPOConfig`).
        tokenizer: the research write-up's name of `processing_class`.
        Every other argument is `GRPOTrainer`'s; any other keyword is refused with what to write instead.
    """

    _tag_names = ["trl", "synapo"]
    _name = "SynAPO"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: SynAPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        critic_model=None,
        config: SynAPOConfig | None = None,
        tokenizer=None,
        **kwargs,
    ):
        for name in kwargs:
            if name not in TRAINER_PARAMETERS:
                config_fields = {f.name: f"it is a SynAPOConfig field: pass SynAPOConfig({f.name}=...) as `args`"
                                 for f in dataclasses.fields(SynAPOConfig)}  # fmt: skip
                raise TypeError(
                    unknown_keyword_message(
                        "SynAPOTrainer", name, TRAINER_PARAMETERS, RENAMED_TRAINER_KEYWORDS, config_fields
                    )
                )
        args = one_of("args", args, "config", config)
        processing_class = one_of("processing_class", processing_class, "tokenizer", tokenizer)
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SynAPOConfig(f"{name.split('/')[-1]}-SynAPO")
        if not isinstance(args, SynAPOConfig):
            raise TypeError(f"`args` (or `config`) must be a SynAPOConfig, got {type(args).__name__}")
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.synapo = args.synapo_params()
        policy = self.accelerator.unwrap_model(self.model)
        critic_model = critic_model if critic_model is not None else args.critic_model_name_or_path
        num_heads = 2 if self.synapo.hvm_enabled else 1
        self.critic = build_critic(critic_model, policy, num_heads=num_heads).to(self.accelerator.device)
        self._broadcast_critic()
        self.critic_optimizer = torch.optim.AdamW(
            self.critic.parameters(), lr=args.critic_learning_rate, weight_decay=args.critic_weight_decay
        )
        self.critic_scheduler = None  # built once the number of steps is known (_critic_lr_scheduler)
        self.boundary_table = self._boundary_table(policy) if self.synapo.hvm_enabled else None
        self._warmup_done = 0  # warm-up rollout batches done
        self._warmup_finished = self.synapo.value_warmup_steps == 0
        self._warmup_stop_reason = None
        self._ev_explained = False
        self._critic_updates = 0
        self._saving_checkpoint = False
        self._warmup_iterator = None
        self._capture_entropy = self._capture_logps = False
        self._rollout_entropy = self._kept_logps = self._rewards_per_func = None

    # --- set-up helpers ---------------------------------------------------------------------------------------

    def _boundary_table(self, policy) -> torch.Tensor:
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        vocab_size = max(len(tokenizer), policy.get_input_embeddings().num_embeddings)
        try:
            table = boundary_table_from_tokenizer(tokenizer, self.synapo.hvm_delimiters, vocab_size=vocab_size)
        except ValueError as err:
            raise ValueError(
                f"`hvm_delimiters` {self.synapo.hvm_delimiters!r} with HVM on: {err} (tokenizer: the trainer's "
                "`processing_class`)"
            ) from err
        return table.to(self.accelerator.device)

    def _broadcast_critic(self) -> None:
        """Same initial critic on every rank (its head is fresh; ranks may have drawn different values)."""
        if self.accelerator.num_processes > 1:
            for tensor in self.critic.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def _critic_lr_scheduler(self):
        if self.critic_scheduler is None:
            args = self.args
            max_steps = args.max_steps if args.max_steps > 0 else max(self.state.max_steps, 1)
            generate_every = args.steps_per_generation * self.num_iterations
            rollouts = math.ceil(max_steps * args.gradient_accumulation_steps / generate_every)
            local_batch = args.per_device_train_batch_size * args.steps_per_generation
            mini_batch = min(args.critic_mini_batch_size or args.per_device_train_batch_size, local_batch)
            per_rollout = args.critic_epochs * math.ceil(local_batch / mini_batch)
            self.critic_scheduler = get_scheduler(
                args.critic_lr_scheduler_type,
                self.critic_optimizer,
                num_warmup_steps=0,
                num_training_steps=(rollouts + self.synapo.value_warmup_steps) * per_rollout,
            )
        return self.critic_scheduler

    # --- rollout ----------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._capture_entropy:  # TRL's old-log-prob pass: ask it for the entropy too (same forward)
            self._capture_entropy = False
            if model is not self.model:
                raise RuntimeError(
                    "TRL's first log-prob pass of the rollout was not on the policy: synapo_ext/trl/_compat.py's "
                    "assumption 3 (the old-log-prob pass comes first) no longer holds for this TRL"
                )
            kwargs["compute_entropy"] = True
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
            self._rollout_entropy = out[1]
            return out
        out = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        if self._capture_logps and torch.is_grad_enabled():
            self._kept_logps = out[0]
        return out

    def _rollout(self, inputs):
        """TRL's generation and scoring, keeping the rollout-time entropy when TRL's old-log-prob pass runs."""
        runs_old_logps = trl_runs_old_logps(self)
        self._capture_entropy = self.synapo.ea_gae_enabled and runs_old_logps
        self._rollout_entropy = None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._capture_entropy = False
        check_rollout_output(output, runs_old_logps)
        return output

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        if mode == "train" and not self._warmup_finished:
            self._value_warmup()
        output = self._rollout(inputs)
        self._log_metrics(mode, *self._synapo_stage(output, mode))
        return output

    def _rollout_entropy_for(self, output, input_ids, attention_mask, mode):
        """(B, T) rollout-policy entropy: from TRL's old-log-prob pass, or one extra no-grad forward."""
        entropy, self._rollout_entropy = self._rollout_entropy, None
        if entropy is None:
            batch_size = (
                self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
            )
            with torch.no_grad():
                _, entropy, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    input_ids,
                    attention_mask,
                    output["completion_ids"].size(1),
                    batch_size=batch_size,
                    compute_entropy=True,
                )
        return entropy.float()

    # --- the SynAPO stage -------------------------------------------------------------------------------------

    def _synapo_stage(self, output, mode: str) -> tuple[dict[str, float], dict[str, float]]:
        """Replace `output["advantages"]` by SynAPO's (B, T) advantages; in training, update the critic.

        Rows with no valid token (e.g. `mask_truncated_completions`) or no score (every reward function returned
        None/NaN for them) get zero advantages, join no SCVL pair, no positive-LM loss and no critic target; they are
        counted (`synapo/rows_empty`, `synapo/rows_unscored`). A batch where no process has a row left is skipped
        (`synapo/batches_skipped`): no advantage, no critic step.

        Returns:
            (metrics to average over processes, metrics to sum over processes).
        """
        device, params = self.accelerator.device, self.synapo
        completion_ids = output["completion_ids"]
        mask = output["completion_mask"] * output["tool_mask"] if "tool_mask" in output else output["completion_mask"]
        B, T = completion_ids.shape
        input_ids = torch.cat([output["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        world, offset = self.accelerator.num_processes, self.accelerator.process_index * B
        if (B * world) % num_generations != 0:
            raise ValueError(
                f"the rollout batch ({B} rows x {world} processes) is not whole groups of `num_generations` "
                f"({num_generations}): SCVL and the group layout need complete groups"
            )

        # Outcome score of each row: TRL's weighted sum over reward functions; NaN where every function gave None/NaN
        rewards_per_func = self._rewards_per_func.to(device)
        all_scored = ~torch.isnan(rewards_per_func).all(dim=1)
        all_scores = (rewards_per_func * self.reward_weights.to(device)).nansum(dim=1)
        scores, scored = all_scores[offset : offset + B], all_scored[offset : offset + B]
        has_tokens = mask.sum(dim=1) > 0
        valid = has_tokens & scored
        output["advantages"] = torch.zeros(B, T, device=device)
        output["synapo_positive"] = valid & (scores >= params.positive_lm_threshold)
        totals = {
            "synapo/rows_empty": float((~has_tokens).sum()),
            "synapo/rows_unscored": float((has_tokens & ~scored).sum()),
        }
        n_valid = self.accelerator.gather(valid.sum().reshape(1)).sum()
        if n_valid == 0:  # nothing to learn from on any process: skip, count
            self._log_row_advantages(output["advantages"], mask)
            totals["synapo/batches_skipped"] = 1.0
            return {}, totals
        totals["synapo/batches_skipped"] = 0.0

        last = T - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
        rewards = torch.zeros(B, T, device=device)
        rewards[torch.arange(B, device=device), last] = torch.where(valid, scores, 0.0)
        entropy = self._rollout_entropy_for(output, input_ids, attention_mask, mode) if params.ea_gae_enabled else None
        with torch.no_grad(), self.accelerator.autocast():
            values = critic_values(self.critic, input_ids, attention_mask, T)  # (B, T, H)
        critic_mask = mask * valid.unsqueeze(1).to(mask.dtype)  # tokens with a target

        means: dict[str, float] = {}
        if valid.any():

            def rows(x):
                return None if x is None else x[valid]

            result = compute_synapo_advantages(
                dataclasses.replace(params, scvl_enabled=False),  # SCVL pairs below: their scope may span processes
                rewards=rewards[valid],
                values=values[valid][..., 0],
                response_mask=mask[valid],
                global_values=values[valid][..., 1] if params.hvm_enabled else None,
                entropy=rows(entropy),
                response_ids=completion_ids[valid],
                boundary_table=self.boundary_table,
            )
            output["advantages"][valid] = result.advantages.float()
            output["advantages"] *= mask
            means.update(result.metrics)
        else:  # this process has no row to learn from, others have: it still takes part in the critic's steps
            result = None
        self._log_row_advantages(output["advantages"], mask)
        if entropy is not None and critic_mask.sum() > 0:
            means["ea_gae/entropy_mean"] = float((entropy * critic_mask).sum() / critic_mask.sum())
        if mode != "train":
            return means, totals

        def full(x, fill=0.0):
            out = torch.full((B, T), fill, dtype=torch.bool if isinstance(fill, bool) else torch.float, device=device)
            if x is not None:
                out[valid] = x.to(out.dtype)
            return out

        batch = CriticBatch(
            input_ids,
            attention_mask,
            critic_mask.float(),
            full(None if result is None else result.returns),
            values,
            full(None if result is None else result.global_returns) if params.hvm_enabled else None,
            full(None if result is None else result.start_mask, False) if params.hvm_enabled else None,
        )
        if params.scvl_enabled:
            batch.sides, totals["critic/scvl_pairs"], scvl_metrics = self._scvl_scope(
                completion_ids, mask, valid, all_scores, all_scored, values[..., 0], offset, num_generations
            )
            means.update(scvl_metrics)
        means.update(self._explained_variance(batch.returns, values[..., 0], critic_mask))
        generator = torch.Generator().manual_seed(self.args.seed + self._critic_updates)
        means.update(
            update_critic(
                self.critic,
                self.critic_optimizer,
                self._critic_lr_scheduler(),
                batch,
                params,
                epochs=self.args.critic_epochs,
                mini_batch_size=self.args.critic_mini_batch_size or self.args.per_device_train_batch_size,
                cliprange_value=self.args.cliprange_value,
                max_grad_norm=self.args.critic_max_grad_norm,
                generator=generator,
                autocast=self.accelerator.autocast,
            )
        )
        self._critic_updates += 1
        means["critic/warmup_done"] = float(self._warmup_done)
        return means, totals

    def _log_row_advantages(self, advantages: torch.Tensor, mask: torch.Tensor) -> None:
        """Show SynAPO's advantages in TRL's completions table: TRL logged its GRPO ones for these rows; replace
        them by each row's mean over valid tokens (all processes' rows, in TRL's order). `advantages`: (B, T), 0 off
        `mask`."""
        row_means = advantages.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        row_means = self.accelerator.gather(row_means).tolist()
        logged = self._logs["advantages"]
        for _ in range(min(len(row_means), len(logged))):
            logged.pop()
        logged.extend(row_means)

    def _scvl_scope(self, completion_ids, mask, valid, all_scores, all_scored, values, offset, num_generations):
        """SCVL sides for this process: pairs from its own rows when its groups are whole, else from all ranks'.
        Only rows in `valid` (a valid token and a score) are paired; `all_scores` / `all_scored`: (B * world,)."""
        B = completion_ids.size(0)
        world = self.accelerator.num_processes
        local_index = torch.arange(B, device=values.device)
        if world > 1 and B % num_generations != 0:  # groups straddle processes: gather the whole batch
            pad = self.accelerator.pad_across_processes
            completion_ids, mask, values = (
                self.accelerator.gather(pad(x, dim=1)) for x in (completion_ids, mask, values)
            )
            valid = self.accelerator.gather(valid)
            local_index = torch.arange(B * world, device=values.device) - offset
            local_index[(local_index < 0) | (local_index >= B)] = -1
            scores, scored, scope_world = all_scores, all_scored, world
            group_ids = torch.arange(B * world) // num_generations
        else:
            scores, scored, scope_world = all_scores[offset : offset + B], all_scored[offset : offset + B], 1
            group_ids = (offset + torch.arange(B)) // num_generations
        keep = valid.nonzero().squeeze(1)
        group_ids = group_ids.to(keep.device)
        sides, n_pairs = scvl_sides(
            self.synapo,
            completion_ids[keep],
            mask[keep],
            scores[keep],
            group_ids[keep],
            values[keep],
            local_index=local_index[keep],
            world_size=scope_world,
        )
        scored_rows = scored.nonzero().squeeze(1)
        stats = scvl_group_stats(
            scores[scored_rows], group_ids.to(scores.device)[scored_rows], threshold=self.synapo.scvl_threshold
        )
        metrics = {
            "synapo/scvl/groups_mixed": float(stats["groups_mixed"]) / scope_world,
            "synapo/scvl/groups_skipped": float(stats["groups"] - stats["groups_mixed"]) / scope_world,
        }
        return sides, n_pairs / scope_world, metrics

    @staticmethod
    def _explained_variance(returns, values, mask) -> dict[str, float]:
        """The critic's held-out numbers (`critic_health`); a method so benchmarks can add their own figures."""
        return critic_health(returns, values, mask)

    def _reduce_metrics(self, means: dict[str, float], totals: dict[str, float] | None = None) -> dict[str, float]:
        """`means` averaged over processes, `totals` summed (names may differ between ranks: a missing one is NaN
        and left out of the average)."""
        out: dict[str, float] = {}
        for reduce, values in (("mean", means), ("sum", totals or {})):
            names = sorted(_gather_names(self.accelerator, values))
            if not names:
                continue
            local = torch.tensor([float(values.get(n, math.nan)) for n in names], device=self.accelerator.device)
            gathered = self.accelerator.gather(local).view(-1, len(names))
            reduced = gathered.nanmean(0) if reduce == "mean" else gathered.nansum(0)
            out.update(zip(names, reduced.tolist(), strict=True))
        return out

    def _log_metrics(self, mode: str, means: dict[str, float], totals: dict[str, float] | None = None) -> None:
        """Append to TRL's metrics (logged and averaged by TRL's `log`)."""
        for name, value in self._reduce_metrics(means, totals).items():
            self._metrics[mode][name].append(value)

    # --- loss -------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        coef = self.synapo.positive_lm_coef
        self._capture_logps, self._kept_logps = coef > 0, None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._capture_logps = False
        logps, self._kept_logps = self._kept_logps, None
        if coef > 0 and logps is not None and "synapo_positive" in inputs:
            # Positive-example LM loss (VAPO): token-mean NLL over the correct responses of this micro-batch
            mask = inputs["completion_mask"] * inputs["synapo_positive"].unsqueeze(1).to(logps.dtype)
            if "tool_mask" in inputs:
                mask = mask * inputs["tool_mask"]
            nll = -(logps * mask).sum() / mask.sum().clamp(min=1.0)
            mode = "train" if self.model.training else "eval"
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + coef * nll / accumulation
            self._metrics[mode]["synapo/positive_lm/nll"].append(self.accelerator.gather(nll.detach()).mean().item())
        return loss

    # --- saving and resuming ------------------------------------------------------------------------------------

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


def _gather_names(accelerator, values: dict[str, float]) -> set[str]:
    """The union of the metric names every process holds (they differ when a process had no row to learn from)."""
    if accelerator.num_processes == 1:
        return set(values)
    from accelerate.utils import gather_object

    return set().union(*gather_object([sorted(values)]))
