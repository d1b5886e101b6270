"""GRPOTrainer's feature families on SynAPOTrainer (tiny model, CPU), a few short runs that each combine several:
loss types and importance-sampling levels on one rollout; one run with num_iterations / steps_per_generation, eval,
a reward model beside a reward function with weights, a reference model (beta, sync), entropy options,
mask_truncated_completions and the off-policy mask; one with conversational prompts from a streaming dataset and a
LoRA policy; a multi-turn rollout with tool-output tokens; the part of vLLM's path that runs without vLLM."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("trl")

from datasets import IterableDataset  # noqa: E402

from synapo_ext.core import METRICS  # noqa: E402
from synapo_ext.trl import stage  # noqa: E402
from synapo_ext.trl._compat import trl_runs_old_logps  # noqa: E402
from synapo_ext.trl.update import HELDOUT_VF_LOSS  # noqa: E402

from .tiny import first_char_reward, make_dataset, make_policy, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.trl

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")


def test_loss_types_on_synapo_advantages(make_trainer, rollout_inputs):
    # ppo preset: no positive-example LM term, so the loss is TRL's policy loss on SynAPO's (B, T) advantages
    trainer = make_trainer("ppo", delta=2.0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions(rollout_inputs(trainer))
    advantages, mask = inputs["advantages"], inputs["completion_mask"].float()
    assert advantages.shape == mask.shape
    for loss_type in LOSS_TYPES:
        for level in ("token", "sequence"):
            trainer.loss_type, trainer.importance_sampling_level = loss_type, level
            trainer.model.zero_grad()
            loss = trainer._compute_loss(trainer.model, inputs)
            loss.backward()
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            assert torch.isfinite(loss) and grads and any(g.abs().sum() > 0 for g in grads), (loss_type, level)
            if loss_type == "grpo":  # on policy the ratio is 1: minus each row's mean advantage, averaged
                expected = -((advantages * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
                torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
            if loss_type == "dapo":  # minus the token sum over TRL's token count
                expected = -(advantages * mask).sum() / inputs["num_items_in_batch"]
                torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def _reward_model(tokenizer):
    from transformers import Qwen2ForSequenceClassification

    policy = make_policy(tokenizer, seed=3)
    config = policy.config
    config.num_labels = 1
    return Qwen2ForSequenceClassification(config)


def test_grpo_options_in_one_run(make_trainer, tokenizer, monkeypatch, tmp_path):
    # beta > 0: TRL loads the reference model from the policy's path, so the policy is given as a saved model
    make_policy(tokenizer).save_pretrained(tmp_path / "policy")
    seen = []
    real = stage.compute_synapo_advantages

    def spy(params, **kwargs):
        seen.append({**kwargs, "rewards_per_func": trainer._rewards_per_func.clone()})
        return real(params, **kwargs)

    monkeypatch.setattr(stage, "compute_synapo_advantages", spy)
    trainer = make_trainer(
        "synapo",
        reward_funcs=[first_char_reward, _reward_model(tokenizer)],
        model=str(tmp_path / "policy"),
        model_init_kwargs={"dtype": "float32"},
        trainer_kwargs={"reward_processing_classes": [None, tokenizer], "eval_dataset": make_dataset(4, seed=2)},
        reward_weights=[1.0, 0.5],
        per_device_train_batch_size=4,
        steps_per_generation=2,  # a rollout of 8 rows serves 2 x 2 optimizer steps (num_iterations 2)
        num_iterations=2,
        max_steps=4,
        mask_truncated_completions=True,
        beta=0.04,
        use_bias_correction_kl=True,
        sync_ref_model=True,
        ref_model_sync_steps=2,
        top_entropy_quantile=0.5,
        entropy_coef=0.01,
        use_adaptive_entropy=True,
        entropy_target=1.0,
        off_policy_mask_threshold=0.5,
        eval_strategy="steps",
        eval_steps=4,
        per_device_eval_batch_size=4,
        num_generations_eval=2,
    )
    trainer.train()
    assert trainer.state.global_step == 4 and trainer._critic_updates == 1  # one rollout, four policy steps
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"kl", "entropy_coef", f"eval_{HELDOUT_VF_LOSS}", "eval_loss"} <= logged, sorted(logged)
    assert any(k.endswith(f"{METRICS.vf_loss}") and not k.startswith("eval_") for k in logged)
    # the score is the weighted sum of the raw rewards (a function's 0/1 and the reward model's real value)
    train = seen[0]
    expected = (train["rewards_per_func"] * torch.tensor([1.0, 0.5])).nansum(1)
    torch.testing.assert_close(train["scores"], expected)
    assert train["rewards_per_func"][:, 1].unique().numel() > 2  # the reward model's scores are not 0/1
    # truncated rows (mask_truncated_completions) reach the core with no valid token and get no advantage
    completion_mask = torch.cat([b["completion_mask"] for b in trainer._buffered_inputs])  # the rollout's 8 rows
    advantages = torch.cat([b["advantages"] for b in trainer._buffered_inputs])
    empty = completion_mask.sum(1) == 0
    assert empty.any() and (advantages[empty] == 0).all() and (advantages[~empty] != 0).any(), empty
    # eval: 4 prompts in batches of 2 prompts x num_generations_eval 2
    assert len(seen) == 3 and all(call["response_mask"].shape[0] == 4 for call in seen[1:])


def _chat_tokenizer():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tokenizer


def _conversational_stream(n: int = 16) -> IterableDataset:
    rows = make_dataset(n).to_list()

    def generate():
        for row in rows:
            yield {"prompt": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]}

    return IterableDataset.from_generator(generate)


def _first_char_of_message(completions, **kwargs):
    return first_char_reward([c[0]["content"] for c in completions])


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed (the `trl` extra has it)")
def test_conversational_streaming_lora_run(make_trainer):
    from peft import LoraConfig

    tokenizer = _chat_tokenizer()
    trainer = make_trainer(
        "synapo",
        reward_funcs=[_first_char_of_message],
        processing_class=tokenizer,
        train_dataset=_conversational_stream(),
        trainer_kwargs={"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])},
        chat_template_kwargs={"unused_by_this_template": True},
        max_steps=1,
    )
    critic_before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    lora_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    trainer.train()
    assert any(not torch.equal(v, trainer.critic.state_dict()[k]) for k, v in critic_before.items())
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in lora_before.items())
    batch = trainer._buffered_inputs[0]
    assert batch["advantages"].shape == batch["completion_ids"].shape


# --- multi-turn rollouts: tool-output tokens ------------------------------------------------------------------

# one group's completions: policy tokens, a tool's output (positions 1-2), policy tokens; reward: "2" in the text.
# (0, 1) diverge first at position 2, in the tool's output: no SCVL pair. (0, 3) diverge at 3, (2, 1) and (2, 3)
# at 0: policy tokens, pairs.
TURNS = ("1ab25", "1ac45", "3ab25", "1ab45")
ENV_MASK = [1, 0, 0, 1, 1]


def _scripted_rollout(prompts, trainer):
    tokenizer = trainer.processing_class
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    completions = [tokenizer.encode(TURNS[i % len(TURNS)], add_special_tokens=False) for i in range(len(prompts))]
    return {
        "prompt_ids": ids,
        "completion_ids": completions,
        "logprobs": [[0.0] * len(c) for c in completions],
        "env_mask": [list(ENV_MASK) for _ in completions],
    }


def _has_two(completions, **kwargs):
    return [float("2" in c) for c in completions]


def test_tool_output_tokens_are_masked(make_trainer, rollout_inputs, critic_batches):
    trainer = make_trainer("synapo", reward_funcs=[_has_two], trainer_kwargs={"rollout_func": _scripted_rollout})
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    output = trainer._generate_and_score_completions(rollout_inputs(trainer))
    assert output["tool_mask"][:, :5].tolist() == [ENV_MASK] * 8
    assert (output["advantages"][:, 1:3] == 0).all() and (output["advantages"][:, [0, 3]] != 0).any()
    batch = critic_batches[-1]
    assert (batch.response_mask[:, 1:3] == 0).all()  # no critic target on the tool's output
    sides = batch.sides
    positive = sides.is_positive
    pairs = sorted(zip((sides.rows[positive] % 4).tolist(), sides.diverge_index[positive].tolist(), strict=True))
    assert pairs == [(0, 3), (0, 3), (2, 0), (2, 0), (2, 0), (2, 0)], pairs  # 2 groups; (0, 1) at d=2 dropped
    assert torch.isfinite(trainer._compute_loss(trainer.model, output))


# --- vLLM: what runs without it -------------------------------------------------------------------------------


def test_vllm_importance_sampling_scales_the_policy_loss(make_trainer, rollout_inputs):
    # with vLLM's correction TRL always runs its old-log-prob pass (SynAPO takes EA-GAE's entropy from it) and
    # multiplies the per-token policy loss by pi_old / pi_vllm: here a given ratio, no vLLM
    trainer = make_trainer("ppo")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    assert not trl_runs_old_logps(trainer)
    inputs = trainer._generate_and_score_completions(rollout_inputs(trainer))
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    assert trl_runs_old_logps(trainer)
    ratio = torch.ones_like(inputs["completion_mask"], dtype=torch.float32)
    losses = []
    for scale in (1.0, 2.0):
        inputs["importance_sampling_ratio"] = scale * ratio
        losses.append(trainer._compute_loss(trainer.model, inputs).detach())
    torch.testing.assert_close(losses[1], 2 * losses[0])


# TRL's own tool loop (`tools=`): a Qwen3 chat template and response parser on a byte-level BPE tokenizer, the policy's
# turns scripted (a random tiny model emits no tool call) around a real tool call, its execution and TRL's tool_mask
TOOL_CALL = '<tool_call>\n{"name": "draw", "arguments": {}}\n</tool_call><|im_end|>'
DRAWS = [1, 1, 2, 2]  # the tool's results, call after call: rows 0, 1 see 1; rows 2, 3 see 2 (per group of 4)


def test_tool_calling_multi_turn_run(make_trainer, critic_batches, tmp_path):
    import importlib.resources

    import trl
    from datasets import Dataset

    from synapo_ext.testing import byte_bpe_tokenizer, tiny_qwen2

    tokenizer = byte_bpe_tokenizer(tmp_path / "tokenizer")
    tokenizer.chat_template = (importlib.resources.files(trl) / "chat_templates" / "qwen3.jinja").read_text()
    calls = []

    def draw() -> int:
        """Draw a number."""
        calls.append(None)
        return DRAWS[(len(calls) - 1) % len(DRAWS)]

    def scripted_turn(self, prompt_ids, images, multimodal_fields, num_generations, **kwargs):
        # first turn: every row calls the tool; after the tool: even rows answer "3" (correct), odd rows "4"
        after_tool = len(calls) > 0
        texts = [
            ("3" if i % 2 == 0 else "4") + "<|im_end|>" if after_tool else TOOL_CALL for i in range(len(prompt_ids))
        ]
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts], None

    def answered_three(completions, **kwargs):
        return [float(c[-1]["content"].strip() == "3") for c in completions]

    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": "Draw, then answer 3."}]}] * 8)
    trainer = make_trainer(
        "synapo",
        reward_funcs=[answered_three],
        processing_class=tokenizer,
        model=tiny_qwen2(tokenizer, max_position_embeddings=2048),
        train_dataset=prompts,
        trainer_kwargs={"tools": [draw]},
        max_completion_length=256,
    )
    trainer._generate_single_turn = scripted_turn.__get__(trainer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    output = trainer._generate_and_score_completions([dict(row) for row in prompts.to_list()])
    assert len(calls) == 8
    tool = output["completion_mask"].bool() & ~output["tool_mask"].bool()  # the tool's output tokens
    assert tool.sum(1).min() > 0
    assert "<tool_response>" in tokenizer.decode(output["completion_ids"][0][tool[0]])
    assert (output["advantages"][tool] == 0).all() and (output["advantages"][~tool] != 0).any()
    batch = critic_batches[-1]
    assert (batch.response_mask[tool] == 0).all()  # no critic target on the tool's output
    # SCVL: (0, 1) and (2, 3) diverge at the answer (a policy token): pairs; (0, 3) and (2, 1) first diverge in the
    # tool's output (1 vs 2): dropped
    positive = batch.sides.is_positive
    rows, d = batch.sides.rows[positive], batch.sides.diverge_index[positive]
    assert sorted((rows % 4).tolist()) == [0, 0, 2, 2]
    assert not tool[rows, d].any()
    assert torch.isfinite(trainer._compute_loss(trainer.model, output))
