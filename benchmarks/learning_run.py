"""One (method, seed) run of the learning benchmark (see learning.py): train, evaluate, write a JSON result."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import warnings
from collections import defaultdict

import task_chain
import torch
from task_chain import DELIMITER, answer_regex, completion_length, generate, make_tokenizer, parse_prompt

LOGGED = ("reward", "frac_reward_zero_std", "entropy", "critic/vf_explained_var", "critic/vf_loss", "step_time",
          "critic/ev_outcome")  # fmt: skip


# `critic/ev_outcome` of the runs' JSON: the trainer's explained variance of the Monte-Carlo outcome (the row's score
# on every token), comparable across methods (with HVM `critic/vf_explained_var` compares the local head with its
# bootstrapped target, shared/notes/benchmark_pilot.md)
RENAMED = {"critic/vf_explained_var_outcome": "critic/ev_outcome"}


def load_policy(path: str):
    from transformers import Qwen2ForCausalLM

    tokenizer = make_tokenizer()
    model = Qwen2ForCausalLM.from_pretrained(path)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def greedy_accuracy(model, tokenizer, prompts, cfg, task=task_chain) -> tuple[float, float]:
    """(reward rate, exact rate): the task's reward (strict format); the whole chain exactly right."""
    outs = generate(model, tokenizer, prompts, max_new_tokens=completion_length(cfg) + 4)
    reward = sum(task.score(p, c, e) for p, (c, e) in zip(prompts, outs, strict=True)) / len(prompts)
    exact = sum(e and c == task.trace(*parse_prompt(p)) for p, (c, e) in zip(prompts, outs, strict=True))
    return reward, exact / len(prompts)


def sampled_accuracy(model, tokenizer, prompts, cfg, n: int, seed: int, task=task_chain) -> float:
    total = 0.0
    for k in range(n):
        outs = generate(
            model, tokenizer, prompts, max_new_tokens=completion_length(cfg) + 4, temperature=1.0, seed=seed * 1000 + k
        )
        total += sum(task.score(p, c, e) for p, (c, e) in zip(prompts, outs, strict=True))
    return total / (n * len(prompts))


# --- the credit-assignment picture's responses ---------------------------------------------------------------------


def picture_responses(a, path: str) -> list[dict]:
    """Fixed held-out responses of the warm start (T=1): two with one wrong step, one correct. Cached."""
    from learning_setup import task_config, task_module

    cache = os.path.join(a.cache_dir, f"picture_{os.path.basename(path)}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    task, cfg = task_module(a), task_config(a)
    model, tokenizer = load_policy(path)
    prompts = task.held_out_prompts(cfg)[:200]
    wrong, right = [], []
    for k in range(4):
        outs = generate(
            model, tokenizer, prompts, max_new_tokens=completion_length(cfg) + 4, temperature=1.0, seed=10_000 + k
        )
        for p, (c, e) in zip(prompts, outs, strict=True):
            if not e or answer_regex(p).fullmatch(c) is None:
                continue
            item = {
                "prompt": p,
                "completion": c,
                "score": task.score(p, c, e),
                "wrong_step": task.first_wrong_step(p, c),
            }
            steps = c.split(DELIMITER)[:-1]
            rest = DELIMITER.join(steps[item["wrong_step"] + 1 :]) if item["wrong_step"] else ""
            later = (
                task_chain.first_wrong_step(p, rest) if item["wrong_step"] else 0
            )  # a later step wrong for its input
            middle = item["wrong_step"] is not None and 3 <= item["wrong_step"] <= 9
            if item["score"] == 0 and middle and later is None:
                wrong.append(item)  # exactly one wrong step, in the middle of the chain
            elif item["score"] == 1 and item["wrong_step"] is None:
                right.append(item)
    rng = random.Random(0)
    picked = rng.sample(wrong, min(2, len(wrong))) + right[:1]
    os.makedirs(a.cache_dir, exist_ok=True)
    with open(cache, "w") as f:
        json.dump(picked, f, indent=1)
    return picked


@torch.no_grad()
def credit(trainer, tokenizer, items: list[dict]) -> list[dict]:
    """Per-token advantages (not whitened) and values of a value-based trainer's critic on fixed responses."""
    from synapo_ext.core import compute_synapo_advantages
    from synapo_ext.trl.critic import critic_values

    if not items:
        return []
    prompt_ids = torch.tensor([tokenizer(it["prompt"])["input_ids"] for it in items])
    eos = [tokenizer.eos_token_id]
    completion_ids = torch.tensor([tokenizer(it["completion"])["input_ids"] + eos for it in items])
    B, T = completion_ids.shape
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.ones_like(input_ids)
    values = critic_values(trainer.critic, input_ids, attention_mask, T)  # (B, T, H)
    logits = trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -T - 1 : -1].float()
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # (B, T), rollout temperature 1
    rewards = torch.zeros(B, T)
    rewards[:, -1] = torch.tensor([it["score"] for it in items])
    params = dataclasses.replace(trainer.synapo, whiten_advantages=False, scvl_enabled=False)
    hvm = params.hvm_enabled
    result = compute_synapo_advantages(
        params,
        rewards=rewards,
        values=values[..., 0],
        response_mask=torch.ones(B, T),
        global_values=values[..., 1] if hvm else None,
        entropy=entropy,
        response_ids=completion_ids,
        boundary_table=trainer.boundary_table,
    )
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in completion_ids.tolist()]
    return [
        {**it, "tokens": tokens[b], "advantages": result.advantages[b].tolist(), "values": values[b, :, 0].tolist()}
        for b, it in enumerate(items)
    ]


