"""What every `GRPOConfig` field does with `SynAPOTrainer`: the table behind docs/trl_features.md.

Each field of TRL's `GRPOConfig` (its own and the `transformers.TrainingArguments` it extends) has one row:

- `supported`: it works with SynAPO's (B, T) advantages and the tests named in the row run it on the tiny model;
- `refused`: `SynAPOConfig` refuses it at construction with an error naming the field (`refused_value` is one value
  it refuses);
- `no effect`: TRL's or transformers' handling is unchanged and SynAPO's part (the critic, the advantages, the
  positive-example LM loss) does not read it; the note says why that is right;
- `not run here`: a path that needs hardware or packages the tests do not have (vLLM, DeepSpeed); the note says what
  SynAPO does on it.

`tests/trl/test_feature_table.py` fails when the installed `GRPOConfig` has a field the table does not classify, when a
named test does not exist, when a refused value is accepted, and when docs/trl_features.md is not `render_markdown()`
(regenerate it with `python -m synapo_ext.trl.features > docs/trl_features.md`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FEATURES", "STATUSES", "Feature", "render_markdown"]

STATUSES = ("supported", "refused", "no effect", "not run here")


@dataclass(frozen=True)
class Feature:
    """One row of the table: a status (one of `STATUSES`), why, and the tests (`tests/trl` function names) that run
    it (`supported`) or the value the config refuses (`refused`)."""

    status: str
    note: str
    tests: tuple[str, ...] = ()
    refused_value: object = None


def _rows(names: str, feature: Feature) -> dict[str, Feature]:
    return dict.fromkeys(names.split(), feature)


_LOSS = ("test_loss_types_on_synapo_advantages",)
_RUN = ("test_grpo_options_in_one_run",)
_CONV = ("test_conversational_streaming_lora_run",)
_VLLM_NOTE = "vLLM generation (TRL's `use_vllm`); cannot run here. What SynAPO does on it: see 'vLLM' below the table."
_OPTIM_NOTE = (
    "the policy's optimizer and schedule, as for GRPOTrainer; the critic has its own (`critic_learning_rate`, "
    "`critic_lr_scheduler_type`, `critic_weight_decay`, `critic_max_grad_norm`)"
)

FEATURES: dict[str, Feature] = {
    # --- GRPOConfig's own fields --------------------------------------------------------------------------------
    **_rows(
        "model_init_kwargs trust_remote_code",
        Feature("no effect", "how TRL loads a policy given by name; the critic copies the loaded policy"),
    ),
    "router_aux_loss_coef": Feature("no effect", "a mixture-of-experts policy's auxiliary loss; the critic has none"),
    "disable_dropout": Feature(
        "no effect",
        "the policy's (and reference's) dropout; the critic has none before its head and reads values in eval mode",
    ),
    "cast_lm_head_to_fp32": Feature("no effect", "the policy's LM head; the critic has no LM head"),
    "num_generations": Feature(
        "supported", "the group size: SCVL pairs and the group layout are per prompt", ("test_train_every_preset",)
    ),
    "num_generations_eval": Feature("supported", "eval rollouts' group size (the stage reads it in eval)", _RUN),
    "max_completion_length": Feature("supported", "T of the (B, T) advantages", ("test_train_every_preset",)),
    "ds3_gather_for_generation": Feature(
        "not run here", "DeepSpeed ZeRO-3 generation of the policy; the critic is not involved"
    ),
    "shuffle_dataset": Feature("no effect", "the order of prompts; groups stay whole"),
    "pad_to_multiple_of": Feature("no effect", "padding; SynAPO reads the completion mask, not the padded length"),
    **_rows(
        "generation_batch_size steps_per_generation",
        Feature("supported", "the rollout batch (the critic trains on it whole, in critic mini-batches)", _RUN),
    ),
    **_rows(
        "temperature",
        Feature(
            "supported",
            "sampling; TRL's log-probs and the entropy EA-GAE reads are of the temperature-scaled policy",
            ("test_train_every_preset",),
        ),
    ),
    **_rows(
        "top_p top_k min_p generation_kwargs repetition_penalty cache_implementation",
        Feature("no effect", "sampling options of generation; SynAPO sees only the sampled tokens"),
    ),
    "chat_template_kwargs": Feature("supported", "conversational prompts (TRL applies the chat template)", _CONV),
    **_rows(
        "use_vllm vllm_mode vllm_model_impl vllm_enable_sleep_mode vllm_structured_outputs_regex "
        "vllm_server_base_url vllm_server_host vllm_server_port vllm_server_timeout vllm_group_port "
        "vllm_gpu_memory_utilization vllm_max_model_length vllm_tensor_parallel_size",
        Feature("not run here", _VLLM_NOTE),
    ),
    **_rows(
        "vllm_importance_sampling_correction vllm_importance_sampling_mode vllm_importance_sampling_clip_max "
        "vllm_importance_sampling_clip_min vllm_importance_sampling_cap",
        Feature(
            "not run here",
            "vLLM's truncated importance sampling: TRL multiplies SynAPO's per-token policy loss by the ratio, and "
            "its old-log-prob pass (which this turns on) gives EA-GAE's entropy",
            ("test_vllm_importance_sampling_scales_the_policy_loss",),
        ),
    ),
    **_rows(
        "beta use_bias_correction_kl",
        Feature("supported", "TRL's KL penalty to the reference model, in the policy loss (not in the rewards)", _RUN),
    ),
    **_rows(
        "sync_ref_model ref_model_mixup_alpha ref_model_sync_steps",
        Feature("supported", "TRL's reference-model sync (a callback); the critic is not the reference", _RUN),
    ),
    "num_iterations": Feature(
        "supported", "policy updates per rollout batch (`ppo_epochs` is its alias); the critic: `critic_epochs`", _RUN
    ),
    **_rows(
        "epsilon epsilon_high delta",
        Feature(
            "supported", "the clip range (clip-higher: epsilon_high, the preset's 0.28) and two-sided clip", _LOSS
        ),
    ),
    "loss_type": Feature(
        "supported",
        "every TRL loss (grpo, bnpo, dr_grpo, dapo (default: VAPO's token-level loss), luspo, cispo, sapo, vespo) "
        "on SynAPO's per-token advantages; sapo's temperature and vespo's (k, lambda) are chosen by each token's "
        "advantage sign",
        _LOSS,
    ),
    **_rows(
        "sapo_temperature_neg sapo_temperature_pos vespo_k_pos vespo_lambda_pos vespo_k_neg vespo_lambda_neg",
        Feature("supported", "parameters of the sapo / vespo losses", _LOSS),
    ),
    "importance_sampling_level": Feature("supported", "token or sequence (GSPO) ratio in the policy loss", _LOSS),
    "reward_weights": Feature(
        "supported", "SynAPO's score is sum_k reward_weights[k] * reward_k (raw values, NaN skipped)", _RUN
    ),
    "multi_objective_aggregation": Feature(
        "refused",
        "only 'sum_then_normalize': the score is the weighted sum of raw rewards and the normalisation is the "
        "critic's baseline and `whiten_advantages`; 'normalize_then_sum' (GDPO) would make the score group-relative",
        ("test_grpo_reward_normalisation_is_refused_by_name",),
        "normalize_then_sum",
    ),
    "scale_rewards": Feature(
        "refused",
        "defaults to 'none' here; 'group' / 'batch' scale GRPO's group-relative advantages, SynAPO's come from a "
        "critic and are scaled by `whiten_advantages`",
        ("test_grpo_reward_normalisation_is_refused_by_name",),
        "group",
    ),
    "mask_truncated_completions": Feature(
        "supported", "a truncated row has no valid token: no advantage, no critic target, no SCVL pair", _RUN
    ),
    **_rows(
        "top_entropy_quantile entropy_coef use_adaptive_entropy entropy_coef_min entropy_coef_max entropy_coef_delta "
        "entropy_target",
        Feature(
            "supported", "TRL's entropy mask and entropy bonus in the policy loss; EA-GAE's entropy is apart", _RUN
        ),
    ),
    "max_tool_calling_iterations": Feature(
        "supported",
        "multi-turn tool calls: tool-output tokens (TRL's `tool_mask`) get no advantage, no critic target, and an "
        "SCVL pair whose first divergence is a tool-output token is dropped (also `rollout_func`'s `env_mask`)",
        ("test_tool_calling_multi_turn_run", "test_tool_output_tokens_are_masked"),
    ),
    "off_policy_mask_threshold": Feature(
        "supported",
        "kept per sequence: a sequence is dropped when its mean advantage over valid tokens is < 0 and its mean KL "
        "exceeds the threshold",
        ("test_off_policy_mask_stays_per_sequence", *_RUN),
    ),
    **_rows(
        "log_completions log_multimodal num_completions_to_print log_unique_prompts log_completions_hub_repo",
        Feature("no effect", "logging; the completions table shows each row's mean SynAPO advantage"),
    ),
    **_rows(
        "use_transformers_continuous_batching transformers_continuous_batching_config use_transformers_paged",
        Feature("not run here", "transformers' continuous-batching generation; the rollout reaches SynAPO unchanged"),
    ),
    # --- transformers.TrainingArguments ------------------------------------------------------------------------
    **_rows(
        "output_dir save_strategy save_steps save_total_limit",
        Feature(
            "supported",
            "checkpoints hold the critic (`critic/`), written after TRL's part; rotation waits for it",
            ("test_resume_restores_the_critic_exactly",),
        ),
    ),
    **_rows(
        "per_device_train_batch_size max_steps learning_rate logging_steps seed use_cpu report_to disable_tqdm",
        Feature("supported", "as for GRPOTrainer (every test's trainer sets them)", ("test_train_every_preset",)),
    ),
    "gradient_accumulation_steps": Feature(
        "supported",
        "the policy's accumulation; the critic steps per critic mini-batch",
        ("test_critic_moves_under_gradient_accumulation",),
    ),
    **_rows(
        "num_train_epochs lr_scheduler_type lr_scheduler_kwargs warmup_steps optim optim_args weight_decay "
        "optim_target_modules max_grad_norm",
        Feature("no effect", _OPTIM_NOTE),
    ),
    **_rows(
        "adam_beta1 adam_beta2 adam_epsilon",
        Feature("supported", "the policy's Adam and the critic's AdamW share them", ("test_train_every_preset",)),
    ),
    **_rows(
        "eval_strategy eval_steps per_device_eval_batch_size eval_on_start do_eval",
        Feature(
            "supported", "eval rollouts get SynAPO's advantages and critic metrics; the critic does not train", _RUN
        ),
    ),
    **_rows(
        "bf16 fp16 bf16_full_eval fp16_full_eval tf32",
        Feature("no effect", "mixed precision: the critic runs under the trainer's autocast, as the policy"),
    ),
    **_rows(
        "activation_checkpointing activation_checkpointing_kwargs gradient_checkpointing "
        "gradient_checkpointing_kwargs",
        Feature("no effect", "applied to the policy and, by SynAPOTrainer, to the critic"),
    ),
    **_rows(
        "torch_compile torch_compile_backend torch_compile_mode use_liger_kernel liger_kernel_config use_cache "
        "neftune_noise_alpha torch_empty_cache_steps label_smoothing_factor average_tokens_across_devices",
        Feature("no effect", "the policy's model / kernels; SynAPO's stage and critic are unchanged"),
    ),
    "auto_find_batch_size": Feature("no effect", "GRPOConfig refuses it itself (groups must stay whole)"),
    **_rows(
        "logging_strategy logging_first_step log_on_each_node logging_nan_inf_filter include_num_input_tokens_seen "
        "log_level log_level_replica run_name project trackio_space_id trackio_bucket_id trackio_static_space_id",
        Feature("no effect", "logging: SynAPO's metrics join TRL's"),
    ),
    **_rows(
        "eval_delay prediction_loss_only eval_do_concat_batches eval_use_gather_object eval_accumulation_steps "
        "include_for_metrics batch_eval_metrics",
        Feature("no effect", "evaluation loop details; GRPO's evaluation is a loss over eval rollouts"),
    ),
    **_rows(
        "save_only_model save_on_each_node enable_jit_checkpoint push_to_hub hub_token hub_private_repo hub_model_id "
        "hub_strategy hub_always_push hub_revision",
        Feature("no effect", "saving / the hub: the policy as TRL saves it; the critic is written beside it"),
    ),
    **_rows(
        "load_best_model_at_end metric_for_best_model greater_is_better",
        Feature("no effect", "the policy's best checkpoint is reloaded; the critic stays the last one"),
    ),
    **_rows(
        "ignore_data_skip restore_callback_states_from_checkpoint resume_from_checkpoint",
        Feature("no effect", "resuming: the critic part is restored with TRL's (and required complete)"),
    ),
    **_rows(
        "full_determinism data_seed accelerator_config parallelism_config dataloader_drop_last dataloader_num_workers "
        "dataloader_pin_memory dataloader_persistent_workers dataloader_prefetch_factor "
        "dataloader_multiprocessing_context dataloader_in_order remove_unused_columns label_names "
        "train_sampling_strategy length_column_name",
        Feature("no effect", "data loading and seeding of the prompts; SynAPO sees the rollout batch"),
    ),
    **_rows(
        "ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph ddp_backend ddp_timeout "
        "local_rank",
        Feature("no effect", "data parallelism of the policy; the critic is wrapped beside it (docs/trl_at_scale.md)"),
    ),
    **_rows(
        "fsdp fsdp_config deepspeed",
        Feature("not run here", "FSDP2 / DeepSpeed: the critic is sharded as the policy (docs/trl_at_scale.md)"),
    ),
    **_rows(
        "debug skip_memory_metrics do_train do_predict",
        Feature("no effect", "transformers' run flags; not read by SynAPO"),
    ),
}

_INTRO = """# GRPOConfig fields with SynAPOTrainer

