"""What a real verl run needs on disk, built locally (no hub): a tiny Qwen2 policy, a byte-level BPE tokenizer
(as real Qwen tokenizers: every byte is a symbol, "\\n\\n" is one merged token for HVM's segments, a chat template),
a small parquet dataset, and the reward function (`compute_score`).

transformers 5 reloads a qwen2 tokenizer from disk as `Qwen2Tokenizer` (byte-level BPE rebuilt from vocab + merges),
so the tokenizer must survive that round trip: `build_assets` saves it, reloads it and checks that "\\n" and
"\\n\\n" each encode to one token.
"""

from __future__ import annotations

import os

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable-unicode table, in byte order (what byte-level BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def build_tokenizer(path: str):
    """Byte-level BPE tokenizer with "\\n\\n" as one token, saved to `path` and reloaded as transformers does."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = _byte_symbols()
    newline = symbols[ord("\n")]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab[newline * 2] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(newline, newline)]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", additional_special_tokens=SPECIAL[1:]
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    reloaded = transformers.AutoTokenizer.from_pretrained(path)
    for text in ("\n", "\n\n"):
        ids = reloaded.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer reloaded from {path} encodes {text!r} as {ids}, not one token")
    return reloaded


def build_model(path: str, tokenizer) -> None:
    """A tiny Qwen2 causal LM (about 40k parameters) saved to `path` next to its tokenizer."""
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)


def build_data(path: str, n: int = 64) -> str:
    """`n` prompts in verl's RL dataset layout (chat `prompt`, `reward_model.ground_truth`), as parquet."""
    import pandas as pd

    rows = [
        {
            "data_source": "synapo_cpu",
            "prompt": [{"role": "user", "content": f"{i} + {i % 7} ="}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(i + i % 7)},
            "extra_info": {"index": i},
        }
        for i in range(n)
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def build_assets(root: str) -> dict[str, str]:
    """Model + tokenizer dir and train/val parquet files under `root`; returns their paths."""
    model_dir = os.path.join(root, "model")
    os.makedirs(model_dir, exist_ok=True)
    build_model(model_dir, build_tokenizer(model_dir))
    return {
        "model": model_dir,
        "train": build_data(os.path.join(root, "train.parquet")),
        "val": build_data(os.path.join(root, "val.parquet"), n=8),
    }


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """The run's reward: 1 if the response has an even number of characters (about half the samples of a random
    tiny policy, so every group of `rollout.n` is likely mixed, as SCVL needs)."""
    return float(len(solution_str) % 2 == 0)