def blame_on_step(
    advantages: torch.Tensor, mask: torch.Tensor, step: torch.Tensor, k: int
) -> tuple[float, float] | None:
    """One answer, (T,) each: (share of sum_t max(-A_t, 0) on the tokens of step k, step k's share of the answer's
    tokens); None when no token has a negative advantage (nothing to place)."""
    blame = (-advantages).clamp(min=0) * mask
    on_step = mask.bool() & (step == k)
    if blame.sum() <= 0:
        return None
    return float(blame[on_step].sum() / blame.sum()), float(on_step.sum() / mask.sum())


def own_blame(trainer, tokenizer, task, prompts: list[str], num_generations: int) -> dict:
    """Blame on the first wrong step, measured on the arm's own rollouts: the final policy answers `prompts` through
    the trainer's own rollout path (trees for a tree arm) and the trainer's own advantages (not whitened: a shift
    would move the sign) are read off TRL's output. For each wrong answer with a first wrong step k: the share of
    its negative advantage sum_t max(-A_t, 0) that sits on step k's tokens (the step's text and its delimiter).
    Even spread: step k's share of the answer's tokens; GRPO's advantage is one number a row, so it sits there.
    The call runs the trainer's whole rollout stage (its critic takes its step on these rollouts: the run is over)."""
    delimiter = tokenizer.convert_tokens_to_ids(DELIMITER)
    params = getattr(trainer, "synapo", None)
    if params is not None:
        trainer.synapo = dataclasses.replace(params, whiten_advantages=False)
    trainer.model.train()  # the training rollout path (trees grow in train mode only)
    shares, even, wrong, total = [], [], 0, 0
    try:
        per_call = trainer.args.per_device_train_batch_size // num_generations
        for i in range(0, len(prompts), per_call):
            batch = [{"prompt": p} for p in prompts[i : i + per_call] for _ in range(num_generations)]
            out = trainer._generate_and_score_completions(batch)
            ids, mask = out["completion_ids"].cpu(), out["completion_mask"].cpu().bool()
            advantages = out["advantages"].cpu().float()
            if advantages.dim() == 1:  # GRPO: one advantage a row
                advantages = advantages[:, None].expand_as(mask)
            step = torch.cumsum((ids == delimiter).long(), dim=1) - (ids == delimiter).long()  # delimiters before t
            for b, row in enumerate(batch):
                total += 1
                text = tokenizer.decode(ids[b][mask[b]], skip_special_tokens=True)
                ended = bool(mask[b].any()) and int(ids[b][mask[b]][-1]) == tokenizer.eos_token_id
                k = task.first_wrong_step(row["prompt"], text)
                if task.score(row["prompt"], text, ended) > 0 or k is None:
                    continue
                wrong += 1
                measured = blame_on_step(advantages[b], mask[b], step[b], k)
                if measured is not None:
                    shares.append(measured[0])
                    even.append(measured[1])
    finally:
        if params is not None:
            trainer.synapo = params
    share = sum(shares) / len(shares) if shares else float("nan")
    spread = sum(even) / len(even) if even else float("nan")
    return {"responses": total, "wrong": wrong, "measured": len(shares), "share": share, "even": spread}


