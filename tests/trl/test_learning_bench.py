"""Smoke test of the learning benchmark (benchmarks/learning.py): the task, then `--quick` end to end (~20 s)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from unittest import mock

import pytest

pytest.importorskip("trl")
pytestmark = pytest.mark.trl

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCH)

import task_chain  # noqa: E402


def test_task_reward_is_strict_and_delimiter_is_one_token():
    cfg = task_chain.TaskConfig()
    prompt, start, ops = task_chain.make_prompt(random.Random(0), cfg.num_steps)
    good = task_chain.trace(start, ops)
    assert task_chain.score(prompt, good) == 1.0
    assert task_chain.score(prompt, good, ended=False) == 0.0  # no eos: truncated
    assert task_chain.score(prompt, good + "\n") == 0.0  # anything after the answer
    assert task_chain.score(prompt, good.replace("a:", "A:", 1)) == 0.0  # labels are exact
    # one wrong step (later steps consistent with it) makes the final answer wrong: every operation is a bijection
    steps = good.split("\n\n")
    head, value = steps[0][:-1], int(steps[0][-1])
    wrong = (value + 1) % 10
    rest, v = [], wrong
    for i, (op, k) in enumerate(ops[1:], start=1):
        nxt = task_chain.apply(op, k, v)
        rest.append(f"{task_chain.LABELS[i]}:{v}{op}{k}={nxt}")
        v = nxt
    bad = "\n\n".join([head + str(wrong), *rest, f"ans:{v}"])
    assert task_chain.score(prompt, bad) == 0.0
    assert task_chain.first_wrong_step(prompt, bad) == 0
    tokenizer = task_chain.make_tokenizer()
    ids = tokenizer(good)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("\n\n")) == cfg.num_steps
    assert len(ids) + 1 == task_chain.completion_length(cfg) >= 100


def test_held_out_prompts_never_in_training():
    cfg = task_chain.TaskConfig(num_eval=200)
    held_out = set(task_chain.held_out_prompts(cfg))
    assert len(held_out) == 200
    train = task_chain.rl_dataset(cfg, n=500, seed=0)["prompt"]
    assert held_out.isdisjoint(train)
    assert task_chain.held_out_prompts(cfg) == task_chain.held_out_prompts(cfg)  # deterministic


def test_quick_end_to_end_and_resume(tmp_path, capfd):
    import learning

    argv = ["--quick", "--samples", "64", "--eval_every", "32", "--eval_prompts", "16", "--sft_steps", "20",
            "--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert learning.main(argv) == 0
    out = capfd.readouterr().out
    for method in ("grpo", "synapo"):
        with open(tmp_path / "out" / "runs" / f"{method}_s0.json") as f:
            run = json.load(f)
        assert run["samples"] >= 64 and [p["samples"] for p in run["curve"]][0] == 0
        assert f"[{method} s0] done" in out
        assert run["own_blame"]["responses"] == 16 * 8  # the held-out prompts' answers through the trainer
    assert "| grpo | 1 |" in (tmp_path / "out" / "learning.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "out" / "learning_curves.png").stat().st_size > 0
    assert learning.main(argv) == 0  # resume: nothing left to run
    assert "2 finished run(s) skipped, 0 to run" in capfd.readouterr().out
    # without matplotlib the report embeds no picture (not even one an earlier run left in the folder)
    real_find_spec = importlib.util.find_spec
    with mock.patch.object(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    ):
        assert learning.main([*argv, "--report_only"]) == 0
    report = (tmp_path / "out" / "learning.md").read_text()
    assert "![" not in report and "No pictures: matplotlib was not installed" in report


def test_outputs_go_to_a_git_ignored_folder_unless_asked():
    import learning
    from settings_cli import RESULTS, SCRATCH

    assert learning.parse_args([]).out == os.path.join(SCRATCH, "learning")
    assert learning.parse_args(["--task", "checked", "--quick"]).out == os.path.join(SCRATCH, "checked_quick")
    assert learning.parse_args(["--task", "checked", "--results"]).out == os.path.join(RESULTS, "checked")
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(SCRATCH, "x.md")], cwd=RESULTS, check=False)
    assert ignored.returncode == 0, "benchmarks/out/ must be git-ignored"


def test_critic_probe_features_and_lookup_value():
    import critic_probe
    import torch

    cfg = task_chain.TaskConfig()
    tokenizer = task_chain.make_tokenizer()
    prompt, start, ops = task_chain.make_prompt(random.Random(3), cfg.num_steps)
    good = task_chain.trace(start, ops)
    value = int(good.split("\n\n")[0][-1])
    bad = good.replace(f"={value}", f"={(value + 1) % 10}", 1)  # step 0 wrong, later steps as in the good trace
    rows = [tokenizer(prompt)["input_ids"] + tokenizer(c)["input_ids"] for c in (good, bad)]
    P = len(tokenizer(prompt)["input_ids"])
    data = {"ids": torch.tensor(rows), "mask": torch.ones(2, len(rows[0]) - P)}
    feats = critic_probe.prefix_features(data, tokenizer)
    wrong_digit = len("a:0+0=0") - 1  # token index of step 0's result
    assert feats["wrong_before"][0].sum() == 0
    assert feats["wrong_before"][1, : wrong_digit + 1].sum() == 0 and feats["wrong_before"][1, wrong_digit + 1 :].all()
    assert feats["step"][0, wrong_digit + 1] == 0 and feats["step"][0, wrong_digit + 2] == 1  # "\n\n" ends step 0
    assert feats["step"][0, -1] == cfg.num_steps
    assert feats["bug_ops"][0] == sum(op in task_chain.BUGS for op in ops)
    # lookup value: the training mean per key, the training mean for an unseen key
    keys, mask = torch.tensor([[1, 1], [2, 2], [3, 3]]), torch.ones(3, 2)
    returns = torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    v = critic_probe.table_value(keys, returns, mask, slice(0, 2))
    assert v.tolist() == [[0.5, 0.5], [1.0, 1.0], [0.75, 0.75]]
    assert critic_probe.explained_variance(returns, returns, mask) == 1.0


def test_critic_probe_end_to_end(tmp_path):
    import critic_probe

    out = tmp_path / "probe.md"
    argv = ["--train", "32", "--test", "16", "--epochs", "1", "--every", "1", "--sft_steps", "20",
            "--out", str(out), "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert critic_probe.main(argv) == 0
    text = out.read_text()
    assert "| critic, outcome target, after 1 steps" in text and "positive control" in text
    assert "nan" not in text  # a 20-step warm start never succeeds: EV is reported undefined, not NaN


@pytest.mark.parametrize(
    "method, expected",
    [
        ("vapo-lambda1", {"length_adaptive_lambda": False, "gae_lambda": 1.0, "hvm_enabled": False}),
        ("synapo-beta-neg", {"ea_gae_beta": -0.05, "hvm_enabled": True, "length_adaptive_lambda": True}),
        ("synapo-no-hvm", {"hvm_enabled": False, "scvl_enabled": True, "ea_gae_beta": 0.05}),
        ("tree", {"hvm_enabled": False, "rollout_tree_roots": 2, "rollout_tree_local_weight": 0.0}),
        ("synapo-tree", {"hvm_enabled": True, "rollout_tree_depth": 2, "rollout_tree_local_weight": 1.0}),
        ("tree-outcome", {"rollout_tree_credit": "outcome", "rollout_tree_local_weight": 0.0}),
    ],
)
def test_method_variants_reach_the_trainer(tmp_path, method, expected):

    a, trainer = _bench_trainer(["--quick", "--samples", "64", "--out", str(tmp_path)], method, tmp_path)
    assert {
        k: getattr(trainer.synapo if hasattr(trainer.synapo, k) else trainer.args, k) for k in expected
    } == expected


def test_critic_sanity_end_to_end(tmp_path):
    import critic_sanity

    out = tmp_path / "sanity.md"
    argv = ["--methods", "vapo", "--steps", "2", "--every", "1", "--sft_steps", "20",
            "--out", str(out), "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert critic_sanity.main(argv) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 1-1 |") or line.startswith("| 2-2 |")]
    assert len(rows) == 2 and "nan" not in out.read_text()


def test_pretrain_key_follows_the_pre_training_only():
    """The cached value pre-training is shared by runs whose RL settings differ (a frozen-policy diagnostic reuses
    it), and rebuilt when the task or the pre-training's own settings change."""
    import dataclasses

    from learning_setup import Args, apply_quick, pretrain_key, setup_key

    a = apply_quick(Args(task="checked"))
    rl_only = dataclasses.replace(a, learning_rate=1e-12, samples=2048, critic_learning_rate=1e-4, seeds=[7])
    assert pretrain_key(rl_only) == pretrain_key(a)
    assert setup_key(rl_only) != setup_key(a)
    for change in ({"pretrain_max_rollouts": 4096}, {"pretrain_target_ev": 0.5}, {"sft_steps": 100},
                   {"warm_start_seed": 1}, {"task": "chain"}):  # fmt: skip
        assert pretrain_key(dataclasses.replace(a, **change)) != pretrain_key(a), change


