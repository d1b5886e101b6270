"""The learning benchmark's task: a 12-step chain of invertible arithmetic mod 10, one sparse outcome reward.

Prompt (38 tokens): a start digit, then 12 labelled operations, e.g. ``7a+3b*7c-2d+9e*3f-1g+6h*9i+4j-8k*7l+5\\n``.
Answer (101 tokens + eos): one step per operation, steps separated by a blank line (one ``"\\n\\n"`` token, so
HVM's segmenter finds the boundaries), then the final answer::

    a:7+3=0\\n\\nb:0*7=0\\n\\n ... l:4+5=9\\n\\nans:9<eos>

Every operation is a bijection of Z/10 (``+k``, ``-k`` with k in 1..9, ``*k`` with k in {3, 7, 9}), so one wrong
intermediate value (the later steps done right) always makes the final answer wrong. Reward (strict, full format;
lenient rewards get gamed, shared/notes/benchmark_pilot.md): 1 iff the completion is exactly 12 steps with the
prompt's labels, operations and operands, then ``ans:d`` with the right d, then eos; else 0.

The warm start's traces are imperfect in two ways: every step is a random wrong digit with probability
``noise``, and three (operation, operand) pairs carry a systematic misconception with probability ``bug_rate`` > 1/2
(``*7`` done as ``*3``, ``-8`` as ``+8``, ``+9`` as ``-9``); later steps are consistent with the written value. A
model fitted to these traces is right at most steps but, greedily, mostly wrong at the buggy pairs (about 1 step in 7):
RL has to find the few steps that break the chain and fix them from one sparse reward per answer. Measured (3 seeds,
3000 supervised steps, 500 held-out prompts): greedy accuracy 28.0-28.4 %, greedy exact chains 18.4-18.8 %, T=1
accuracy 16.1-17.7 %; chance (a wrong chain ending on the right digit) is about 10 %.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from datasets import Dataset

from synapo_ext.testing import DELIMITER, char_tokenizer, tiny_qwen2

LABELS = "abcdefghijklmnopqrstuvwxyz"
OPS = [("+", k) for k in range(1, 10)] + [("-", k) for k in range(1, 10)] + [("*", k) for k in (3, 7, 9)]
# The warm start's misconceptions: "*7" done as "*3", "-8" as "+8", "+9" as "-9"
BUGS = {("*", 7): lambda v: (v * 3) % 10, ("-", 8): lambda v: (v + 8) % 10, ("+", 9): lambda v: (v - 9) % 10}


@dataclass(frozen=True)
class TaskConfig:
    """The task and its warm start (every field enters the cache key)."""

    num_steps: int = 12  # operations per chain (answer steps)
    noise: float = 0.08  # warm-start traces: probability that a step is a random wrong digit
    bug_rate: float = 0.75  # warm-start traces: probability that a buggy pair is computed the buggy way
    num_eval: int = 500  # held-out prompts (never trained on)
    data_seed: int = 1234  # seed of the held-out set
    # warm-start model and its supervised training
    hidden_size: int = 64
    num_layers: int = 2
    sft_steps: int = 3000
    sft_batch: int = 64
    sft_lr: float = 1e-3


def apply(op: str, k: int, v: int) -> int:
    return (v + k) % 10 if op == "+" else (v - k) % 10 if op == "-" else (v * k) % 10


def make_prompt(rng: random.Random, num_steps: int) -> tuple[str, int, list[tuple[str, int]]]:
    start = rng.randrange(10)
    ops = [rng.choice(OPS) for _ in range(num_steps)]
    prompt = str(start) + "".join(f"{LABELS[i]}{op}{k}" for i, (op, k) in enumerate(ops)) + "\n"
    return prompt, start, ops


def parse_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    body = prompt.strip()
    return int(body[0]), [(m.group(1), int(m.group(2))) for m in re.finditer(r"[a-z]([+\-*])(\d)", body[1:])]


def write_trace(start: int, ops: list[tuple[str, int]], step: Callable[[str, int, int], int] | None = None) -> str:
    """The answer text for `ops` from `start`: one ``label:value op k=result`` step per operation (blank lines
    between), then ``ans:`` and the last result. `step(op, k, value)` gives each written result (default: `apply`,
    the right one); the next step reads the written result."""
    step = step or apply
    value, steps = start, []
    for i, (op, k) in enumerate(ops):
        result = step(op, k, value)
        steps.append(f"{LABELS[i]}:{value}{op}{k}={result}")
        value = result
    return DELIMITER.join(steps) + f"{DELIMITER}ans:{value}"


def wrong_digit(rng: random.Random, right: int) -> int:
    """A uniformly drawn digit other than `right` (a noisy step's result)."""
    return rng.choice([d for d in range(10) if d != right])


def trace(start: int, ops: list[tuple[str, int]], rng: random.Random | None = None, cfg: TaskConfig | None = None):
    """The answer text; with `rng` and `cfg`, an imperfect warm-start trace (noise and the systematic bugs)."""
    if rng is None:
        return write_trace(start, ops)

    def step(op: str, k: int, value: int) -> int:
        if (op, k) in BUGS and rng.random() < cfg.bug_rate:
            return BUGS[(op, k)](value)
        result = apply(op, k, value)
        return wrong_digit(rng, result) if rng.random() < cfg.noise else result  # a bug pair done right: noise too

    return write_trace(start, ops, step)


def answer(start: int, ops: list[tuple[str, int]]) -> int:
    value = start
    for op, k in ops:
        value = apply(op, k, value)
    return value


def answer_regex(prompt: str) -> re.Pattern:
    """Strict format for `prompt`: its labels, operations and operands in order, any digits, then `ans:d`."""
    _, ops = parse_prompt(prompt)
    steps = [rf"{LABELS[i]}:(\d){re.escape(op)}{k}=(\d)" for i, (op, k) in enumerate(ops)]
    return re.compile("\n\n".join(steps) + r"\n\nans:(\d)")


def score(prompt: str, completion: str, ended: bool = True) -> float:
    """1.0 iff `completion` is the strict format for `prompt`, ended with eos, with the right final answer."""
    if not ended:
        return 0.0
    match = answer_regex(prompt).fullmatch(completion)
    if match is None:
        return 0.0
    start, ops = parse_prompt(prompt)
    return float(int(match.group(match.lastindex)) == answer(start, ops))


def first_wrong_step(prompt: str, completion: str) -> int | None:
    """Index of the first step whose result is wrong given its written input (None: all right or unparsable)."""
    for i, m in enumerate(re.finditer(r"[a-z]:(\d)([+\-*])(\d)=(\d)", completion)):
        if apply(m.group(2), int(m.group(3)), int(m.group(1))) != int(m.group(4)):
            return i
    return None


# --- data -------------------------------------------------------------------------------------------------------


def held_out_prompts(cfg: TaskConfig) -> list[str]:
    rng = random.Random(f"eval-{cfg.data_seed}")
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < cfg.num_eval:
        prompt = make_prompt(rng, cfg.num_steps)[0]
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def train_prompts(cfg: TaskConfig, n: int, seed: int, exclude: set[str]) -> list[tuple[str, int, list]]:
    """`n` prompts (with start and ops) from the stream `seed`, none of them in `exclude` (the held-out set)."""
    rng = random.Random(f"train-{seed}")
    out = []
    while len(out) < n:
        item = make_prompt(rng, cfg.num_steps)
        if item[0] not in exclude:
            out.append(item)
    return out


def rl_dataset(cfg: TaskConfig, n: int, seed: int) -> Dataset:
    """RL prompts (disjoint from the held-out set); `answer` reaches the reward function as a keyword."""
    rows = train_prompts(cfg, n, seed + 10_000, set(held_out_prompts(cfg)))
    return Dataset.from_list([{"prompt": p, "answer": answer(s, o)} for p, s, o in rows])


# --- tokenizer and model ------------------------------------------------------------------------------------------


def make_tokenizer():
    """Characters plus one "\\n\\n" token (as real BPE vocabularies have), left padding for generation."""
    return char_tokenizer(list("0123456789") + list(LABELS) + list("+-*=:\n "), delimiter=DELIMITER)


def make_model(tokenizer, cfg: TaskConfig, seed: int):
    """The warm start's initial policy: a Qwen2 of width `cfg.hidden_size` (MLP 4x, 4 heads, no grouped KV)."""
    return tiny_qwen2(
        tokenizer,
        seed=seed,
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_key_value_heads=4,
    )


def completion_length(cfg: TaskConfig) -> int:
    """Tokens of a well-formed answer, eos included."""
    return 8 * cfg.num_steps + 5 + 1


# --- evaluation ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature=0.0, batch=250, seed=0):
    """Completions (text, ended-with-eos) for `prompts`; greedy when temperature is 0."""
    model.eval()
    out = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}  # TRL's defaults
        kwargs = {"do_sample": False} if temperature == 0 else sampling
        if temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, **kwargs)
        for row in ids[:, enc["input_ids"].size(1) :].tolist():
            ended = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if ended else row
            out.append((tokenizer.decode(row, skip_special_tokens=True), ended))
    return out


