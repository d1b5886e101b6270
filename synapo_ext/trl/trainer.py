"""`SynAPOTrainer`: value-based PPO (VAPO / SynAPO) on TRL's GRPO pipeline.

References: SPEC (../shared/SPEC.md); VAPO, arXiv 2504.05118; TRL issue #4525 (custom advantages through a
`GRPOTrainer` subclass overriding `_generate_and_score_completions`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch
from transformers import get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer

from ..core import boundary_table_from_tokenizer, compute_synapo_advantages, scvl_group_stats
from .config import SynAPOConfig
from .critic import build_critic, critic_values, load_critic_state, save_critic_state
from .update import CriticBatch, scvl_sides, update_critic

__all__ = ["SynAPOTrainer"]

logger = logging.getLogger(__name__)


class SynAPOTrainer(GRPOTrainer):
    """GRPO's trainer with a learned critic: per-token `(B, T)` advantages from `synapo_ext.core` replace GRPO's
    group-normalised ones; everything else (generation, vLLM, reward functions, the clipped token-level policy loss,
    logging) is TRL's.

    What changes, each by wrapping `super()`:
    - `_generate_and_score_completions`: after TRL's rollout, the critic's values, the rollout-time entropy and the
      rewards go through `compute_synapo_advantages` (EA-GAE, HVM, SCVL pairs); the critic then takes its own
      optimizer steps on the batch (prompt groups intact) and `output["advantages"]` becomes `(B, T)`. Before the first
      rollout the critic alone trains for `value_warmup_steps` rollout batches (VAPO's value pretraining).
    - `_get_per_token_logps_and_entropies`: keeps the entropy of TRL's old-log-prob pass (no extra forward when TRL
      runs one) and the with-grad log-probs of the loss pass (for the positive-example LM loss).
    - `_calculate_rewards`: keeps the raw rewards (TRL's output holds only normalised advantages).
    - `_compute_loss`: adds `positive_lm_coef` * NLL of the correct responses.
    - `save_model`, `_save_checkpoint`, `_load_optimizer_and_scheduler`: the critic, its optimizer and scheduler.

    Args:
        critic_model: a path / hub id of a token-classification model, a model, or `None` (initialised from the
            policy's weights, or from `args.critic_model_name_or_path` when set).
        Every other argument is `GRPOTrainer`'s.
    """

    _tag_names = ["trl", "synapo"]
    _name = "SynAPO"

    def __init__(self, model, reward_funcs=None, args: SynAPOConfig | None = None, *, critic_model=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SynAPOConfig(f"{name.split('/')[-1]}-SynAPO")
        if not isinstance(args, SynAPOConfig):
            raise TypeError(f"`args` must be a SynAPOConfig, got {type(args).__name__}")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
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
        self._warmup_done = 0
        self._critic_updates = 0
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
        generate_every = self.args.steps_per_generation * self.num_iterations
        trl_runs_old_logps = self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )
        self._capture_entropy = self.synapo.ea_gae_enabled and trl_runs_old_logps  # must match grpo_trainer.py:2641
        self._rollout_entropy = None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._capture_entropy = False
        if "old_per_token_logps" not in output:
            self._rollout_entropy = None  # whatever was captured was not the old-log-prob pass
        return output

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            while self._warmup_done < self.synapo.value_warmup_steps:  # VAPO's value pretraining
                self._synapo_stage(self._rollout(self._next_warmup_batch()), mode)
                self._warmup_done += 1
                logger.info("critic warm-up %d/%d", self._warmup_done, self.synapo.value_warmup_steps)
        output = self._rollout(inputs)
        self._synapo_stage(output, mode)
        return output

    def _next_warmup_batch(self):
        if self._warmup_iterator is None:
            self._warmup_iterator = iter(self.get_train_dataloader())
        try:
            return next(self._warmup_iterator)
        except StopIteration:
            self._warmup_iterator = iter(self.get_train_dataloader())
            return next(self._warmup_iterator)

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

    def _synapo_stage(self, output, mode: str) -> None:
        """Replace `output["advantages"]` by SynAPO's (B, T) advantages; in training, update the critic."""
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

        # Outcome score of each row (TRL's weighted sum, unscorable rows 0), on its last valid token
        rewards_per_func = self._rewards_per_func.to(device)
        all_scores = (rewards_per_func * self.reward_weights.to(device)).nansum(dim=1)
        scores = all_scores[offset : offset + B]
        valid = mask.sum(dim=1) > 0  # rows with no valid token (mask_truncated_completions) get no advantage
        last = T - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
        rewards = torch.zeros(B, T, device=device)
        rewards[torch.arange(B, device=device), last] = scores
        entropy = self._rollout_entropy_for(output, input_ids, attention_mask, mode) if params.ea_gae_enabled else None
        with torch.no_grad(), self.accelerator.autocast():
            values = critic_values(self.critic, input_ids, attention_mask, T)  # (B, T, H)

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
        advantages = torch.zeros(B, T, device=device)
        advantages[valid] = result.advantages.float()
        output["advantages"] = advantages * mask
        self._log_row_advantages(output["advantages"], mask)
        output["synapo_positive"] = scores >= params.scvl_threshold
        metrics = dict(result.metrics)
        if entropy is not None:
            metrics["ea_gae/entropy_mean"] = float((entropy * mask).sum() / mask.sum().clamp(min=1))
        if mode != "train":
            self._log_metrics(mode, metrics)
            return

        def full(x, fill=0.0):
            if x is None:
                return None
            out = torch.full((B, T), fill, dtype=x.dtype, device=device)
            out[valid] = x
            return out

        batch = CriticBatch(
            input_ids,
            attention_mask,
            mask.float(),
            full(result.returns.float()),
            values,
            full(None if result.global_returns is None else result.global_returns.float()),
            full(result.start_mask, False),
        )
        totals = {}
        if params.scvl_enabled:
            batch.sides, totals["critic/scvl_pairs"], scvl_metrics = self._scvl_scope(
                completion_ids, mask, valid, all_scores, values[..., 0], offset, num_generations
            )
            metrics.update(scvl_metrics)
        metrics.update(self._explained_variance(batch.returns, values[..., 0], mask))
        generator = torch.Generator().manual_seed(self.args.seed + self._critic_updates)
        metrics.update(
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
        metrics["critic/warmup_done"] = float(self._warmup_done)
        self._log_metrics(mode, metrics, totals)

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

    def _scvl_scope(self, completion_ids, mask, valid, all_scores, values, offset, num_generations):
        """SCVL sides for this process: pairs from its own rows when its groups are whole, else from all ranks'."""
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
            scores, group_ids, scope_world = all_scores, torch.arange(B * world) // num_generations, world
        else:
            scores, scope_world = all_scores[offset : offset + B], 1
            group_ids = (offset + torch.arange(B)) // num_generations
        keep = valid.nonzero().squeeze(1)
        sides, n_pairs = scvl_sides(
            self.synapo,
            completion_ids[keep],
            mask[keep],
            scores[keep],
            group_ids.to(keep.device)[keep],
            values[keep],
            local_index=local_index[keep],
            world_size=scope_world,
        )
        stats = scvl_group_stats(scores, group_ids.to(scores.device), threshold=self.synapo.scvl_threshold)
        metrics = {
            "synapo/scvl/groups_mixed": float(stats["groups_mixed"]) / scope_world,
            "synapo/scvl/groups_skipped": float(stats["groups"] - stats["groups_mixed"]) / scope_world,
        }
        return sides, n_pairs / scope_world, metrics

    @staticmethod
    def _explained_variance(returns, values, mask):
        m = mask.bool()
        target, residual = returns[m].double(), (returns - values)[m].double()
        var = target.var() if target.numel() > 1 else torch.zeros((), dtype=torch.float64)
        ev = 1.0 - residual.var() / var if var > 0 else torch.zeros((), dtype=torch.float64)
        return {
            "critic/explained_variance": float(ev),
            "critic/values_mean": float(values[m].mean()),
            "critic/returns_mean": float(target.mean()),
        }

    def _log_metrics(self, mode: str, means: dict[str, float], totals: dict[str, float] | None = None) -> None:
        """Append to TRL's metrics: `means` averaged over processes, `totals` summed (keys equal on every rank)."""
        for reduce, values in (("mean", means), ("sum", totals or {})):
            if not values:
                continue
            names = sorted(values)
            local = torch.tensor([float(values[n]) for n in names], device=self.accelerator.device)
            gathered = self.accelerator.gather(local).view(-1, len(names))
            reduced = gathered.mean(0) if reduce == "mean" else gathered.sum(0)
            for name, value in zip(names, reduced.tolist(), strict=True):
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

    # --- saving -----------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """TRL's `save_model`, plus the critic in `<output_dir>/critic/` (safetensors; `from_pretrained` loads it)."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_critic_state(output_dir or self.args.output_dir, self.critic)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)  # calls save_model: the critic's weights are there already
        if self.args.should_save:
            checkpoint = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            counters = {"warmup_done": self._warmup_done, "critic_updates": self._critic_updates}
            save_critic_state(
                checkpoint, self.critic, self.critic_optimizer, self.critic_scheduler, counters, weights=False
            )

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            counters = load_critic_state(checkpoint, self.critic, self.critic_optimizer, self._critic_lr_scheduler())
            if counters is not None:
                self._warmup_done = counters["warmup_done"]
                self._critic_updates = counters["critic_updates"]
