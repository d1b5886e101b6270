"""A credit-assignment task whose values a critic can learn: a 12-step checked chain (issue 13).

Same surface as `task_chain.py` (prompt, one step per blank-line segment, ~100 answer tokens, same tokenizer and
model), three differences that make the value learnable while keeping credit a real problem:

1. **The outcome is the whole worked answer**: reward 1 iff the completion is exactly the right worked chain (every
   step's input, operation and result right, then ``ans:d``, then eos), as a grader that checks the working would
   give. A wrong chain never scores by chance (task_chain's final-digit reward: 8.8 % of wrong chains scored).
2. **Errors sit at few, identifiable steps**: each prompt holds 0-3 *risky* operations (the three misconception
   pairs of task_chain: ``*7`` done as ``*3``, ``-8`` as ``+8``, ``+9`` as ``-9``) at random positions; the warm
   start's traces do a risky operation the wrong way with probability ``bug_rate`` and any other step wrong with
   only ``noise`` (0.01). So the true value is P(every remaining risky step done right), a step function that falls
   to 0 at the token where a wrong result is written and is visible in the tokens (``c:4*7=2`` instead of ``=8``).
3. The number of risky operations per prompt is drawn from ``risky_probs`` (P(0) = 0.2): greedy, the warm start gets
   the risky steps wrong, so it solves mainly the prompts without one.

RL has to find the risky steps inside a 13-segment answer from one sparse 0/1 reward and flip them; a critic that
learns the value drop at the wrong step can put the blame there. Interface as in task_chain (the learning benchmark
and the critic probe take ``--task checked``); `true_features` gives the probe the value's true features.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass

import torch
from datasets import Dataset
from task_chain import (  # noqa: F401  (re-exported: the task interface)
    BUGS,
    DELIMITER,
    LABELS,
    OPS,
    answer,
    answer_regex,
    apply,
    completion_length,
    fit_warm_start,
    generate,
    make_model,
    make_tokenizer,
    parse_prompt,
    write_trace,
    wrong_digit,
)

NAME = "checked"
RISKY = sorted(BUGS)  # [("*", 7), ("+", 9), ("-", 8)]
SAFE = [op for op in OPS if op not in BUGS]
STEP = re.compile(r"([a-z]):(\d)([+\-*])(\d)=(\d)")


@dataclass(frozen=True)
class TaskConfig:
    """The task and its warm start (every field enters the cache key)."""

    num_steps: int = 12  # operations per chain (answer steps)
    risky_probs: tuple[float, ...] = (0.2, 0.35, 0.3, 0.15)  # P(0, 1, 2, 3 risky operations in a prompt)
    noise: float = 0.01  # warm-start traces: probability that a safe step is a random wrong digit
    bug_rate: float = 0.7  # warm-start traces: probability that a risky step is done the misconceived way
    num_eval: int = 500  # held-out prompts (never trained on)
    data_seed: int = 1234  # seed of the held-out set
    # warm-start model and its supervised training
    hidden_size: int = 64
    num_layers: int = 2
    sft_steps: int = 3000
    sft_batch: int = 64
    sft_lr: float = 1e-3


def bugs_of(cfg) -> dict:
    """The task's misconceptions {(op, k): wrong step}: `cfg.misconceptions` where the config has them (the hard
    task), else task_chain's three."""
    return misconception_table(cfg.misconceptions) if hasattr(cfg, "misconceptions") else BUGS


def misconception_table(misconceptions: tuple[str, ...]) -> dict:
    """{(op, k): v -> wrong result} from entries like ``"*7>*3"`` (``*7`` done as ``*3``)."""
    table = {}
    for entry in misconceptions:
        (op, k), (wrong_op, wrong_k) = ((m[0], int(m[1])) for m in entry.split(">"))
        table[(op, k)] = lambda v, o=wrong_op, w=wrong_k: apply(o, w, v)
    return table


def name_of(cfg) -> str:
    """The task's name (seeds of its prompt streams, cache keys): `cfg.name` where the config has one."""
    return getattr(cfg, "name", NAME)


def make_prompt(rng: random.Random, num_steps: int, risky_probs=TaskConfig.risky_probs, bugs: dict = BUGS):
    """(prompt, start, ops): `num_steps` operations, of which 0-3 (drawn from `risky_probs`) are risky (in
    `bugs`)."""
    risky, safe = sorted(bugs), [op for op in OPS if op not in bugs]  # RISKY, SAFE for task_chain's BUGS
    start = rng.randrange(10)
    n_risky = rng.choices(range(len(risky_probs)), weights=risky_probs)[0]
    where = set(rng.sample(range(num_steps), n_risky))
    ops = [rng.choice(risky) if i in where else rng.choice(safe) for i in range(num_steps)]
    prompt = str(start) + "".join(f"{LABELS[i]}{op}{k}" for i, (op, k) in enumerate(ops)) + "\n"
    return prompt, start, ops


