"""A tiny Qwen2 policy and a local character tokenizer with a "\\n\\n" token (no hub; notes/tiny_models.md)."""

from __future__ import annotations

import random

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<pad>", "<eos>", "<unk>"]
CHARS = list("0123456789+=. abcdef\n")


def make_tokenizer(with_delimiter: bool = True) -> PreTrainedTokenizerFast:
    """Characters, plus "\\n\\n" as one token when `with_delimiter` (like real BPE vocabularies)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS + (["\n\n"] if with_delimiter else []))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "\n\n|[\\s\\S]" if with_delimiter else "[\\s\\S]"
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def make_policy(tokenizer, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


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