# --- one run ---------------------------------------------------------------------------------------------------------


# segment-tree rollouts (docs/trl_tree_rollouts.md): 2 trees of 2 x 2 leaves per prompt (num_generations 8), branching
# after 4 and 8 of the 13 segments, so the leaves share 4-8 segments and the node values sit at 3 depths
TREE = {"rollout_tree_roots": 2, "rollout_tree_branching": 2, "rollout_tree_depth": 2, "rollout_tree_segments": 4}
TREE_METHODS = ("tree", "synapo-tree", "tree-outcome")


def uses_pretrain(a, method: str) -> bool:
    """VAPO's value pre-training (value_pretrain.py) replaces the trainer's warm-up for the VAPO/SynAPO methods (not
    the oracle and tree arms, whose values come from the policy's own samples, nor the shared-trunk ones, whose heads
    pre-train on the policy's features in the trainer's warm-up)."""
    from learning_setup import TRUNK_METHODS

    special = method.endswith("-oracle") or method in TRUNK_METHODS
    return a.value_pretrain and method not in ("grpo", "ppo", *TREE_METHODS) and not special


def trunk_settings(a, method: str) -> tuple[str, dict]:
    """(preset, SynAPOConfig settings) of a shared-trunk method: heads on the policy's hidden states, value gradient
    stopped at the trunk (`-grad`: `trunk_grad_scale` of it into the trunk), pre-trained by the trainer's warm-up
    (rollouts inside the budget) until the held-out explained variance of the outcome reaches `pretrain_target_ev` or
    stops improving."""
    preset, grad = method.split("-trunk")
    return preset, {
        "critic_trunk": "shared",
        "critic_trunk_grad_scale": a.trunk_grad_scale if grad == "-grad" else 0.0,
        "critic_learning_rate": a.trunk_critic_learning_rate,
        "critic_epochs": a.trunk_critic_epochs,
        "critic_mini_batch_size": 8,
        "value_warmup_steps": a.trunk_warmup_steps,
        "value_warmup_target_ev": a.pretrain_target_ev,
        "value_warmup_patience": 3,
        "value_warmup_window": 2,
    }