def trace(start: int, ops: list[tuple[str, int]], rng: random.Random | None = None, cfg: TaskConfig | None = None):
    """The answer text; with `rng` and `cfg`, an imperfect warm-start trace (later steps consistent with it)."""
    if rng is None:
        return write_trace(start, ops)

    bugs = bugs_of(cfg)

    def step(op: str, k: int, value: int) -> int:
        if (op, k) in bugs:  # a risky step: misconceived with probability bug_rate, never noisy
            return bugs[(op, k)](value) if rng.random() < cfg.bug_rate else apply(op, k, value)
        result = apply(op, k, value)
        return wrong_digit(rng, result) if rng.random() < cfg.noise else result

    return write_trace(start, ops, step)


def score(prompt: str, completion: str, ended: bool = True) -> float:
    """1.0 iff `completion` is exactly the right worked chain for `prompt` (all steps and the answer), ended by eos."""
    return float(ended and completion == trace(*parse_prompt(prompt)))


def first_wrong_step(prompt: str, completion: str) -> int | None:
    """Index of the first step that is wrong: its input is not the previous result (the start digit for step 0),
    or its result is wrong for its written input. None: no wrong step among the parsable ones."""
    previous, _ = parse_prompt(prompt)
    for i, m in enumerate(STEP.finditer(completion)):
        x, op, k, y = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
        if x != previous or apply(op, k, x) != y:
            return i
        previous = y
    return None


def dead_prefix(prompt: str, completion_prefix: str) -> bool:
    """No continuation of `completion_prefix` can score: a wrong step is already written (the oracle arm's shortcut:
    its Monte-Carlo estimate there is exactly 0)."""
    return first_wrong_step(prompt, completion_prefix) is not None


# --- data (as task_chain, with this task's prompts) ------------------------------------------------------------------


def held_out_prompts(cfg: TaskConfig) -> list[str]:
    rng = random.Random(f"{name_of(cfg)}-eval-{cfg.data_seed}")
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < cfg.num_eval:
        prompt = make_prompt(rng, cfg.num_steps, cfg.risky_probs, bugs_of(cfg))[0]
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def train_prompts(cfg: TaskConfig, n: int, seed: int, exclude: set[str]) -> list[tuple[str, int, list]]:
    rng = random.Random(f"{name_of(cfg)}-train-{seed}")
    out = []
    while len(out) < n:
        item = make_prompt(rng, cfg.num_steps, cfg.risky_probs, bugs_of(cfg))
        if item[0] not in exclude:
            out.append(item)
    return out


def rl_dataset(cfg: TaskConfig, n: int, seed: int) -> Dataset:
    """RL prompts (disjoint from the held-out set); `answer` reaches the reward function as a keyword."""
    rows = train_prompts(cfg, n, seed + 10_000, set(held_out_prompts(cfg)))
    return Dataset.from_list([{"prompt": p, "answer": answer(s, o)} for p, s, o in rows])


def accuracy(model, tokenizer, prompts, cfg: TaskConfig, temperature: float = 0.0, seed: int = 0) -> float:
    outs = generate(
        model, tokenizer, prompts, max_new_tokens=completion_length(cfg) + 4, temperature=temperature, seed=seed
    )
    return sum(score(p, c, e) for p, (c, e) in zip(prompts, outs, strict=True)) / len(prompts)


# --- the value's true features (for the critic probe) --------------------------------------------------------------


def true_features(prompts: list[str], tokens: list[list[str]], bugs: dict = BUGS) -> dict[str, torch.Tensor]:
    """Per completion token t (the state before it): a wrong step already written (0/1), the step index, and the
    risky steps whose result is not written yet. `tokens`: each completion's token strings, padded to one length."""
    N, T = len(tokens), len(tokens[0])
    wrong_before, step, risky_left = (torch.zeros(N, T, dtype=torch.long) for _ in range(3))
    for n in range(N):  # a diagnostic on a few thousand rollouts, not a hot path
        start, ops = parse_prompt(prompts[n])
        risky = [op in bugs for op in ops]
        text, wrong, k, written = "", False, 0, 0  # written: step results written so far
        for t, token in enumerate(tokens[n]):
            wrong_before[n, t], step[n, t] = int(wrong), k
            risky_left[n, t] = sum(risky[written:])
            text += token
            if token == DELIMITER:
                k += 1
            steps = list(STEP.finditer(text))
            if len(steps) > written and text.endswith(steps[-1].group(0)):
                written = len(steps)
                wrong = wrong or first_wrong_step(prompts[n], text) is not None
    return {"wrong_before": wrong_before, "step": step, "risky_left": risky_left}


# --- warm start ------------------------------------------------------------------------------------------------------


def cache_key(cfg: TaskConfig, seed: int) -> str:
    blob = json.dumps({"task": name_of(cfg), "cfg": asdict(cfg), "seed": seed, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def warm_start(cfg: TaskConfig, seed: int, cache_dir: str, log=print) -> str:
    """Path of the warm-start policy (supervised on imperfect traces), trained once per (config, seed) and cached."""
    name, bugs = name_of(cfg), bugs_of(cfg)
    path = os.path.join(cache_dir, f"warm_start_{name}_{cache_key(cfg, seed)}_s{seed}")
    return fit_warm_start(
        path, cfg, seed, draw=lambda rng: make_prompt(rng, cfg.num_steps, cfg.risky_probs, bugs), trace=trace,
        held_out=held_out_prompts, rng_name=f"{name}-sft-{seed}", log_name=f"{name} s{seed}", log=log,
    )  # fmt: skip