Every field of TRL's `GRPOConfig` (its own, then those of `transformers.TrainingArguments`), and what it does when
`SynAPOTrainer` runs: **supported** (works with SynAPO's per-token advantages; the tests named run it),
**refused** (`SynAPOConfig` stops at construction with an error naming the field), **no effect** (TRL's or
transformers' handling is unchanged and SynAPO's part does not read it), **not run here** (needs vLLM, DeepSpeed or
several GPUs). Generated from `synapo_ext/trl/features.py` (`python -m synapo_ext.trl.features >
docs/trl_features.md`); `tests/trl/test_feature_table.py` fails when TRL adds a field the table does not classify.

"Correct" for SCVL's pairs and the positive-example LM loss is a score >= `scvl_threshold` and >=
`positive_lm_threshold` (`SynAPOConfig` fields, both default 0.5, fit for 0/1 rewards: set them for reward-model
scores). PEFT: with a LoRA policy (`peft_config=` or a `PeftModel`) the critic starts from the base model's weights;
`critic_peft_config=LoraConfig(...)` makes the critic a LoRA model too (frozen backbone, trained adapters and value
head; checkpoints hold `critic/adapter_model.safetensors`; one process or DDP).

"""

_VLLM = """
## vLLM

`use_vllm=True` (colocate or server) cannot run in this project's tests; from TRL 1.16's code path
(`GRPOTrainer._generate_and_score_completions`, `_compute_loss`), with SynAPOTrainer:

- **Old log-probs**: with `vllm_importance_sampling_correction` (TRL's default) TRL always runs its no-grad
  old-log-prob pass with the training policy; SynAPOTrainer asks that pass for the entropy too (`_compat.py`,
  assumption 3), so EA-GAE's entropy is the training policy's, not vLLM's sampler's. Without the correction, and with
  no old-log-prob pass, SynAPO runs one extra no-grad forward for the entropy (as without vLLM).
- **Importance-sampling correction**: TRL multiplies the per-token policy loss by the truncated (or masked) ratio
  pi_old / pi_vllm, token- or sequence-level (`vllm_importance_sampling_mode`); SynAPO's advantages are per token, so
  the product is per token either way. The critic's loss and the positive-example LM loss are not reweighted: the
  critic regresses the returns of the sampled tokens. The test `test_vllm_importance_sampling_scales_the_policy_loss`
  runs TRL's multiplication with a given ratio (the part that needs no vLLM).
- **Weights**: vLLM receives the policy's weights as in GRPO; the critic never goes to vLLM.
"""


def render_markdown() -> str:
    """docs/trl_features.md: the table, GRPOConfig's own fields first, then TrainingArguments' (alphabetical)."""
    import dataclasses

    from transformers import TrainingArguments

    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = sorted(name for name in FEATURES if name not in trainer_fields)
    inherited = sorted(name for name in FEATURES if name in trainer_fields)
    lines = [_INTRO.rstrip("\n"), ""]
    for title, names in (("GRPOConfig's own fields", own), ("TrainingArguments fields", inherited)):
        lines += [f"## {title}", "", "| field | status | what SynAPOTrainer does | tests |", "|---|---|---|---|"]
        for name in names:
            f = FEATURES[name]
            tests = ", ".join(f"`{t}`" for t in f.tests)
            note = f.note + (f" (refused e.g.: `{f.refused_value!r}`)" if f.status == "refused" else "")
            lines.append(f"| `{name}` | {f.status} | {note} | {tests} |")
        lines.append("")
    return "\n".join(lines) + _VLLM


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_markdown())