def build_trainer(a, method: str, seed: int, model, tokenizer, reward_fn, dataset, output_dir: str, critic=None):
    from trl import GRPOConfig, GRPOTrainer

    from synapo_ext.trl import SynAPOConfig, SynAPOTrainer

    common = dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        max_steps=math.ceil(a.samples / a.batch),
        num_generations=a.num_generations,
        per_device_train_batch_size=a.batch,
        max_completion_length=completion_length(task_cfg(a)) + 4,
        learning_rate=a.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=False,
        gradient_checkpointing=False,
        temperature=a.temperature,
        seed=seed,
        data_seed=seed,
    )
    if method == "grpo":
        args = GRPOConfig(**common)
        return GRPOTrainer(
            model=model, reward_funcs=[reward_fn], args=args, train_dataset=dataset, processing_class=tokenizer
        )
    variants = {
        "synapo-beta-neg": ("synapo", {"ea_gae_beta": a.ea_gae_beta_neg}),
        "vapo-lambda1": ("vapo", {"length_adaptive_lambda": False, "gae_lambda": 1.0}),
        "vapo-oracle": ("vapo", {}),
        "synapo-oracle": ("synapo", {}),
        "tree": ("vapo", {**TREE, "rollout_tree_local_weight": 0.0}),  # the tree's Monte-Carlo values alone
        "synapo-tree": ("synapo", TREE),  # tree values + the critic's GAE inside each segment
        # the control: the same tree samples with GRPO's credit (score - the prompt's mean score on every token)
        "tree-outcome": ("vapo", {**TREE, "rollout_tree_local_weight": 0.0, "rollout_tree_credit": "outcome"}),
    }
    preset, extra = variants.get(method, (method, {}))
    warmup = None if preset == "ppo" else a.value_warmup_steps  # None: the preset's (PPO: 0)
    tree_values_only = extra.get("rollout_tree_local_weight") == 0.0  # the critic feeds no advantage
    if method.endswith("-oracle") or tree_values_only or uses_pretrain(a, method):
        warmup = 0  # Monte-Carlo values need no warm-up; a pre-trained critic had its own
    critic_settings = dict(critic_learning_rate=a.critic_learning_rate, critic_epochs=a.critic_epochs,
                           value_warmup_steps=warmup)  # fmt: skip
    if "-trunk" in method:
        preset, extra = trunk_settings(a, method)
    args = SynAPOConfig(**common, preset=preset, **{**critic_settings, **extra})
    return SynAPOTrainer(
        model=model,
        reward_funcs=[reward_fn],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        critic_model=critic,
    )


