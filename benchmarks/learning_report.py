"""The learning benchmark's report: Markdown table, learning curves and the credit-assignment picture (learning.py)."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os

# two-sided 95 % quantiles of Student's t, df = 1..30 (above: 1.96)
# fmt: off
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
# fmt: on


def t975(df: float) -> float:
    return T975[max(1, int(math.floor(df))) - 1] if df < 31 else 1.96


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval (nan with one value)."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, t975(n - 1) * math.sqrt(var / n)


def welch_diff(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """mean(xs) - mean(ys) and the half-width of its 95 % Welch interval (nan if either has < 2 values)."""
    d = sum(xs) / len(xs) - sum(ys) / len(ys)
    if len(xs) < 2 or len(ys) < 2:
        return d, float("nan")
    vx = sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / (len(xs) - 1) / len(xs)
    vy = sum((y - sum(ys) / len(ys)) ** 2 for y in ys) / (len(ys) - 1) / len(ys)
    if vx + vy == 0:
        return d, 0.0
    df = (vx + vy) ** 2 / (vx**2 / (len(xs) - 1) + vy**2 / (len(ys) - 1))
    return d, t975(df) * math.sqrt(vx + vy)


def samples_to(curve: list[dict], threshold: float, axis: str = "samples") -> float | None:
    """Samples (or generated tokens, `axis="tokens"`) at which the greedy curve first reaches `threshold` (linear
    between evaluations); None if never."""
    prev = None
    for point in curve:
        if point["greedy"] >= threshold:
            if prev is None or point["greedy"] == prev["greedy"]:
                return float(point[axis])
            frac = (threshold - prev["greedy"]) / (point["greedy"] - prev["greedy"])
            return prev[axis] + frac * (point[axis] - prev[axis])
        prev = point
    return None


def has_tokens(run: dict) -> bool:
    """Runs made before the benchmark counted generated tokens have no `tokens` on their curve."""
    return all("tokens" in p for p in run["curve"])


def greedy_at(curve: list[dict], x: float, axis: str = "tokens") -> float:
    """The greedy curve at `x` samples or tokens (linear between evaluations, flat before the first and after the
    last)."""
    pts = [(p[axis], p["greedy"]) for p in curve]
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def equal_tokens_budget(runs: dict[str, list[dict]]) -> float | None:
    """The largest generated-token count every run reached (the headline comparison's budget); None when a run has
    no token count."""
    flat = [r for rs in runs.values() for r in rs]
    if not flat or not all(has_tokens(r) for r in flat):
        return None
    return float(min(r["curve"][-1]["tokens"] for r in flat))


def mega(tokens: float) -> str:
    return f"{tokens / 1e6:.2f}M"


def critic_ev(runs: list[dict], key: str = "critic/vf_explained_var", first: int | None = None) -> str:
    """Median over the runs' optimizer steps of the critic's explained variance (measured before each update).

    Steps whose batch scored all 0 or all 1 (mean reward 0 or 1) are left out: their return is constant, so the
    explained variance is undefined (verl's formula then gives ~1 for any near-constant critic)."""
    old = "critic/explained_variance"  # the name in runs stored before the canonical metric names
    evs = []
    for r in runs:
        logs = r["train_logs"]
        ev, reward = logs.get(key, logs.get(old, [])), logs.get("reward", [])
        paired = zip(ev, reward, strict=True) if len(ev) == len(reward) else ((x, 0.5) for x in ev)
        paired = list(paired)[:first]  # the first `first` RL steps (all with None)
        evs += [x for x, mean_reward in paired if 0.0 < mean_reward < 1.0]
    evs.sort()
    return f"{evs[len(evs) // 2]:.2f}" if evs else "-"


def value_start(runs: list[dict]) -> str:
    """Checked task: the value pre-training's mean rollouts and held-out EV, or the oracle's continuations per run."""
    pre = [r["value_pretrain"] for r in runs if r.get("value_pretrain")]
    if pre:
        evs = [min(e if e is not None else float("nan") for e in p["final_ev"]) for p in pre]
        return (f"pre-training: {sum(p['rollouts'] for p in pre) / len(pre):.0f} rollouts, EV "
                f"{sum(evs) / len(evs):.2f}")  # fmt: skip
    oracle = [r["oracle"] for r in runs if r.get("oracle")]
    if oracle:
        return (
            f"oracle: {sum(o['continuations'] for o in oracle) / len(oracle):.0f} continuations (K={oracle[0]['k']})"
        )
    return "-"


def credit_shares(runs: list[dict], tokens_per_step: int = 8) -> tuple[float, float] | None:
    """On the picture's responses (final critic, advantages not whitened), averaged over responses and seeds:
    (share of sum |A| on the first half of the tokens, share of the wrong answers' negative advantage that sits
    on their first wrong step's tokens). Even spread: 0.5 and tokens_per_step / response length (~0.08)."""
    early, on_step = [], []
    for run in runs:
        for item in run.get("credit") or []:
            adv = item["advantages"]
            total = sum(abs(x) for x in adv)
            if total > 0:
                early.append(sum(abs(x) for x in adv[: len(adv) // 2]) / total)
            k = item.get("wrong_step")
            blame = [max(-x, 0.0) for x in adv]
            if k is not None and sum(blame) > 0:
                on_step.append(sum(blame[k * tokens_per_step : (k + 1) * tokens_per_step]) / sum(blame))
    if not early:
        return None
    return sum(early) / len(early), (sum(on_step) / len(on_step) if on_step else float("nan"))


def own_blame_table(runs: dict[str, list[dict]], order: list[str]) -> list[str]:
    """Blame on the first wrong step on each arm's own final rollouts (learning_run.own_blame), mean over seeds."""
    rows = []
    for m in order:
        measured = [r["own_blame"] for r in runs[m] if r.get("own_blame") and r["own_blame"]["measured"]]
        if measured:
            share, even = mean_ci([b["share"] for b in measured]), mean_ci([b["even"] for b in measured])
            wrong = sum(b["measured"] for b in measured) / len(measured)
            rows.append(f"| {m} | {len(measured)} | {wrong:.0f} | {fmt(*share, scale=1, digits=2)} | "
                        f"{fmt(*even, scale=1, digits=2)} |")  # fmt: skip
    if not rows:
        return []
    prompts = next(r["own_blame"]["responses"] for m in order for r in runs[m] if r.get("own_blame"))
    return [
        "",
        "**Blame on the arm's own rollouts** (after training: the final policy answers the first held-out prompts "
        f"through the trainer's own rollout path, {prompts} answers a run, trees for a tree arm; the trainer's own "
        "advantages, not whitened): of each wrong answer's negative advantage, the share on its first wrong step's "
        "tokens; 'even' is that step's share of the answer's tokens (GRPO's one advantage a row lands there).",
        "",
        "| method | runs | wrong answers a run | blame on the first wrong step | even spread |",
        "|---|---|---|---|---|",
        *rows,
    ]


def load_runs(out: str, key: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(out, "runs", "*.json"))):
        with open(path) as f:
            run = json.load(f)
        if run.get("setup_key") == key:
            runs.setdefault(run["method"], []).append(run)
    return runs


def fmt(mean: float, half: float, scale: float = 100.0, digits: int = 1) -> str:
    if math.isnan(half):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"


TITLES = {
    "chain": "# Learning benchmark: held-out accuracy on a 12-step chain with one sparse reward",
    "checked": "# Learning benchmark, checked task: credit assignment where a critic can learn the values",
}
TITLES["hard"] = "# Learning benchmark, hard task: six misconceptions, a task GRPO does not saturate"
TASKS = {
    "chain": "Task (`benchmarks/task_chain.py`): 12 steps of invertible arithmetic mod 10, one step per blank-line "
    "segment, ~100 answer tokens; reward 1 iff the strict full format and the right final digit (chance "
    "about 10 %). Warm start: a tiny Qwen2 supervised on imperfect traces (random slips and three systematic "
    "misconceptions). 'exact chain' = every step right. Policy lr, batch and group size are the same for "
    "all methods; GRPO is TRL's `GRPOTrainer` with its defaults otherwise.",
    "checked": "Task (`benchmarks/task_checked.py`): the chain's format (12 steps mod 10, one step per blank-line "
    "segment, ~100 answer tokens) with 0-3 *risky* operations per prompt (the three misconceptions), reward 1 iff "
    "the whole worked chain is exactly right (a wrong chain never scores). Warm start: a tiny Qwen2 supervised on "
    "traces that do a risky step the misconceived way 70 % of the time and any other step wrong 1 % of the time, so "
    "the value falls to 0 at the token where a wrong result is written (critic_probe.md). VAPO/SynAPO methods start "
    "from VAPO's value pre-training (`value_pretrain.py`: Monte-Carlo returns of the warm start until the held-out "
    "explained variance reaches its target or stops improving; its rollouts count as samples); PPO has none. "
    "`*-oracle`: Monte-Carlo values at segment starts from the current policy instead of a critic "
    "(`oracle_values.py`; their continuations are not counted in the budget, see the last column). Policy lr, batch "
    "and group size are the same for all methods; GRPO is TRL's `GRPOTrainer` with its defaults otherwise.",
}
TASKS["hard"] = (
    "Task (`benchmarks/task_hard.py`): the checked task with six misconceptions instead of three, 0-4 risky "
    "operations per prompt (P(0) = 0.1) and a warm start that does a risky step the misconceived way 80 % of the "
    "time; reward 1 iff the whole worked chain is exactly right. Methods, value pre-training and the oracle arm as "
    "on the checked task."
)


def write_report(a, key: str, header: list[str]) -> str:
    """Write `<out>/learning.md` and the two pictures from the finished runs of setup `key`; returns the path."""
    runs = load_runs(a.out, key)
    order = [m for m in a.methods if m in runs] + sorted(set(runs) - set(a.methods))
    task = getattr(a, "task", "chain")
    lines = [TITLES[task], "", *header, ""]
    if not runs:
        lines.append("No finished runs yet.")
    else:
        any_run = runs[order[0]][0]
        n_eval, budget = any_run["setup"]["eval_prompts"], any_run["setup"]["samples"]
        token_budget = any_run["setup"].get("token_budget", 0)
        start = any_run["curve"][0]["greedy"]
        binom = math.sqrt(max(start * (1 - start), 0.01) / n_eval)
        lines += [
            TASKS[task],
            "",
            f"Setup `{key}`: every method starts from the same warm start (greedy held-out accuracy "
            f"{100 * start:.1f} %) and gets {budget} generated completions ("
            + (
                "critic warm-up rollouts included). "
                if task == "chain"
                else f"or {mega(token_budget)} generated tokens, whichever comes first; the tokens count every token "
                "a policy forward generated for the run: training rollouts (a tree's shared prefixes once), the value "
                "pre-training's rollouts, Monte-Carlo continuations). "
                if token_budget
                else "the shared value pre-training's "
                "rollouts not included: see 'value start'; the oracle's continuations not included either; the "
                "generated-token columns count all of them: every token a policy forward generated for the run). "
            )
            + f"Accuracy = greedy pass@1 on {n_eval} held-out prompts (strict format, final answer right), in %. "
            f"Intervals are 95 % t intervals over seeds; differences use Welch's interval. 'critic EV': median "
            "over all steps and seeds of the critic's explained variance on each new rollout batch, before the "
            "critic's update on it (1 = perfect values, 0 = no better than a constant; `critic_probe.md` measures "
            "how much of the return a critic can explain on this task).",
            "",
            f"| method | seeds | greedy acc at {budget // 2} | final greedy acc | exact chain | final T=1 acc | "
            f"samples to {100 * a.threshold:.0f} % (reached) | generated tokens per run (rollout tokens a sample) | "
            f"tokens to {100 * a.threshold:.0f} % | final vs grpo | final vs synapo | critic EV | min/run |"
            + (" critic EV vs outcome (first 64 steps / all) | value start |" if task != "chain" else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if task != "chain" else ""),
        ]
        finals = {m: [r["final_greedy"] for r in runs[m]] for m in order}
        noise = []
        for m in order:
            rs = runs[m]
            greedy, t1 = mean_ci(finals[m]), mean_ci([r["final_t1"] for r in rs])
            half_way = mean_ci([_grid([r], budget // 2, budget)[1][0][1] for r in rs])
            exact = mean_ci([r.get("final_greedy_exact", float("nan")) for r in rs])
            reach = [samples_to(r["curve"], a.threshold) for r in rs]
            hit = [x for x in reach if x is not None]
            to = f"{sum(hit) / len(hit):.0f} ({len(hit)}/{len(rs)})" if hit else f"> {budget} (0/{len(rs)})"
            tokens, tokens_to = "-", "-"
            if all(has_tokens(r) for r in rs):
                rollout = sum(r["generated_tokens"]["rollouts"] / r["samples"] for r in rs) / len(rs)
                tokens = f"{mega(sum(r['curve'][-1]['tokens'] for r in rs) / len(rs))} ({rollout:.0f} a sample)"
                hit_t = [x for x in (samples_to(r["curve"], a.threshold, "tokens") for r in rs) if x is not None]
                tokens_to = f"{mega(sum(hit_t) / len(hit_t))} ({len(hit_t)}/{len(rs)})" if hit_t else "never"
            cells = []
            for ref in ("grpo", "synapo"):
                cell, inside = versus(finals, m, ref)
                cells.append(cell)
                if inside is not None and (ref == "grpo" or m != "grpo"):
                    noise.append((m, ref, inside))
            wall = sum(r["wall_s"] for r in rs) / len(rs) / 60
            lines.append(
                f"| {m} | {len(rs)} | {fmt(*half_way)} | {fmt(*greedy)} | {fmt(*exact)} | {fmt(*t1)} | {to} "
                f"| {tokens} | {tokens_to} | {cells[0]} | {cells[1]} | {critic_ev(rs)} | {wall:.1f} |"
                + (
                    f" {critic_ev(rs, 'critic/ev_outcome', 64)} / {critic_ev(rs, 'critic/ev_outcome')} | "
                    f"{value_start(rs)} |"
                    if task != "chain"
                    else ""
                )
            )
        lines += equal_tokens_table(runs, order)
        inside = sorted({f"{m} vs {ref}" for m, ref, ins in noise if ins})
        outside = sorted({f"{m} vs {ref}" for m, ref, ins in noise if not ins})
        credit_rows = [(m, credit_shares(runs[m])) for m in order]
        credit_rows = [(m, c) for m, c in credit_rows if c is not None]
        if credit_rows:
            length = len(next(r for m, _ in credit_rows for r in runs[m] if r["credit"])["credit"][0]["advantages"])
            lines += [
                "",
                "**Where the credit went** (the credit picture's fixed held-out responses, each run's final critic, "
                f"advantages not whitened, mean over responses and seeds; {length} tokens, 8 per step): share of "
                "sum |A| on the first half of the answer (even spread: 0.50), and share of a wrong answer's negative "
                f"advantage on its first wrong step (even spread: {8 / length:.2f}).",
                "",
                "| method | \\|A\\| on the first half | blame on the wrong step |",
                "|---|---|---|",
                *[f"| {m} | {early:.2f} | {step:.2f} |" for m, (early, step) in credit_rows],
            ]
        lines += own_blame_table(runs, order)
        lines += [
            "",
            f"**Noise.** One evaluation of {n_eval} prompts has a binomial standard error of about "
            f"{100 * binom:.1f} points. Differences whose 95 % interval contains 0 are inside the noise: "
            f"{', '.join(inside) or 'none'}. Outside it: {', '.join(outside) or 'none'}. "
            "With fewer than 2 seeds no interval exists and every difference counts as noise.",
        ]
        if importlib.util.find_spec("matplotlib") is None:
            print("matplotlib is not installed: no pictures (pip install matplotlib)", flush=True)
            lines += ["", "(No pictures: matplotlib was not installed when this report was written.)"]
        else:  # embed only what was drawn now (an older picture in the folder would not match the table)
            plot_curves(runs, order, a, os.path.join(a.out, "learning_curves.png"))
            lines += ["", "![learning curves](learning_curves.png)"]
            if plot_credit(runs, os.path.join(a.out, "learning_credit.png")):
                lines += ["", "![credit assignment](learning_credit.png)"]
    path = os.path.join(a.out, "learning.md")
    os.makedirs(a.out, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(line for line in lines if not line.startswith("![")), flush=True)
    return path


def versus(values: dict[str, list[float]], m: str, ref: str) -> tuple[str, bool | None]:
    """(cell, inside the noise) of method m against ref: Welch's difference of their values over seeds; ("", None)
    for m itself or a method with no runs."""
    if ref == m or ref not in values:
        return "", None
    d, half = welch_diff(values[m], values[ref])
    inside = math.isnan(half) or abs(d) <= half
    return fmt(d, half) + (" (noise)" if inside else ""), inside


def equal_tokens_table(runs: dict[str, list[dict]], order: list[str]) -> list[str]:
    """The headline: greedy accuracy of every method at the same number of generated tokens (the largest count
    every run reached), with Welch intervals against grpo and synapo."""
    budget = equal_tokens_budget(runs)
    if budget is None:
        return ["", "**At equal generated tokens**: not available (runs made before the benchmark counted tokens)."]
    at = {m: [greedy_at(r["curve"], budget) for r in runs[m]] for m in order}
    lines = [
        "",
        f"**At equal generated tokens** (the headline): greedy accuracy at {mega(budget)} generated tokens, the "
        "largest count every run reached (training rollouts, value pre-training rollouts and Monte-Carlo "
        "continuations all counted; the held-out evaluations are not), in %.",
        "",
        f"| method | seeds | greedy at {mega(budget)} tokens | vs grpo | vs synapo |",
        "|---|---|---|---|---|",
    ]
    for m in order:
        cells = [versus(at, m, ref)[0] for ref in ("grpo", "synapo")]
        lines.append(f"| {m} | {len(at[m])} | {fmt(*mean_ci(at[m]))} | {cells[0]} | {cells[1]} |")
    return lines


def _grid(runs: list[dict], step: int, budget: int) -> tuple[list[int], list[list[float]]]:
    """Each run's greedy curve interpolated onto 0, step, 2*step, ..., budget."""
    xs = list(range(0, budget + 1, step))
    if xs[-1] != budget:
        xs.append(budget)
    ys = []
    for r in runs:
        pts = [(p["samples"], p["greedy"]) for p in r["curve"]]
        row = []
        for x in xs:
            right = next((i for i, (s, _) in enumerate(pts) if s >= x), len(pts) - 1)
            if right == 0 or pts[right][0] <= x:
                row.append(pts[right][1])
            else:
                (s0, y0), (s1, y1) = pts[right - 1], pts[right]
                row.append(y0 + (y1 - y0) * (x - s0) / (s1 - s0))
        ys.append(row)
    return xs, ys


def plot_curves(runs: dict[str, list[dict]], order: list[str], a, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_tokens = all(has_tokens(r) for rs in runs.values() for r in rs)
    fig, axes = plt.subplots(1, 3 if with_tokens else 2, figsize=(19.5 if with_tokens else 13, 4.8))
    for i, m in enumerate(order):
        # a distinct (colour, line style) per method: tab10's 10 colours, then the same colours dashed, dotted
        color, style = plt.cm.tab10(i % 10), ("-", "--", ":")[(i // 10) % 3]
        xs, ys = _grid(runs[m], a.eval_every, a.samples)
        stats = [mean_ci([row[j] for row in ys]) for j in range(len(xs))]
        mean = [100 * s[0] for s in stats]
        half = [0.0 if math.isnan(s[1]) else 100 * s[1] for s in stats]
        axes[0].plot(xs, mean, color=color, ls=style, label=f"{m} (n={len(ys)})")
        for row in ys:  # each seed, thin
            axes[0].plot(xs, [100 * y for y in row], color=color, ls=style, lw=0.5, alpha=0.5)
        axes[0].fill_between(
            xs,
            [max(0.0, m_ - h) for m_, h in zip(mean, half, strict=True)],
            [min(100.0, m_ + h) for m_, h in zip(mean, half, strict=True)],
            color=color,
            alpha=0.15,
        )
        rewards = [r["train_logs"].get("reward", []) for r in runs[m]]
        n = min(map(len, rewards)) if rewards else 0
        if n:
            avg = [sum(r[j] for r in rewards) / len(rewards) for j in range(n)]
            k = max(1, n // 20)  # moving average over ~1/20 of the run
            smooth = [sum(avg[max(0, j - k) : j + 1]) / len(avg[max(0, j - k) : j + 1]) for j in range(n)]
            offset = runs[m][0].get("warmup_samples", 0)  # critic warm-up rollouts come first
            xs_reward = [offset + a.batch * (j + 1) for j in range(n)]
            axes[1].plot(xs_reward, [100 * s for s in smooth], color=color, ls=style, label=m)
        if with_tokens:  # each seed's curve against its own generated tokens, and the mean on a shared grid
            top = min(r["curve"][-1]["tokens"] for r in runs[m])
            grid = [top * j / 40 for j in range(41)]
            for r in runs[m]:
                axes[2].plot([p["tokens"] / 1e6 for p in r["curve"]], [100 * p["greedy"] for p in r["curve"]],
                             color=color, ls=style, lw=0.5, alpha=0.5)  # fmt: skip
            mean_t = [100 * sum(greedy_at(r["curve"], x) for r in runs[m]) / len(runs[m]) for x in grid]
            axes[2].plot([x / 1e6 for x in grid], mean_t, color=color, ls=style, label=m)
    axes[0].axhline(100 * a.threshold, color="grey", ls=":", lw=1)
    axes[0].set(
        xlabel="samples seen (generated completions)",
        ylabel="held-out greedy accuracy (%)",
        title="Held-out accuracy (mean, 95 % CI over seeds; thin: each seed)",
    )
    axes[1].set(
        xlabel="samples seen (generated completions)",
        ylabel="training reward at T=1 (%)",
        title="Training reward (mean over seeds, smoothed)",
    )
    if with_tokens:
        axes[2].axhline(100 * a.threshold, color="grey", ls=":", lw=1)
        axes[2].set(
            xlabel="generated tokens (millions: rollouts, value pre-training, Monte-Carlo continuations)",
            ylabel="held-out greedy accuracy (%)",
            title="Held-out accuracy against generated tokens (mean; thin: each seed)",
        )
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _show(token: str) -> str:
    return {"\n\n": "¶", "<eos>": "eos"}.get(token, token)


CREDIT_METHODS = ("synapo", "synapo-oracle", "vapo", "vapo-oracle", "ppo")  # the oracle arm beside its method


def plot_credit(runs: dict[str, list[dict]], path: str) -> bool:
    """Each fixed response as rows of segments (one row per step), tokens coloured by advantage on one colour scale
    for the whole picture (+-max |A| over every panel), so panels compare; False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    panels = [(m, min(runs[m], key=lambda r: r["seed"])) for m in CREDIT_METHODS if m in runs]
    panels = [(m, r) for m, r in panels if r.get("credit")]
    if not panels:
        return False
    items = len(panels[0][1]["credit"])
    scale = max([1e-6] + [abs(x) for _, run in panels for item in run["credit"] for x in item["advantages"]])
    norm = TwoSlopeNorm(vmin=-scale, vcenter=0.0, vmax=scale)  # one scale for every panel
    fig, axes = plt.subplots(items, len(panels), figsize=(5.2 * len(panels), 4.6 * items), squeeze=False)
    for col, (method, run) in enumerate(panels):
        for row, item in enumerate(run["credit"]):
            ax = axes[row][col]
            adv = item["advantages"]
            vmax = max(abs(x) for x in adv) if adv else 0.0
            seg, pos = 0, 0
            for token, value in zip(item["tokens"], adv, strict=True):
                ax.add_patch(plt.Rectangle((pos, -seg), 1, 1, color=plt.cm.RdBu(norm(value))))
                ax.text(pos + 0.5, -seg + 0.5, _show(token), ha="center", va="center", fontsize=7)
                pos += 1
                if token == "\n\n":  # the delimiter closes its segment: next row
                    ax.axhline(-seg, color="black", lw=0.6)
                    seg, pos = seg + 1, 0
            wrong = item.get("wrong_step")
            if wrong is not None:
                ax.add_patch(plt.Rectangle((0, -wrong), 8, 1, fill=False, edgecolor="orange", lw=2))
            ax.set_xlim(0, 8)
            ax.set_ylim(-seg, 1)
            ax.set_yticks([-k + 0.5 for k in range(seg + 1)], [f"seg {k}" for k in range(seg + 1)], fontsize=6)
            ax.set_xticks([])
            outcome = "correct" if item["score"] else f"wrong (first wrong step {wrong}, boxed)"
            ax.set_title(f"{method} (seed {run['seed']}): {outcome}\nmax |A| = {vmax:.3f}", fontsize=9)
    fig.suptitle(
        "Where each method puts the blame: per-token advantage\n(blue +, red -, not whitened) on fixed held-out "
        f"warm-start responses, one colour scale for every panel (|A| up to {scale:.3f});\ncritic (or the oracle's "
        "values) at the end of training; one row per segment (ends at the '\\n\\n' token ¶)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="RdBu"), ax=axes, fraction=0.02, pad=0.01)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