def test_hard_task_defaults_equal_compute():
    """--task hard: every method stops at the same generated-token budget (value pre-training included), the
    setup key of the other tasks is unchanged by the token budget field."""
    from learning_setup import HARD_METHODS, HARD_TOKENS, Args, apply_quick, setup_key

    a = apply_quick(Args(task="hard"))
    assert a.token_budget == HARD_TOKENS and a.pretrain_max_rollouts * 102 < HARD_TOKENS and a.methods == HARD_METHODS
    assert a.out.endswith("hard") and a.cache_dir.endswith("learning_hard")
    checked = apply_quick(Args(task="checked"))
    assert checked.token_budget == 0 and setup_key(checked) == "bca09658efba"  # the checked task's finished runs


@pytest.mark.parametrize(("method", "preset", "scale"), [("synapo-trunk", "synapo", 0.0), ("vapo-trunk", "vapo", 0.0),
                                                         ("synapo-trunk-grad", "synapo", 0.1)])  # fmt: skip
def test_trunk_methods_reach_the_trainer(tmp_path, method, preset, scale):
    """Shared-trunk methods: heads on the policy, pre-trained by the trainer's warm-up (not value_pretrain.py)."""
    import learning_run

    from synapo_ext.trl.trunk import TrunkCritic

    argv = ["--task", "checked", "--quick", "--samples", "64", "--out", str(tmp_path)]
    a, trainer = _bench_trainer(argv, method, tmp_path)
    assert not learning_run.uses_pretrain(a, method) and learning_run.uses_pretrain(a, preset)
    assert isinstance(trainer.critic, TrunkCritic) and trainer.args.critic_trunk_grad_scale == scale
    assert trainer.synapo.value_warmup_steps == a.trunk_warmup_steps
    assert trainer.synapo.hvm_enabled == (preset == "synapo") and trainer.args.critic_epochs == a.trunk_critic_epochs


