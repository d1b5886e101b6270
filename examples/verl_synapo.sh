#!/usr/bin/env bash
# SynAPO on stock verl 0.9.1: a small GSM8K run on ONE GPU (not run in this repository's CI: no GPU there).
#
#   pip install -e ".[verl]"   # from a clone (or "synapo-ext[verl]" once on PyPI): verl==0.9.1 + TransferQueue
#   pip install "verl[fsdp,vllm]==0.9.1"                 # GPU extras: flash-attn (the value model needs it), vLLM
#   python verl/examples/data_preprocess/gsm8k.py --local_save_dir ~/data/gsm8k   # from verl's repository
#   PRESET=vapo bash examples/verl_synapo.sh             # presets: synapo (default), vapo, ppo,
#                                                        #   synapo-no-hvm, synapo-no-scvl, synapo-no-eagae
#
# What the plugin maps onto verl (one key, +algorithm.synapo.preset): trainer.critic_warmup (value warm-up),
# actor clip_ratio_low/high (clip-higher), loss_agg_mode=token-mean, algorithm.gamma/lam, critic.enable=True,
# the two-head critic (HVM), the SCVL hinge and the positive-example LM loss. Group sampling is rollout.n (>= 2).
# Override any SynAPO parameter with +algorithm.synapo.<name>=... (see synapo_ext.core.SynAPOParams).
# Where entry points are disabled: export VERL_USE_EXTERNAL_MODULES=synapo_ext.patches.verl_plugin
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
DATA=${DATA:-$HOME/data/gsm8k}
PRESET=${PRESET:-synapo}

python -m verl.trainer.main_ppo \
    algorithm.adv_estimator=synapo \
    +algorithm.synapo.preset="$PRESET" \
    +algorithm.synapo.value_warmup_steps=10 \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=64 \
    data.max_prompt_length=512 \
    data.max_response_length=512 \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=32 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=4 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    critic.model.path="$MODEL" \
    critic.model.use_remove_padding=True \
    critic.model.enable_gradient_checkpointing=True \
    critic.optim.lr=1e-5 \
    critic.ppo_micro_batch_size_per_gpu=8 \
    trainer.n_gpus_per_node=1 \
    trainer.nnodes=1 \
    trainer.total_epochs=1 \
    trainer.test_freq=10 \
    trainer.save_freq=-1 \
    trainer.logger='["console"]' \
    trainer.project_name=synapo \
    trainer.experiment_name="gsm8k-qwen2.5-0.5b-$PRESET" \
    "$@"
