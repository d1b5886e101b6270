"""Smoke tests of issue 13's benchmark pieces: the checked task, the Monte-Carlo oracle critic, the value
pre-training, and `learning.py --task checked` end to end (tiny settings)."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

pytest.importorskip("trl")
pytestmark = pytest.mark.trl

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCH)

import task_checked  # noqa: E402
import torch  # noqa: E402


def _wrong_at(prompt: str, step: int) -> str:
    """The right worked chain for `prompt` with step `step`'s result off by one (later steps consistent with it)."""
    start, ops = task_checked.parse_prompt(prompt)
    value, steps = start, []
    for i, (op, k) in enumerate(ops):
        result = task_checked.apply(op, k, value)
        if i == step:
            result = (result + 1) % 10
        steps.append(f"{task_checked.LABELS[i]}:{value}{op}{k}={result}")
        value = result
    return "\n\n".join(steps) + f"\n\nans:{value}"


def test_checked_task_reward_and_wrong_steps():
    cfg = task_checked.TaskConfig()
    rng = random.Random(0)
    prompt, start, ops = task_checked.make_prompt(rng, cfg.num_steps, cfg.risky_probs)
    good = task_checked.trace(start, ops)
    assert task_checked.score(prompt, good) == 1.0 and task_checked.score(prompt, good, ended=False) == 0.0
    bad = _wrong_at(prompt, 4)
    assert task_checked.score(prompt, bad) == 0.0  # a wrong chain never scores, whatever its last digit
    assert task_checked.first_wrong_step(prompt, bad) == 4
    steps = good.split("\n\n")
    skipped = "\n\n".join(steps[:2] + [steps[2][:2] + "0" + steps[2][3:]] + steps[3:])  # step 2's input changed
    if steps[2][2] != "0":
        assert task_checked.first_wrong_step(prompt, skipped) == 2
    assert task_checked.dead_prefix(prompt, "\n\n".join(bad.split("\n\n")[:5]) + "\n\n")
    assert not task_checked.dead_prefix(prompt, "\n\n".join(bad.split("\n\n")[:4]) + "\n\n")
    # risky operations: 0-3 per prompt, drawn from risky_probs
    counts = [sum(op in task_checked.BUGS for op in task_checked.make_prompt(rng, 12)[2]) for _ in range(400)]
    assert set(counts) == {0, 1, 2, 3} and 0.12 < counts.count(0) / 400 < 0.28


def test_checked_true_features():
    tokenizer = task_checked.make_tokenizer()
    prompt = "3a+1b*7c+2d+3e+4f+5g+6h+7i+1j+2k+3l+4\n"  # one risky step: b (*7)
    bad = _wrong_at(prompt, 1)
    tokens = [tokenizer.convert_ids_to_tokens(tokenizer(c)["input_ids"]) for c in (task_checked.trace(
        *task_checked.parse_prompt(prompt)), bad)]  # fmt: skip
    feats = task_checked.true_features([prompt, prompt], tokens)
    result_b = 8 + len("b:4*7=")  # token index of step b's result (step a is 8 tokens)
    assert feats["wrong_before"][0].sum() == 0
    assert feats["wrong_before"][1, : result_b + 1].sum() == 0 and feats["wrong_before"][1, result_b + 1 :].all()
    assert feats["risky_left"][0, result_b] == 1 and feats["risky_left"][0, result_b + 1] == 0
    assert feats["step"][0, 7] == 0 and feats["step"][0, 8] == 1


class _Oracle(torch.nn.Module):
    """A stand-in policy whose continuations finish the right chain (score 1) from any prefix of it."""

    def __init__(self, tokenizer, prompt):
        super().__init__()
        self.emb = torch.nn.Embedding(len(tokenizer), 4)
        self.right = tokenizer(prompt + task_checked.trace(*task_checked.parse_prompt(prompt)))["input_ids"]
        self.right.append(tokenizer.eos_token_id)
        self.eos, self.calls = tokenizer.eos_token_id, 0

    def get_input_embeddings(self):
        return self.emb

    def generate(self, input_ids, max_new_tokens, **kwargs):
        self.calls += 1
        rows = []
        for row in input_ids.tolist():
            rest = self.right[len(row) :] if row == self.right[: len(row)] else [self.eos]
            rows.append(row + rest)
        width = max(map(len, rows))
        return torch.tensor([r + [self.eos] * (width - len(r)) for r in rows])