def _bench_trainer(argv: list[str], method: str, tmp_path):
    """(args, trainer) of `method` as learning_run builds it, on the chain task's tiny warm-start model."""
    import learning
    import learning_run

    a = learning.parse_args(argv)
    cfg = task_chain.TaskConfig(sft_steps=a.sft_steps)
    tokenizer = task_chain.make_tokenizer()
    model = task_chain.make_model(tokenizer, cfg, seed=0)
    dataset = task_chain.rl_dataset(cfg, n=16, seed=0)
    reward = lambda completions, **kw: [0.0] * len(completions)  # noqa: E731
    return a, learning_run.build_trainer(a, method, 0, model, tokenizer, reward, dataset, str(tmp_path))


def test_blame_on_step_against_a_loop():
    """The share of a wrong answer's negative advantage on its first wrong step, against a plain loop; a uniform
    advantage (GRPO's) puts exactly the step's share of the tokens there."""
    import learning_run
    import torch

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        T = int(torch.randint(5, 40, (1,), generator=gen))
        advantages = torch.randn(T, generator=gen, dtype=torch.float64)
        mask = (torch.rand(T, generator=gen) < 0.9).double()
        step = torch.sort(torch.randint(0, 4, (T,), generator=gen)).values
        k = int(torch.randint(0, 4, (1,), generator=gen))
        negative = [max(-float(advantages[t]), 0.0) * float(mask[t]) for t in range(T)]
        got = learning_run.blame_on_step(advantages, mask, step, k)
        if sum(negative) == 0:
            assert got is None
            continue
        on = sum(negative[t] for t in range(T) if int(step[t]) == k)
        size = sum(float(mask[t]) for t in range(T) if int(step[t]) == k)
        assert got == pytest.approx((on / sum(negative), size / float(mask.sum())), abs=1e-12)
        share, even = learning_run.blame_on_step(-torch.ones(T, dtype=torch.float64), mask, step, k)
        assert share == pytest.approx(even, abs=1e-12)
