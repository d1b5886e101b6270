"""Can a critic learn this task's values? An offline probe on the learning benchmark's warm start (learning.py).

SynAPO's parts assign credit through the critic: if V(s_t) does not fall after a wrong step, HVM, SCVL and EA-GAE
have nothing to work with. This probe samples rollouts of the frozen warm-start policy (temperature 1, as in RL),
then measures, on held-out rollouts, how much of the return's variance a value can explain:

1. the outcome's statistics: success rate, P(success | a wrong step already written), P(success | none yet);
2. a ceiling: a lookup-table value fitted on the training rollouts from three hand-made features of the prefix
   (a wrong step already written, the step index, the number of misconception-prone operations in the prompt);
3. the benchmark's critic (initialised from the policy, zero value head, the adapter's value loss, AdamW,
   batch 32) trained on the Monte-Carlo outcome target (what VAPO's value warm-up and the RL runs train on);
4. a positive control: the same critic trained on a noise-free target, P(success | no wrong step yet) where no
   wrong step has been written and 0 after one; it shows whether the critic can detect a wrong step at all.

Explained variance = 1 - Var(return - V) / Var(return) over valid tokens of the held-out rollouts.

    python benchmarks/critic_probe.py                   # ~6 min on one CPU thread
    python benchmarks/critic_probe.py --epochs 1 --train 1024 --test 256   # a quick look
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from task_chain import BUGS, apply, parse_prompt  # noqa: E402

STEP = re.compile(r"[a-z]:(\d)([+\-*])(\d)=(\d)$")


def rollouts(model, tokenizer, prompts: list[str], cfg, seed: int, task=None) -> dict[str, torch.Tensor]:
    """Sampled completions (T=1) as padded tensors: ids and attention (N, P + T), mask (N, T), score (N,)."""
    import task_chain
    from value_pretrain import sample_rollouts

    return sample_rollouts(model, tokenizer, task or task_chain, cfg, prompts, seed)


def prefix_features(data: dict, tokenizer) -> dict[str, torch.Tensor]:
    """Per token t (state s_t, tokens < t seen): a wrong step already written; step index; prompt's bug-op count."""
    ids = data["ids"]
    N, T = data["mask"].shape
    P = ids.size(1) - T  # prompt length
    wrong_before, step = torch.zeros(N, T), torch.zeros(N, T, dtype=torch.long)
    bug_ops = torch.zeros(N, dtype=torch.long)
    for n in range(N):  # a diagnostic on 5k rollouts, not a hot path
        _, ops = parse_prompt(tokenizer.decode(ids[n, :P]))
        bug_ops[n] = sum(op in BUGS for op in ops)
        text, wrong, k = "", False, 0
        for t, token in enumerate(tokenizer.convert_ids_to_tokens(ids[n, P:].tolist())):
            wrong_before[n, t], step[n, t] = float(wrong), k
            text += token
            m = STEP.search(text)
            if token == "\n\n":
                k += 1
            elif m and apply(m.group(2), int(m.group(3)), int(m.group(1))) != int(m.group(4)):
                wrong = True
    return {"wrong_before": wrong_before, "step": step, "bug_ops": bug_ops}


