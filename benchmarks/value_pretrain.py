"""Value pre-training as VAPO does it (arXiv 2504.05118, §4.1): the critic learns the Monte-Carlo returns of the
*fixed* initial policy until its held-out explained variance is good, before RL starts. Benchmark-side (the TRL
trainer's own `value_warmup_steps` is a fixed count of on-line rollout batches).

Why a benchmark-side version: with the trainer's defaults (a critic copied from the policy, a zero value head,
AdamW lr 1e-3, 8 warm-up batches of 32) the critic's explained variance stays at ~0 for 70-130 steps before it
rises (critic_sanity.md; shared/notes/benchmark_pilot.md). `critic_probe.py --task checked` measures the causes;
what this module does about them:

- rollouts of the fixed policy are sampled in rounds and *kept*: the critic makes several passes over them (the
  target does not move while the policy is fixed), instead of one pass over each fresh batch;
- the value head starts from the least-squares fit of the return on the frozen backbone's features (`head_init=
  "ridge"`) instead of zero: a zero head is a saddle (the backbone gets no gradient until the head has grown) and
  starts every token at V = 0 instead of the mean return;
- it stops on a rule, not a count: held-out explained variance >= `target_ev`, or no gain of `min_gain` over
  `patience` rounds, or `max_rollouts` used. Every rollout it samples (held-out ones included) is counted, so a
  learning run charges them to its sample budget.

With HVM (two heads) both heads learn the Monte-Carlo return (gamma 1, one terminal reward: the expected local
target g_(k+1) and the global target are both the return's expectation).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class PretrainSettings:
    """Value pre-training on the fixed initial policy (VAPO §4.1) with a stopping rule."""

    round_rollouts: int = 256  # rollouts sampled per round (32 prompts x 8)
    held_out: int = 256  # rollouts kept aside to measure explained variance (other prompts)
    max_rollouts: int = 2048  # cap on sampled rollouts, held-out ones included
    steps_per_round: int = 48  # critic steps (batch `batch`) after each round, on every rollout kept so far
    batch: int = 32
    lr: float = 1e-3
    head_init: str = "ridge"  # "ridge" (least-squares head on frozen features), "zero" (the trainer's), "normal"
    ridge: float = 1e-2  # L2 of the ridge head, relative to the features' mean square
    target_ev: float = 0.5  # stop when the held-out explained variance reaches it
    min_gain: float = 0.02  # ... or when it gained less than this over `patience` rounds
    patience: int = 2
    cliprange_value: float | None = 0.5  # the trainer's value clip (around the values before each round)
    upfront: bool = False  # sample every rollout first (one pool), then train in rounds of `steps_per_round`
    max_steps: int = 0  # with `upfront`: cap on critic steps


def explained_variance(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> float | None:
    """1 - Var(return - V) / Var(return) over valid tokens; None when the return is constant (undefined)."""
    m = mask.bool()
    target, residual = returns[m].double(), (returns - values)[m].double()
    return float(1 - residual.var() / target.var()) if target.numel() > 1 and target.var() > 0 else None


def sample_rollouts(policy, tokenizer, task, cfg, prompts: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Completions of `prompts` at temperature 1: ids and attention (N, P + T), mask (N, T), score (N,)."""
    T = task.completion_length(cfg) + 4
    outs = task.generate(policy, tokenizer, prompts, max_new_tokens=T, temperature=1.0, seed=seed)
    ids, mask, scores = [], [], []
    for prompt, (text, ended) in zip(prompts, outs, strict=True):
        completion = (tokenizer(text)["input_ids"] + ([tokenizer.eos_token_id] if ended else []))[:T]
        pad = T - len(completion)
        ids.append(tokenizer(prompt)["input_ids"] + completion + [tokenizer.pad_token_id] * pad)
        mask.append([1.0] * len(completion) + [0.0] * pad)
        scores.append(task.score(prompt, text, ended))
    prompt_len = len(tokenizer(prompts[0])["input_ids"])  # every prompt has the same length
    mask_t = torch.tensor(mask)
    attention = torch.cat([torch.ones(len(ids), prompt_len), mask_t], dim=1).long()
    return {"ids": torch.tensor(ids), "attention": attention, "mask": mask_t, "score": torch.tensor(scores)}