def pretrain_settings(a):
    from value_pretrain import PretrainSettings

    held_out = min(512, a.pretrain_max_rollouts // 5)  # 512 at the default 8192; smaller for --quick
    return PretrainSettings(
        upfront=True,
        max_rollouts=a.pretrain_max_rollouts,
        held_out=held_out,
        round_rollouts=held_out,
        steps_per_round=64,
        max_steps=a.pretrain_max_steps,
        target_ev=a.pretrain_target_ev,
        patience=5,
        min_gain=0.01,
    )


def pretrained_critic(a, method: str, model, tokenizer, log=print):
    """(critic, info): VAPO's value pre-training on the warm start's rollouts (value_pretrain.py), once per critic
    shape (1 head, or 2 with HVM) and shared by every method and seed, like the warm start; cached. The critic
    probe (`critic_probe.py --task checked`) runs the same pre-training and reports it."""
    from learning_setup import pretrain_key, task_config, task_module
    from transformers import AutoModelForTokenClassification
    from value_pretrain import pretrain_critic

    heads = 1 if method in ("vapo", "vapo-lambda1", "synapo-no-hvm") else 2
    path = os.path.join(a.cache_dir, f"pretrain_{pretrain_key(a)}_{heads}h")
    if os.path.exists(os.path.join(path, "info.json")):
        with open(os.path.join(path, "info.json")) as f:
            return AutoModelForTokenClassification.from_pretrained(path), json.load(f)
    task, cfg = task_module(a), task_config(a)
    settings = pretrain_settings(a)
    prompts = [row["prompt"] for row in task.rl_dataset(cfg, n=settings.max_rollouts // 8 + 64, seed=5000)]
    critic, info = pretrain_critic(model, tokenizer, task, cfg, prompts, settings, num_heads=heads, seed=0, log=log)
    critic.save_pretrained(path + ".tmp")
    with open(os.path.join(path + ".tmp", "info.json"), "w") as f:
        json.dump(info, f)
    os.replace(path + ".tmp", path)
    return critic, info


def oracle_critic(a, method: str, seed: int, model, tokenizer):
    from learning_setup import task_config, task_module
    from oracle_values import MCOracleCritic

    task, cfg = task_module(a), task_config(a)
    dead = getattr(task, "dead_prefix", None)
    return MCOracleCritic(
        model,
        tokenizer,
        task.score,
        prompt_len=len(tokenizer(task.held_out_prompts(cfg)[0])["input_ids"]),
        delimiter_id=tokenizer.convert_tokens_to_ids(DELIMITER),
        max_completion=completion_length(cfg) + 4,
        k=a.oracle_k,
        num_heads=2 if method.startswith("synapo") else 1,
        dead=dead,
        seed=seed,
    )


def task_cfg(a):
    from learning_setup import task_config

    return task_config(a)


def run_one(a, method: str, seed: int) -> dict:
    """Train `method` from the warm start with RL seed `seed`; write and return its result."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, once per step
    from learning_setup import run_path, setup_key, task_module
    from transformers import PrinterCallback, TrainerCallback

    tag, cfg, wall0, task = f"[{method} s{seed}]", task_cfg(a), time.perf_counter(), task_module(a)
    path = task.warm_start(cfg, a.warm_start_seed, a.cache_dir)
    model, tokenizer = load_policy(path)
    eval_prompts = task.held_out_prompts(cfg)[: a.eval_prompts]
    eos = tokenizer.eos_token_id
    seen = {"samples": 0, "tokens": 0}  # training rollouts: completions and their generated tokens (eos included)
    run = {"trainer": None, "pretrain_tokens": 0}

    def chain_reward(prompts, completions, completion_ids, **kwargs):
        """1 iff the strict full format with the right final answer, ended by eos (task_chain.score)."""
        seen["samples"] += len(completions)
        seen["tokens"] += sum(len(ids) for ids in completion_ids)
        return [
            task.score(p, c, bool(ids) and ids[-1] == eos)
            for p, c, ids in zip(prompts, completions, completion_ids, strict=True)
        ]

    curve, history = [], defaultdict(list)

    def generated_tokens() -> dict[str, int]:
        """Every token a policy forward generated for this run so far: training rollouts, the value
        pre-training's rollouts (shared by the runs, counted in each), Monte-Carlo continuations (oracle arm)."""
        critic = getattr(run["trainer"], "critic", None)
        counts = getattr(run["trainer"], "rollout_token_counts", None)  # a tree's shared prefixes counted once
        parts = {
            "rollouts": int(counts["generated"]) if counts else seen["tokens"],
            "pretrain": run["pretrain_tokens"],
            "oracle": getattr(critic, "generated_tokens", 0),
        }
        return {"total": sum(parts.values()), **parts}

    def evaluate(step: int) -> None:
        acc, exact = greedy_accuracy(model, tokenizer, eval_prompts, cfg, task)
        model.train()
        recent = {k: sum(v[-8:]) / len(v[-8:]) for k, v in history.items() if v}
        curve.append(
            {
                "samples": seen["samples"],
                "tokens": generated_tokens()["total"],
                "step": step,
                "greedy": acc,
                "greedy_exact": exact,
                "wall_s": time.perf_counter() - wall0,
                **{f"train/{k}": v for k, v in recent.items()},
            }
        )
        shown = "  ".join(
            f"{k}={recent[k]:.3f}"
            for k in ("reward", "frac_reward_zero_std", "entropy", "critic/vf_explained_var", "critic/ev_outcome")
            if k in recent
        )
        print(
            f"{tag} samples {seen['samples']:6d}/{a.samples}  tokens {curve[-1]['tokens']:8d}  step {step:4d}  "
            f"greedy {acc:.3f} "
            f"(exact chain {exact:.3f})  {shown}  {time.perf_counter() - wall0:.0f}s",
            flush=True,
        )

    class Progress(TrainerCallback):
        def __init__(self):
            self.next_eval = a.eval_every

        def on_log(self, args, state, control, logs=None, **kwargs):
            for k, v in (logs or {}).items():
                if RENAMED.get(k, k) in LOGGED:
                    history[RENAMED.get(k, k)].append(float(v))

        def on_step_end(self, args, state, control, **kwargs):
            spent = seen["samples"] >= a.samples or 0 < a.token_budget <= generated_tokens()["total"]
            if seen["samples"] >= self.next_eval or spent:
                evaluate(state.global_step)
                while self.next_eval <= seen["samples"]:
                    self.next_eval += a.eval_every
            if spent:
                control.should_training_stop = True

    budget = f"{a.samples} samples" + (f" or {a.token_budget} generated tokens" if a.token_budget else "")
    print(f"{tag} start: warm start {os.path.basename(path)}, budget {budget}", flush=True)
    critic, pretrain = None, None
    if uses_pretrain(a, method):
        critic, pretrain = pretrained_critic(a, method, model, tokenizer, log=lambda m: print(tag, m, flush=True))
        run["pretrain_tokens"] = pretrain["generated_tokens"]
        print(
            f"{tag} value pre-training (shared, outside the budget): {pretrain['rollouts']} rollouts, "
            f"{pretrain['steps']} critic steps, held-out EV {pretrain['final_ev']} ({pretrain['stopped']})",
            flush=True,
        )
    elif method.endswith("-oracle"):
        critic = oracle_critic(a, method, seed, model, tokenizer)
    evaluate(0)  # the start of the curve: after the value pre-training's tokens
    dataset = task.rl_dataset(cfg, n=a.samples // a.num_generations + 64, seed=seed)
    output_dir = os.path.join(a.cache_dir, "trainer_out", f"{method}_s{seed}")
    trainer = build_trainer(a, method, seed, model, tokenizer, chain_reward, dataset, output_dir, critic=critic)
    run["trainer"] = trainer
    trainer.remove_callback(PrinterCallback)  # TRL's raw log dicts: our progress lines instead
    trainer.add_callback(Progress())
    trainer.train()
    if curve[-1]["samples"] != seen["samples"]:
        evaluate(trainer.state.global_step)
    t1 = sampled_accuracy(model, tokenizer, eval_prompts, cfg, a.final_t1_samples, seed, task=task)
    pictures = []
    if method not in ("grpo", *TREE_METHODS):  # a tree's values exist on its own rollouts only
        with open(os.path.join(a.cache_dir, f"picture_{os.path.basename(path)}.json")) as f:
            pictures = credit(trainer, tokenizer, json.load(f))
    result = {
        "method": method,
        "seed": seed,
        "setup_key": setup_key(a),
        "setup": dataclasses.asdict(a),
        "task": dataclasses.asdict(cfg),
        "warm_start": os.path.basename(path),
        "curve": curve,
        "final_greedy": curve[-1]["greedy"],
        "final_t1": t1,
        "samples": seen["samples"],
        "generated_tokens": generated_tokens(),
        "steps": trainer.state.global_step,
        "warmup_samples": seen["samples"] - trainer.state.global_step * a.batch,
        "synapo_params": dataclasses.asdict(trainer.synapo) if hasattr(trainer, "synapo") else None,
        "final_greedy_exact": curve[-1]["greedy_exact"],
        "wall_s": time.perf_counter() - wall0,
        "train_logs": dict(history),
        "credit": pictures,
        "value_pretrain": pretrain,
        "oracle": None
        if not method.endswith("-oracle")
        else {"k": a.oracle_k, "continuations": trainer.critic.generated, "prefixes": trainer.critic.estimated},
    }
    if a.blame_prompts and not method.endswith("-oracle"):  # after the counts: these rollouts are not training
        result["own_blame"] = own_blame(trainer, tokenizer, task, eval_prompts[: a.blame_prompts], a.num_generations)
    out = run_path(a, method, seed)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)  # atomic: an interrupted run leaves no result file
    print(
        f"{tag} done: greedy {result['final_greedy']:.3f}, T=1 {t1:.3f}, {result['steps']} steps, "
        f"{result['wall_s']:.0f}s",
        flush=True,
    )
    return result