def test_oracle_critic_values_at_segment_starts():
    from oracle_values import MCOracleCritic

    tokenizer = task_checked.make_tokenizer()
    prompt = "3a+1b*7c+2d+3e+4f+5g+6h+7i+1j+2k+3l+4\n"
    policy = _Oracle(tokenizer, prompt)
    P = len(tokenizer(prompt)["input_ids"])
    critic = MCOracleCritic(policy, tokenizer, task_checked.score, prompt_len=P,
                            delimiter_id=tokenizer.convert_tokens_to_ids("\n\n"), max_completion=110, k=3,
                            num_heads=2, dead=task_checked.dead_prefix)  # fmt: skip
    eos = [tokenizer.eos_token_id]
    good = tokenizer(task_checked.trace(*task_checked.parse_prompt(prompt)))["input_ids"] + eos
    bad = tokenizer(_wrong_at(prompt, 5))["input_ids"] + eos
    ids = torch.tensor([tokenizer(prompt)["input_ids"] + c for c in (good, bad)])
    from synapo_ext.trl.critic import critic_values

    values = critic_values(critic, ids, torch.ones_like(ids), len(good))  # (2, T, 2)
    assert values.shape == (2, len(good), 2) and torch.equal(values[..., 0], values[..., 1])
    assert values[0].eq(1).all()  # every state of the right chain: every continuation scores
    assert values[1, : 8 * 5 + 6, 0].eq(1).all()  # up to step 5's result the prefix is still right
    assert values[1, 8 * 6 :, 0].eq(0).all()  # segment 6 on: a wrong step is written (dead: no sampling)
    calls = policy.calls
    critic_values(critic, ids[1:], torch.ones_like(ids[1:]), len(good))  # a mini-batch of the same rows: cached
    assert policy.calls == calls and critic.generated > 0
    loss = values.sum() * 0 + critic(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum()
    loss.backward()  # the critic update's backward runs; its only parameter gets no gradient signal
    assert float(critic.dummy.grad) == pytest.approx(0.0)


def test_value_pretrain_ridge_head_and_stopping_rule(tmp_path):
    from value_pretrain import PretrainSettings, pretrain_critic

    cfg = task_checked.TaskConfig(sft_steps=20)
    tokenizer = task_checked.make_tokenizer()
    policy = task_checked.make_model(tokenizer, cfg, seed=0)
    prompts = [row["prompt"] for row in task_checked.rl_dataset(cfg, n=64, seed=0)]
    settings = PretrainSettings(round_rollouts=16, held_out=16, max_rollouts=48, steps_per_round=2, batch=8)
    logs = []
    critic, info = pretrain_critic(policy, tokenizer, task_checked, cfg, prompts, settings, num_heads=2, seed=0,
                                   log=logs.append)  # fmt: skip
    assert info["rollouts"] <= 48 and info["steps"] == 2 * len(info["curve"]) and info["stopped"] in (
        "target_ev", "plateau", "max_rollouts")  # fmt: skip
    assert critic.config.num_labels == 2 and len(logs) == len(info["curve"])


def test_learning_checked_quick_end_to_end_and_resume(tmp_path, capfd):
    import learning

    argv = ["--task", "checked", "--quick", "--samples", "96", "--eval_every", "48", "--eval_prompts", "8",
            "--sft_steps", "20", "--pretrain_max_rollouts", "64", "--oracle_k", "1", "--jobs", "1",
            "--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert learning.main(argv) == 0
    out = capfd.readouterr().out
    for method in ("grpo", "synapo", "synapo-oracle"):
        with open(tmp_path / "out" / "runs" / f"{method}_s0.json") as f:
            run = json.load(f)
        assert run["samples"] >= 96 and f"[{method} s0] done" in out
    with open(tmp_path / "out" / "runs" / "synapo_s0.json") as f:
        run = json.load(f)
    # the shared value pre-training is reported beside the budget, not charged to it
    assert run["value_pretrain"]["rollouts"] > 0 and run["curve"][0]["samples"] == 0 and run["samples"] >= 96
    with open(tmp_path / "out" / "runs" / "synapo-oracle_s0.json") as f:
        assert json.load(f)["oracle"]["continuations"] >= 0
    # generated tokens: every part counted, the curve's x axis grows with them, the report compares at equal tokens
    for method in ("grpo", "synapo", "synapo-oracle"):
        with open(tmp_path / "out" / "runs" / f"{method}_s0.json") as f:
            run = json.load(f)
        tokens, xs = run["generated_tokens"], [p["tokens"] for p in run["curve"]]
        assert tokens["total"] == tokens["rollouts"] + tokens["pretrain"] + tokens["oracle"] == xs[-1]
        assert xs == sorted(xs) and run["samples"] <= tokens["rollouts"] <= run["samples"] * 106  # 1..106 a sample
        assert (tokens["pretrain"] > 0) == (method == "synapo") and (tokens["oracle"] > 0) == method.endswith("oracle")
        assert xs[0] == tokens["pretrain"]  # the curve starts after the value pre-training
    report = (tmp_path / "out" / "learning.md").read_text()
    assert "checked task" in report and "| synapo-oracle | 1 |" in report
    assert "**At equal generated tokens**" in report and "tokens to 80 %" in report
    assert learning.main(argv) == 0  # resume: nothing left to run
    assert "3 finished run(s) skipped, 0 to run" in capfd.readouterr().out


def test_hard_task_six_misconceptions_and_checked_unchanged():
    import task_hard

    cfg = task_hard.TaskConfig()
    bugs = task_hard.bugs_of(cfg)
    assert len(bugs) == 6 and set(task_checked.BUGS) < set(bugs)
    assert bugs[("+", 6)](3) == 7 and bugs[("-", 3)](3) == 6 and bugs[("*", 9)](3) == 3  # +4, +3, *1
    prompts = task_hard.held_out_prompts(cfg)
    counts = [sum(op in bugs for op in task_checked.parse_prompt(p)[1]) for p in prompts]
    assert set(counts) == {0, 1, 2, 3, 4} and 0.05 < counts.count(0) / len(counts) < 0.15
    assert {op for p in prompts for op in task_checked.parse_prompt(p)[1] if op in bugs} == set(bugs)
    assert not set(prompts) & {row["prompt"] for row in task_hard.rl_dataset(cfg, 200, seed=0)}
    # the checked task's prompts and cache key are unchanged by the misconception tables
    checked = task_checked.TaskConfig()
    assert task_checked.cache_key(checked, 0) == "0bf95ffb7a73" and task_checked.cache_key(cfg, 0) != "0bf95ffb7a73"
    assert task_checked.held_out_prompts(checked)[0] == "5a+9b+1c-7d-5e*3f*9g+7h-2i+8j-8k-4l+3\n"
    # warm-start traces: a risky step misconceived at bug_rate; a fully right trace is rare
    rng = random.Random(0)
    right = 0
    for _ in range(2000):
        _, start, ops = task_checked.make_prompt(rng, cfg.num_steps, cfg.risky_probs, bugs)
        right += task_checked.trace(start, ops, rng, cfg) == task_checked.trace(start, ops)
    assert 0.12 < right / 2000 < 0.25
    # the probe's true features count this task's risky steps
    prompt = "3a+6b*9c+2d+3e+4f+5g+6h+7i+1j+2k+3l+4\n"  # risky: b (+6), c (*9), h (+6)
    tokens = [
        task_checked.make_tokenizer().convert_ids_to_tokens(
            task_checked.make_tokenizer()(task_hard.trace(*task_checked.parse_prompt(prompt)))["input_ids"]
        )
    ]
    assert int(task_hard.true_features([prompt], tokens)["risky_left"][0, 0]) == 3


def test_report_at_equal_tokens():
    from learning_report import equal_tokens_budget, greedy_at, samples_to

    curve = [{"samples": 0, "tokens": 100, "greedy": 0.1}, {"samples": 10, "tokens": 300, "greedy": 0.5},
             {"samples": 20, "tokens": 500, "greedy": 0.9}]  # fmt: skip
    assert greedy_at(curve, 50) == 0.1 and greedy_at(curve, 200) == pytest.approx(0.3) and greedy_at(curve, 900) == 0.9
    assert samples_to(curve, 0.7) == pytest.approx(15.0) and samples_to(curve, 0.7, "tokens") == pytest.approx(400.0)
    other = [{"samples": 0, "tokens": 0, "greedy": 0.1}, {"samples": 20, "tokens": 450, "greedy": 0.2}]
    assert equal_tokens_budget({"a": [{"curve": curve}], "b": [{"curve": other}]}) == 450.0
    assert equal_tokens_budget({"a": [{"curve": [{"samples": 0, "greedy": 0.1}]}]}) is None  # made before tokens
