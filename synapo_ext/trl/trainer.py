"""`SynAPOTrainer`: value-based PPO (VAPO / SynAPO) on TRL's GRPO pipeline.

References: docs/spec.md; VAPO, arXiv 2504.05118; TRL issue #4525 (custom advantages through a
`GRPOTrainer` subclass overriding `_generate_and_score_completions`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math

import torch
from transformers import get_scheduler
from trl import GRPOTrainer

from ..core import METRICS, boundary_table_from_tokenizer, positive_lm_loss
from ._compat import check_hooks, check_old_logps_condition, check_rollout_output, trl_runs_old_logps
from ._spelling import RENAMED_TRAINER_KEYWORDS, one_of, unknown_keyword_message
from .checkpoint import CheckpointMixin
from .config import SynAPOConfig
from .critic import build_critic
from .critic_arch import wrap_critic_lora
from .critic_weights import init_critic_meta, init_critic_zero3
from .distributed import PreparedCritic, critic_backend, prepare_critic, zero_stage
from .stage import LM_WEIGHT, REWARDS_NONFINITE, SynAPOStageMixin, screen_rewards
from .tree import TreeRolloutMixin
from .trunk import SharedTrunkMixin
from .warmup import ValueWarmupMixin, follow_log_level

__all__ = ["SynAPOTrainer"]

logger = logging.getLogger(__name__)

check_hooks(GRPOTrainer)  # the private methods wrapped below (synapo_ext/trl/_compat.py states each assumption)
check_old_logps_condition(GRPOTrainer)

TRAINER_PARAMETERS = (
    *inspect.signature(GRPOTrainer.__init__).parameters,
    "critic_model",
    "critic_peft_config",
    "config",
    "tokenizer",
)[1:]


class SynAPOTrainer(
    SharedTrunkMixin, TreeRolloutMixin, ValueWarmupMixin, SynAPOStageMixin, CheckpointMixin, GRPOTrainer
):
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
    - `_generate_single_turn` (with `rollout_tree_roots > 0`, training rollouts only): grows each prompt's group as
      segment trees (`synapo_ext.trl.tree`), and `_core_stage` takes the advantages and critic targets from the
      tree's Monte-Carlo values (`core.compute_tree_advantages`); the tokens generated are counted in
      `rollout_token_counts` and logged (`rollout/generated_tokens`) with or without trees.
    - `_calculate_rewards`: keeps the raw rewards (TRL's output holds only normalised advantages).
    - `_compute_loss`: adds the core's positive-example LM loss (`positive_lm_coef` * mean NLL of the correct
      responses' tokens, "correct" by `positive_lm_threshold`).
    - `_prepare_for_training`: after the policy is prepared, the critic is prepared beside it through
      `synapo_ext.trl.distributed.prepare_critic` as accelerate runs the policy: DDP, FSDP2 (a critic initialised
      from the policy is built on the meta device and seeded shard by shard) or DeepSpeed ZeRO-2/3 (an engine of
      its own); in one process the critic is the module itself. `critic` is then what to call (the wrapper).
    - `save_model`, `_save_checkpoint`, `_load_optimizer_and_scheduler`: the critic, its optimizer, scheduler and
      counters, written complete-or-absent after TRL's part of a checkpoint (TRL's rotation of old checkpoints waits
      for it); under FSDP2 / DeepSpeed the weights and optimizer in their sharded layout (`critic_sharded/`) plus a
      plain safetensors export; `train` refuses to resume from a checkpoint whose critic part is missing or partial.
    - `critic_trunk="shared"` (`SharedTrunkMixin`, synapo_ext/trl/trunk.py): the critic is value heads on the policy's
      own last hidden states instead of a second model.

    Args:
        critic_model: a path / hub id of a token-classification model, a model, or `None` (initialised from the
            policy's weights, a PEFT policy's base weights, or from `args.critic_model_name_or_path` when set).
            Built here, it is the model type's `*ForTokenClassification` class, or a value head on its `AutoModel`
            backbone where transformers has none (`critic_arch.critic_class`).
        critic_peft_config: a `peft.PeftConfig` (e.g. `LoraConfig`) to wrap the critic with: a frozen backbone with
            trained adapters and a trained value head (less optimizer memory); its checkpoints hold the adapter and
            the head (`critic/adapter_model.safetensors`). One process or DDP (not FSDP2 / DeepSpeed).
        config: the research write-up's name of `args` (a `SynAPOConfig`).
        tokenizer: the research write-up's name of `processing_class`.
        Every other argument is `GRPOTrainer`'s; any other keyword is refused with what to write instead.
    """

    _tag_names = ["trl", "synapo"]
    _name = "SynAPO"
    _paper = {}  # no paper to cite (GRPOTrainer's is DeepSeekMath's); the model card says what SynAPO is instead

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
        critic_peft_config=None,
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
        if args is None:  # as GRPOTrainer: "<model name>-GRPO"
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
            args = SynAPOConfig(f"{name.split('/')[-1]}-SynAPO")
        if not isinstance(args, SynAPOConfig):
            raise TypeError(f"`args` (or `config`) must be a SynAPOConfig, got {type(args).__name__}")
        follow_log_level(args)
        # GRPOTrainer's first six parameters, in its order (the TRL release is checked on import, _compat.py)
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, processing_class, **kwargs)
        self.synapo = args.synapo_params()
        policy = self.accelerator.unwrap_model(self.model)
        critic_model = critic_model if critic_model is not None else args.critic_model_name_or_path
        self._critic_backend = critic_backend(self.accelerator)  # single, ddp, fsdp2 or deepspeed
        self._critic_from_policy = False  # seeded from the prepared policy by prepare_critic (fsdp2 / ZeRO-3)
        self._critic: PreparedCritic | None = None  # set by _prepare_critic
        if critic_peft_config is not None and self._critic_backend in ("fsdp2", "deepspeed"):
            raise NotImplementedError(
                f"`critic_peft_config` (a PEFT-wrapped critic) runs in one process or under DDP, not under "
                f"{self._critic_backend}: leave it out (the critic is then trained whole, sharded as the policy)"
            )
        self.critic = self._build_critic(critic_model, policy, num_heads=2 if self.synapo.hvm_enabled else 1)
        if critic_peft_config is not None and args.critic_trunk == "shared":
            raise ValueError(
                "`critic_peft_config` adapts a separate critic model, but critic_trunk='shared' puts the value heads "
                "on the policy: set one of them"
            )
        if critic_peft_config is not None:
            self.critic = wrap_critic_lora(self.critic, critic_peft_config)
        self.critic_optimizer = None  # prepare_critic's raw AdamW (single: built here; else once the policy is)
        self.critic_scheduler = None  # built once the number of steps is known (_critic_lr_scheduler)
        if self._critic_backend == "single":
            self._prepare_critic()
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
        self._warned_infinite: set[str] = set()  # reward functions already warned about for an infinite reward

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

    def _critic_mini_batch(self) -> int:
        """Rows per critic step on this process: `critic_mini_batch_size` (default the per-device batch), at most
        the process's rollout batch."""
        args = self.args
        local_batch = args.per_device_train_batch_size * args.steps_per_generation
        return min(args.critic_mini_batch_size or args.per_device_train_batch_size, local_batch)

    def _build_critic(self, critic_model, policy, *, num_heads: int):
        """The critic before `prepare_critic`: under FSDP2 (and ZeRO-3) a critic initialised from the policy is built
        without memory (meta device; ZeRO-3: partitioned by `deepspeed.zero.Init`) and seeded later, shard by shard,
        from the prepared policy; otherwise `build_critic` (a path or a model is loaded whole on each rank). With
        `critic_trunk="shared"`: value heads on the policy (`trunk.TrunkCritic`)."""
        if self.args.critic_trunk == "shared":
            return self._build_trunk_critic(critic_model, policy, num_heads=num_heads)
        if critic_model is None and self._critic_backend == "fsdp2":
            self._critic_from_policy = True
            return init_critic_meta(policy.config, num_heads=num_heads)
        if critic_model is None and self._critic_backend == "deepspeed" and zero_stage(self.accelerator) == 3:
            self._critic_from_policy = True
            return init_critic_zero3(
                self.accelerator,
                policy.config,
                num_heads=num_heads,
                micro_batch_size=self._critic_mini_batch(),
                max_grad_norm=self.args.critic_max_grad_norm,
            )
        return build_critic(critic_model, policy, num_heads=num_heads).to(self.accelerator.device)

    def _prepare_critic(self) -> PreparedCritic:
        """The critic, its raw AdamW (the policy's Adam betas and epsilon) and wrapper, through `prepare_critic` as
        accelerate runs the policy; once (FSDP2 / DeepSpeed / DDP: after the policy is prepared, see
        `_prepare_for_training`). Sets `critic` (what to call: the wrapper) and `critic_optimizer`."""
        if self._critic is None and self.args.critic_trunk == "shared":  # the heads on the policy: a plain AdamW
            self._critic = self._prepare_trunk_critic()
            self.critic_optimizer = self._critic.optimizer
        if self._critic is None:
            args = self.args
            checkpointing = bool(args.activation_checkpointing or args.gradient_checkpointing)
            policy = self.model_wrapped if self._critic_from_policy else None
            self._critic = prepare_critic(
                self.accelerator,
                self.critic,
                learning_rate=args.critic_learning_rate,
                weight_decay=args.critic_weight_decay,
                policy=policy,
                gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs=args.activation_checkpointing_kwargs
                or args.gradient_checkpointing_kwargs,
                micro_batch_size=self._critic_mini_batch(),
                max_grad_norm=args.critic_max_grad_norm,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
            )
            self.critic, self.critic_optimizer = self._critic.model, self._critic.optimizer
        return self._critic

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """transformers' set-up (the policy prepared), then the critic prepared beside it (it may already be, by
        `_load_optimizer_and_scheduler` when resuming)."""
        out = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        self._prepare_critic()
        return out

    def _critic_lr_scheduler(self):
        if self.critic_scheduler is None:
            self._prepare_critic()
            args = self.args
            max_steps = args.max_steps if args.max_steps > 0 else max(self.state.max_steps, 1)
            generate_every = args.steps_per_generation * self.num_iterations
            rollouts = math.ceil(max_steps * args.gradient_accumulation_steps / generate_every)
            local_batch = args.per_device_train_batch_size * args.steps_per_generation
            per_rollout = args.critic_epochs * math.ceil(local_batch / self._critic_mini_batch())
            self.critic_scheduler = get_scheduler(
                args.critic_lr_scheduler_type,
                self._critic.base_optimizer,
                num_warmup_steps=0,
                num_training_steps=(rollouts + self.synapo.value_warmup_steps) * per_rollout,
            )
        return self.critic_scheduler

    # --- rollout ----------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (every process's rows), kept raw for the stage, with +-inf treated as missing (NaN, as
        None is): counted in `synapo/rewards_nonfinite`, and a WARNING naming the reward function the first time it
        returns one. A finite reward too large for the critic's float32 loss is an error naming the function."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        rewards, infinite = screen_rewards(rewards, self.reward_weights, self.reward_func_names)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][REWARDS_NONFINITE].append(float(sum(infinite.values())))
        for name, count in infinite.items():
            if name not in self._warned_infinite and self.accelerator.is_main_process:
                logger.warning(
                    "reward function %r returned %d infinite reward(s) in this batch: treated as missing (like None: "
                    "the row is scored by the other reward functions, or left out and counted in %s); later ones are "
                    "only counted, in %s",
                    name,
                    count,
                    METRICS.rows_unscored,
                    REWARDS_NONFINITE,
                )
            self._warned_infinite.add(name)
        self._rewards_per_func = rewards
        return rewards

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

    # --- the SynAPO stage -------------------------------------------------------------------------------------

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

    @staticmethod
    def get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold):
        """TRL's off-policy sequence mask (DeepSeek-V3.2, `off_policy_mask_threshold`) with its rule kept per
        sequence: keep a sequence if its advantage is >= 0 or its mean KL(pi_old || pi) is <= the threshold, where a
        sequence's advantage is the mean of its (B, T) advantages over `mask`'s tokens. Returns (B, 1)."""
        if advantages.dim() == 2 and advantages.size(1) > 1:
            advantages = (advantages * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        return GRPOTrainer.get_off_policy_mask(
            advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold
        )

    def _compute_loss(self, model, inputs):
        coef = self.synapo.positive_lm_coef
        self._capture_logps, self._kept_logps = coef > 0, None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._capture_logps = False
        logps, self._kept_logps = self._kept_logps, None
        if coef > 0 and logps is not None and LM_WEIGHT in inputs:
            # VAPO's positive-example LM loss: coef * mean NLL over this micro-batch's correct responses' tokens
            mask = inputs["completion_mask"]
            mask = mask * inputs["tool_mask"] if "tool_mask" in inputs else mask
            lm_loss = positive_lm_loss(logps, mask, inputs[LM_WEIGHT])
            mode = "train" if self.model.training else "eval"
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + lm_loss / accumulation
            metric = self.accelerator.gather(lm_loss.detach()).mean().item()
            self._metrics[mode][METRICS.positive_lm_loss].append(metric)
        return loss


def _gather_names(accelerator, values: dict[str, float]) -> set[str]:
    """The union of the metric names every process holds (they differ when a process had no row to learn from)."""
    if accelerator.num_processes == 1:
        return set(values)
    from accelerate.utils import gather_object

    return set().union(*gather_object([sorted(values)]))