def accuracy(model, tokenizer, prompts, cfg: TaskConfig, temperature: float = 0.0, seed: int = 0) -> float:
    outs = generate(
        model, tokenizer, prompts, max_new_tokens=completion_length(cfg) + 4, temperature=temperature, seed=seed
    )
    return sum(score(p, c, e) for p, (c, e) in zip(prompts, outs, strict=True)) / len(prompts)


# --- warm start -----------------------------------------------------------------------------------------------------


def cache_key(cfg: TaskConfig, seed: int) -> str:
    blob = json.dumps({"task": asdict(cfg), "seed": seed, "bugs": sorted(map(str, BUGS)), "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def warm_start(cfg: TaskConfig, seed: int, cache_dir: str, log=print) -> str:
    """Path of the warm-start policy (supervised on imperfect traces), trained once per (config, seed) and cached."""
    path = os.path.join(cache_dir, f"warm_start_{cache_key(cfg, seed)}_s{seed}")
    return fit_warm_start(
        path, cfg, seed, draw=lambda rng: make_prompt(rng, cfg.num_steps), trace=trace, held_out=held_out_prompts,
        rng_name=f"sft-{seed}", log_name=f"s{seed}", log=log,
    )  # fmt: skip


def _sft_batch(tokenizer, rng: random.Random, cfg, exclude: set[str], draw, trace):
    """`cfg.sft_batch` prompts from `draw(rng)` (none in `exclude`), each with its `trace(start, ops, rng, cfg)`;
    returns (ids, labels) (B, T), the labels -100 on the prompt (the loss is on the answer only)."""
    texts, prompt_len = [], None
    for _ in range(cfg.sft_batch):
        prompt, start, ops = draw(rng)
        while prompt in exclude:
            prompt, start, ops = draw(rng)
        texts.append(prompt + trace(start, ops, rng, cfg))
        prompt_len = len(prompt)  # all prompts have the same number of tokens (one per character)
    ids = torch.tensor([tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts])
    labels = ids.clone()
    labels[:, :prompt_len] = -100  # loss on the answer only
    return ids, labels


def fit_warm_start(
    path: str, cfg, seed: int, *, draw: Callable, trace: Callable, held_out: Callable, rng_name: str, log_name: str,
    log=print,
) -> str:  # fmt: skip
    """Train a task's warm start (supervised on its imperfect traces) into `path`, unless it is there already.

    Both tasks share this loop: `draw(rng)` gives (prompt, start, ops), `trace(start, ops, rng, cfg)` the warm-start
    answer, `held_out(cfg)` the prompts never trained on; `rng_name` seeds the data stream, `log_name` names the
    run in the progress lines. The model is `make_model(make_tokenizer(), cfg, seed)`; saved atomically.
    """
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, cfg, seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    rng = random.Random(rng_name)
    exclude = set(held_out(cfg))
    start = time.perf_counter()
    for step in range(cfg.sft_steps):
        ids, labels = _sft_batch(tokenizer, rng, cfg, exclude, draw, trace)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            log(
                f"  warm start {log_name}: step {step + 1}/{cfg.sft_steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - start:.0f}s)"
            )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)  # atomic: a half-written warm start is never picked up
    return path