def concat(parts: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def critic_predict(critic, data: dict, chunk: int = 256) -> torch.Tensor:
    """(N, T, H) values of `data`'s states."""
    from synapo_ext.trl.critic import critic_values

    was_training, T = critic.training, data["mask"].size(1)
    critic.eval()
    out = torch.cat([critic_values(critic, data["ids"][i : i + chunk], data["attention"][i : i + chunk], T)
                     for i in range(0, data["ids"].size(0), chunk)])  # fmt: skip
    critic.train(was_training)
    return out


@torch.no_grad()
def ridge_head(critic, data: dict, returns: torch.Tensor, ridge: float) -> None:
    """Set the critic's value head (every output) to the ridge regression of `returns` on its frozen features."""
    T = data["mask"].size(1)
    base = critic.base_model if hasattr(critic, "base_model") else critic.model
    hidden = torch.cat([base(input_ids=data["ids"][i : i + 256], attention_mask=data["attention"][i : i + 256])
                        .last_hidden_state[:, -T - 1 : -1] for i in range(0, data["ids"].size(0), 256)])  # fmt: skip
    m = data["mask"].bool()
    x = hidden[m].double()
    x = torch.cat([x, torch.ones(x.size(0), 1, dtype=x.dtype)], dim=1)
    y = returns[m].double()
    gram = x.T @ x
    reg = ridge * gram.diagonal()[:-1].mean() * torch.eye(x.size(1), dtype=x.dtype)
    reg[-1, -1] = 0.0  # no penalty on the bias
    w = torch.linalg.solve(gram + reg, x.T @ y)
    head = critic.score  # Qwen2ForTokenClassification's value head: Linear(hidden, heads) with a bias
    head.weight.copy_(w[:-1].to(head.weight.dtype).expand_as(head.weight))
    head.bias.fill_(float(w[-1]))


def init_head(critic, how: str, data: dict, returns: torch.Tensor, ridge: float, seed: int) -> None:
    head = critic.score
    with torch.no_grad():
        if how == "zero":
            head.weight.zero_()
        elif how == "normal":
            torch.manual_seed(seed)
            head.weight.normal_(0.0, 1.0 / math.sqrt(head.weight.size(1)))
        elif how == "ridge":
            ridge_head(critic, data, returns, ridge)
        else:
            raise ValueError(f"head_init must be zero, normal or ridge, got {how!r}")
        if head.bias is not None and how != "ridge":
            head.bias.zero_()


def pretrain_critic(policy, tokenizer, task, cfg, prompts: list[str], s: PretrainSettings, *, num_heads: int,
                    seed: int, log=print, critic=None):  # fmt: skip
    """Train a critic for `policy` on its Monte-Carlo returns until the stopping rule holds.

    `prompts`: a stream of training prompts (each used for 8 rollouts; the first `s.held_out // 8` are the held-out
    ones). Returns (critic, info): info has the held-out EV after each round, the rollouts sampled (held-out
    included), the critic steps and the reason it stopped."""
    from synapo_ext.core import value_loss
    from synapo_ext.trl.critic import build_critic, critic_values

    start = time.perf_counter()
    group = 8
    need = -(-s.max_rollouts // group)  # held-out and training rollouts together never exceed max_rollouts
    if len(prompts) < need:
        raise ValueError(f"pretrain_critic needs {need} prompts, got {len(prompts)}")
    expand = [p for p in prompts for _ in range(group)]
    held = sample_rollouts(policy, tokenizer, task, cfg, expand[: s.held_out], seed=seed * 7919 + 1)
    held_returns = held["score"][:, None] * held["mask"]
    used, pool, curve = s.held_out, [], []
    torch.manual_seed(seed)  # the critic's fresh parameters and its dropout: the same whatever ran before
    critic = critic if critic is not None else build_critic(None, policy, num_heads=num_heads)
    optimizer = torch.optim.AdamW(critic.parameters(), lr=s.lr)
    gen = torch.Generator().manual_seed(seed)
    steps, best, since_best, reason = 0, -math.inf, 0, "max_rollouts"
    T = held["mask"].size(1)
    r = 0
    while used + s.round_rollouts <= s.max_rollouts or (s.upfront and r > 0):
        if r == 0 or not s.upfront:  # upfront: one pool of every rollout, sampled before the first round
            size = s.max_rollouts - s.held_out if s.upfront else s.round_rollouts
            lo = s.held_out + r * s.round_rollouts
            pool.append(sample_rollouts(policy, tokenizer, task, cfg, expand[lo : lo + size], seed * 7919 + 2 + r))
            used += size
            data = concat(pool)
            returns = data["score"][:, None] * data["mask"]
        if r == 0:
            init_head(critic, s.head_init, data, returns, s.ridge, seed)
            torch.manual_seed(seed)  # dropout: after sampling, whose generate calls reseed the global generator
        old = critic_predict(critic, data) if s.cliprange_value is not None else None
        critic.train()
        for _ in range(s.steps_per_round):
            rows = torch.randint(0, data["ids"].size(0), (s.batch,), generator=gen)
            values = critic_values(critic, data["ids"][rows], data["attention"][rows], T)  # (b, T, H)
            loss = sum(
                value_loss(values[..., h], returns[rows], data["mask"][rows],
                           old_values=None if old is None else old[rows][..., h], cliprange_value=s.cliprange_value)[0]
                for h in range(num_heads)
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            optimizer.step()
            steps += 1
        evs = [
            explained_variance(held_returns, critic_predict(critic, held)[..., h], held["mask"])
            for h in range(num_heads)
        ]
        ev = min(-1.0 if e is None else e for e in evs)
        curve.append({"rollouts": used, "steps": steps, "ev": evs, "seconds": time.perf_counter() - start})
        log(
            f"  value pre-training: {used} rollouts, {steps} critic steps, held-out EV "
            f"{[round(e or 0, 3) for e in evs]}"
        )
        r += 1
        if s.upfront and steps >= s.max_steps:
            reason = "max_steps"
            break
        if ev >= s.target_ev:
            reason = "target_ev"
            break
        if ev > best + s.min_gain:
            best, since_best = ev, 0
        else:
            since_best += 1
            if since_best >= s.patience:
                reason = "plateau"
                break
    tokens = int(held["mask"].sum()) + sum(int(part["mask"].sum()) for part in pool)  # eos included, no padding
    info = {"settings": asdict(s), "curve": curve, "rollouts": used, "generated_tokens": tokens, "steps": steps,
            "stopped": reason, "final_ev": curve[-1]["ev"] if curve else None,
            "seconds": time.perf_counter() - start}  # fmt: skip
    return critic, info
