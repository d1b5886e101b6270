"""The TRL tests' tiny task: a character tokenizer and a tiny Qwen2 policy (built by `synapo_ext.testing`), prompts
and rewards (no hub)."""

from __future__ import annotations

import random

from datasets import Dataset

from synapo_ext.testing import DELIMITER, char_tokenizer, tiny_qwen2

CHARS = "0123456789+=. abcdef\n"


def make_tokenizer(with_delimiter: bool = True):
    """Characters, plus "\\n\\n" as one token when `with_delimiter` (like real BPE vocabularies); left padding."""
    return char_tokenizer(CHARS, delimiter=DELIMITER if with_delimiter else None)


def make_policy(tokenizer, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    """A tiny Qwen2 policy for `tokenizer` (synapo_ext.testing.tiny_qwen2)."""
    return tiny_qwen2(tokenizer, seed=seed, hidden_size=hidden_size, num_layers=layers)


def make_dataset(n: int = 32, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(5), rng.randrange(5)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return Dataset.from_list(rows)


def first_char_reward(completions, **kwargs):
    """1.0 when the completion starts with a digit: about half of a random policy's samples (mixed groups)."""
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def correct_reward(completions, answer, **kwargs):
    """1.0 when the completion starts with the right sum."""
    return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer, strict=True)]
