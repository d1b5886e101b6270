"""What a real verl run needs on disk, built locally (no hub): a tiny Qwen2 policy and a byte-level BPE tokenizer
(`synapo_ext.testing`: as real Qwen tokenizers, every byte is a symbol, "\\n\\n" is one merged token for HVM's
segments, a chat template), a small parquet dataset, and the reward function (`compute_score`).
"""

from __future__ import annotations

import os

from synapo_ext.testing import byte_bpe_tokenizer, tiny_qwen2


def build_model(path: str) -> None:
    """The byte-level BPE tokenizer (saved and reloaded as verl loads it) and a tiny Qwen2 causal LM (about 40k
    parameters, no bos token) next to it, in `path`."""
    tiny_qwen2(byte_bpe_tokenizer(path), seed=0, bos_is_eos=False).save_pretrained(path)


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
    build_model(model_dir)
    return {
        "model": model_dir,
        "train": build_data(os.path.join(root, "train.parquet")),
        "val": build_data(os.path.join(root, "val.parquet"), n=8),
    }


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """The run's reward: 1 if the response has an even number of characters (about half the samples of a random
    tiny policy, so every group of `rollout.n` is likely mixed, as SCVL needs)."""
    return float(len(solution_str) % 2 == 0)