def explained_variance(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> float | None:
    """1 - Var(return - V) / Var(return) over valid tokens; None when the return is constant (EV undefined)."""
    m = mask.bool()
    target, residual = returns[m].double(), (returns - values)[m].double()
    return float(1 - residual.var() / target.var()) if target.var() > 0 else None


def show(ev: float | None) -> str:
    return "undefined (constant return)" if ev is None else f"{ev:.3f}"


def table_value(keys: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, train: slice) -> torch.Tensor:
    """V = mean training return of the tokens that share the key (unseen keys: the training mean)."""
    m = mask[train].bool()
    k_train, r_train = keys[train][m], returns[train][m]
    uniq, inverse = torch.unique(k_train, return_inverse=True)
    means = torch.zeros(uniq.numel()).index_add_(0, inverse, r_train) / torch.bincount(inverse).float()
    pos = torch.searchsorted(uniq, keys).clamp(max=uniq.numel() - 1)
    return torch.where(uniq[pos] == keys, means[pos], r_train.mean())


@torch.no_grad()
def linear_probe_ev(policy, data: dict, returns: torch.Tensor, train: slice, test: slice) -> float | None:
    """Ridge regression of `returns` on the frozen policy's last hidden state at s_t (what a critic initialised from
    the policy starts from): the held-out EV of the best linear value head without training the backbone."""
    ids, attention, mask = data["ids"], data["attention"], data["mask"]
    T = mask.size(1)
    hidden = torch.cat([policy.model(input_ids=ids[i : i + 256], attention_mask=attention[i : i + 256])
                        .last_hidden_state[:, -T - 1 : -1] for i in range(0, ids.size(0), 256)]).double()  # fmt: skip
    x = torch.cat([hidden, torch.ones(*hidden.shape[:2], 1, dtype=hidden.dtype)], dim=-1)  # (N, T, d + 1)
    m = mask[train].bool()
    x_train, y_train = x[train][m], returns[train][m].double()
    w = torch.linalg.solve(x_train.T @ x_train + 1e-3 * torch.eye(x.size(-1), dtype=x.dtype), x_train.T @ y_train)
    return explained_variance(returns[test], (x[test] @ w).float(), mask[test])


def train_critic(policy, data, returns, train: slice, test: slice, *, lr: float, epochs: int, every: int, log,
                 head_init: str = "zero", max_steps: int | None = None):  # fmt: skip
    """The benchmark's critic on `returns`: held-out explained variance every `every` optimizer steps.
    `head_init`: the value head's start (value_pretrain.init_head: "zero" is the trainer's; "ridge" the least-squares
    head on the frozen features of the training rollouts; "normal" random)."""
    from value_pretrain import init_head

    from synapo_ext.core import value_loss
    from synapo_ext.trl.critic import build_critic, critic_values

    torch.manual_seed(0)
    critic = build_critic(None, policy, num_heads=1)
    if head_init != "zero":
        rows = {k: v[train] for k, v in data.items()}
        init_head(critic, head_init, rows, returns[train], 1e-2, seed=0)
    optimizer = torch.optim.AdamW(critic.parameters(), lr=lr)
    ids, attention, mask = data["ids"], data["attention"], data["mask"]
    T = mask.size(1)

    @torch.no_grad()
    def held_out_ev() -> float:
        critic.eval()
        test_ids, test_attention = ids[test], attention[test]
        values = torch.cat([critic_values(critic, test_ids[i : i + 256], test_attention[i : i + 256], T)[..., 0]
                            for i in range(0, test_ids.size(0), 256)])  # fmt: skip
        critic.train()
        return explained_variance(returns[test], values, mask[test])

    curve, step, batch = [], 0, 32
    for _ in range(epochs):
        for i in range(train.start, train.stop, batch):
            rows = slice(i, min(i + batch, train.stop))
            values = critic_values(critic, ids[rows], attention[rows], T)[..., 0]
            loss, _ = value_loss(values, returns[rows], mask[rows])  # the adapter's value clip: a no-op at old == new
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % every == 0:
                curve.append((step, held_out_ev()))
                log(f"  step {step}: held-out EV {show(curve[-1][1])}")
            if max_steps is not None and step >= max_steps:
                return curve
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task", default="chain", choices=["chain", "checked", "hard"], help="task_chain, task_checked or task_hard"
    )
    parser.add_argument("--train", type=int, default=4096, help="training rollouts (512 prompts x 8)")
    parser.add_argument("--test", type=int, default=1024, help="held-out rollouts (other prompts)")
    parser.add_argument("--epochs", type=int, default=2, help="critic passes over the training rollouts")
    parser.add_argument("--critic_learning_rate", type=float, default=1e-3, help="the learning benchmark's default")
    parser.add_argument("--every", type=int, default=64, help="evaluate every this many critic steps")
    parser.add_argument("--sft_steps", type=int, default=3000, help="warm-start supervised steps (learning.py's)")
    parser.add_argument(
        "--diagnose_steps",
        type=int,
        default=128,
        help="checked task: critic steps of each flat-start diagnosis variant (0: skip them)",
    )
    parser.add_argument(
        "--pretrain_max_rollouts",
        type=int,
        default=None,
        help="checked task: cap of the value pre-training with its stopping rule (default: the learning benchmark's, "
        "so the probe reports, and caches, the very critics the learning run starts from; 0: skip it)",
    )
    parser.add_argument("--out", default="", help="default benchmarks/out/<learning|checked>/critic_probe.md")
    parser.add_argument("--results", action="store_true", help="default to benchmarks/results/ (committed)")
    parser.add_argument("--cache_dir", default="", help="default benchmarks/cache/<learning|learning_checked>")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import learning
    from learning_run import load_policy

    def log(msg: str) -> None:
        print(msg, flush=True)

    start = time.perf_counter()
    a = learning.parse_args(["--task", args.task, "--sft_steps", str(args.sft_steps)]
                            + (["--results"] if args.results else [])
                            + (["--cache_dir", args.cache_dir] if args.cache_dir else [])
                            + (["--pretrain_max_rollouts", str(args.pretrain_max_rollouts)]
                               if args.pretrain_max_rollouts else []))  # fmt: skip
    task, cfg = learning.task_module(a), learning.task_config(a)
    out_path = args.out or os.path.join(a.out, "critic_probe.md")
    policy, tokenizer = load_policy(task.warm_start(cfg, 0, a.cache_dir))
    n = args.train + args.test
    prompts = [row["prompt"] for row in task.rl_dataset(cfg, n=n // 8 + 1, seed=0) for _ in range(8)][:n]
    data = rollouts(policy, tokenizer, prompts, cfg, seed=1, task=task)
    train, test = slice(0, args.train), slice(args.train, n)
    mask, success = data["mask"], data["score"]
    returns = success[:, None] * mask  # Monte-Carlo return, gamma 1, reward on the last token
    if args.task == "chain":
        feats = prefix_features(data, tokenizer)
        keys = feats["wrong_before"].long() * 10_000 + feats["bug_ops"][:, None] * 100 + feats["step"]
        bug_keys = feats["bug_ops"][:, None].expand_as(mask).contiguous()
        lookups = {
            "lookup table on (wrong step written)": feats["wrong_before"].long(),
            "lookup table on (bug ops in prompt)": bug_keys,
            "lookup table on (wrong step written x step x bug ops)": keys,
        }
    else:
        P = data["ids"].size(1) - mask.size(1)
        tokens = [tokenizer.convert_ids_to_tokens(row) for row in data["ids"][:, P:].tolist()]
        feats = task.true_features(prompts, tokens)
        feats["wrong_before"] = feats["wrong_before"].float()
        lookups = {
            "lookup table on (wrong step written)": feats["wrong_before"].long(),
            "lookup table on (risky steps left)": feats["risky_left"],
            "lookup table on (wrong step written x risky steps left)": feats["wrong_before"].long() * 100
            + feats["risky_left"],
            "lookup table on (wrong step written x step x risky steps left)": feats["wrong_before"].long() * 10_000
            + feats["risky_left"] * 100
            + feats["step"],
        }
    log(f"{n} rollouts sampled and featurised ({time.perf_counter() - start:.0f}s)")

    m, wrong = mask.bool(), feats["wrong_before"].bool()
    p_wrong, p_clean = (float(returns[m & w].mean()) if (m & w).any() else 0.0 for w in (wrong, ~wrong))
    ceilings = {name: table_value(k, returns, mask, train) for name, k in lookups.items()}
    ceiling_ev = {name: explained_variance(returns[test], v[test], mask[test]) for name, v in ceilings.items()}
    for name, ev in ceiling_ev.items():
        log(f"{name}: held-out EV {show(ev)}")
    ceiling_ev["linear head on the frozen policy's features (ridge)"] = linear_probe_ev(
        policy, data, returns, train, test
    )
    log(f"ridge value head on frozen policy features: held-out EV {show(ceiling_ev[list(ceiling_ev)[-1]])}")
    clean_target = (p_clean * (1 - feats["wrong_before"])) * mask
    kw = dict(lr=args.critic_learning_rate, epochs=args.epochs, every=args.every, log=log)
    rows = [f"| {name}, fitted on the training rollouts | {show(ev)} |" for name, ev in ceiling_ev.items()]
    if args.task == "chain":
        log("critic on the outcome (Monte-Carlo) target:")
        outcome_curve = train_critic(policy, data, returns, train, test, **kw)
        log("critic on the noise-free 'no wrong step yet' target (positive control):")
        control_curve = train_critic(policy, data, clean_target, train, test, **kw)
        rows += [f"| critic, outcome target, after {s} steps (lr {args.critic_learning_rate:g}) | {show(ev)} |"
                 for s, ev in outcome_curve]  # fmt: skip
        rows += [f"| positive control: critic on the noise-free target, after {s} steps (EV of that target) | "
                 f"{show(ev)} |" for s, ev in control_curve]  # fmt: skip
    pretrain_lines, gate_lines = [], []
    if args.task in ("checked", "hard"):
        rows += checked_diagnosis(policy, data, returns, train, test, args, log)
        best_lookup = max(ev for name, ev in ceiling_ev.items() if name.startswith("lookup") and ev is not None)
        critic_ev = None
        if args.pretrain_max_rollouts != 0:
            pretrain_lines, critic_ev = checked_pretrain(policy, tokenizer, a, data, returns, test, log)
        gate_lines = [
            "",
            f"**Gate** (issue 13): lookup value on the true features >= 0.50: {best_lookup:.3f} "
            f"({'pass' if best_lookup >= 0.5 else 'FAIL'}); the benchmark's critic after value pre-training >= "
            + (
                "0.30: not run (--pretrain_max_rollouts 0)."
                if args.pretrain_max_rollouts == 0
                else f"0.30 on these held-out rollouts: {show(critic_ev)} "
                f"({'pass' if critic_ev is not None and critic_ev >= 0.3 else 'FAIL'})."
            ),
        ]

    command = " ".join(["python", "benchmarks/critic_probe.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        f"# Critic probe ({args.task} task): can the benchmark's critic learn this task's values?",
        "",
        f"Command: `{command}` ({time.perf_counter() - start:.0f}s, one CPU thread). Warm start of the learning "
        f"benchmark (seed 0), {args.train} training and {args.test} held-out rollouts at temperature 1 "
        "(8 per prompt, disjoint prompts). EV = held-out explained variance of the Monte-Carlo return.",
        "",
        f"- success rate {100 * float(success.mean()):.1f} %; per token, P(success | a wrong step already "
        f"written) = {100 * p_wrong:.1f} % and P(success | none yet) = {100 * p_clean:.1f} %; "
        f"{100 * float(wrong[m].float().mean()):.0f} % of the valid tokens come after a wrong step.",
        "",
        "| value | held-out EV |",
        "|---|---|",
        *rows,
        *pretrain_lines,
        *gate_lines,
    ]
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))
    return 0


def checked_diagnosis(policy, data, returns, train, test, args, log) -> list[str]:
    """Why the critic starts flat: the trainer's critic (zero head) against other head starts and learning rates,
    the same number of steps on the same rollouts."""
    if args.diagnose_steps <= 0:
        return []
    variants = [("zero", args.critic_learning_rate), ("zero", 1e-2 if args.critic_learning_rate < 1e-2 else 1e-3),
                ("normal", args.critic_learning_rate), ("ridge", args.critic_learning_rate)]  # fmt: skip
    rows = []
    every = max(1, args.diagnose_steps // 4)
    for head, lr in variants:
        log(f"critic on the outcome target, head {head}, lr {lr:g}:")
        curve = train_critic(policy, data, returns, train, test, lr=lr, epochs=args.epochs, every=every, log=log,
                             head_init=head, max_steps=args.diagnose_steps)  # fmt: skip
        name = {"zero": "zero value head (the trainer's)", "normal": "random value head (std 1/sqrt(d))",
                "ridge": "value head = ridge fit on the frozen features"}[head]  # fmt: skip
        rows.append(f"| critic, outcome target, {name}, lr {lr:g}, batch 32: EV after "
                    + ", ".join(f"{s}" for s, _ in curve) + " steps | "
                    + ", ".join(show(ev) for _, ev in curve) + " |")  # fmt: skip
    return rows


def checked_pretrain(policy, tokenizer, a, data, returns, test, log):
    """The learning benchmark's value pre-training (learning_run.pretrained_critic: value_pretrain.py with the
    benchmark's settings; cached, so the learning run then starts from these very critics) on its own rollouts of
    the warm start; the resulting critics' EV on the probe's held-out rollouts."""
    from learning_run import pretrain_settings, pretrained_critic
    from value_pretrain import critic_predict

    lines = ["", "**Value pre-training** (`value_pretrain.py` as the learning benchmark runs it before RL, once per "
             f"critic shape; settings `{pretrain_settings(a)}`), on its own rollouts of the warm start:", "",
             "| critic | rollouts sampled (held-out incl.) | critic steps | held-out EV per round of 64 steps "
             "| stopped by | EV on the probe's held-out rollouts |", "|---|---|---|---|---|---|"]  # fmt: skip
    evs = []
    for method, name in (("vapo", "1 head (vapo, no-HVM methods)"), ("synapo", "2 heads (HVM: local, global)")):
        log(f"value pre-training, {name}:")
        critic, info = pretrained_critic(a, method, policy, tokenizer, log=log)
        heads = critic.config.num_labels
        values = critic_predict(critic, {k: v[test] for k, v in data.items()})
        probe_ev = [explained_variance(returns[test], values[..., h], data["mask"][test]) for h in range(heads)]
        evs.append(min(-1.0 if e is None else e for e in probe_ev))
        per_round = "; ".join("/".join(f"{e:.2f}" for e in c["ev"]) for c in info["curve"])
        lines.append(f"| {name} | {info['rollouts']} | {info['steps']} | {per_round} | {info['stopped']} | "
                     + ", ".join(show(e) for e in probe_ev) + " |")  # fmt: skip
    return lines, min(evs)


if __name__ == "__main__":
    raise SystemExit(main())
