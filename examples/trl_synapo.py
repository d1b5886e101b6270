"""Train a tiny Qwen2 with SynAPO on TRL 1.16 on CPU, from scratch, in a couple of minutes.

The task: "a+b=" -> the sum (a, b in 0..4); the reward is 1 when the completion starts with it. The model and a
character tokenizer (with a "\\n\\n" token, so HVM finds segment boundaries) are built locally: no download.

    python examples/trl_synapo.py --help                       # every GRPOConfig and SynAPO option
    python examples/trl_synapo.py --preset synapo --max_steps 60
    python examples/trl_synapo.py --preset vapo --ea_gae_beta -0.05 --output_dir out/vapo

The same script trains a real model: replace `tiny_policy()` by `AutoModelForCausalLM.from_pretrained(...)`.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback
from trl import TrlParser

from synapo_ext.trl import SynAPOConfig, SynAPOTrainer


@dataclass
class Args:
    """Options of this script (the trainer's come from SynAPOConfig)."""

    num_prompts: int = field(default=256, metadata={"help": "Size of the synthetic training set."})
    hidden_size: int = field(default=64, metadata={"help": "Hidden size of the tiny Qwen2 policy."})
    num_layers: int = field(default=2, metadata={"help": "Layers of the tiny Qwen2 policy."})


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *"0123456789+=. \n", "\n\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex("\n\n|[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def tiny_policy(tokenizer, hidden_size: int, num_layers: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def sum_dataset(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = [(rng.randrange(5), rng.randrange(5)) for _ in range(n)]
    return Dataset.from_list([{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in rows])


def correct(completions, answer, **kwargs):
    """1.0 when the completion starts with the right sum."""
    return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer, strict=True)]


class PrintProgress(TrainerCallback):
    """One line per log: step, reward and the critic's health."""

    def __init__(self):
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "reward" not in logs:
            return
        keys = ("reward", "critic/vf_loss", "critic/explained_variance", "critic/scvl_pairs", "ea_gae/lambda_mean")
        shown = "  ".join(f"{k}={logs[k]:.3f}" for k in keys if k in logs)
        print(f"step {state.global_step:4d}  {time.perf_counter() - self.start:6.1f}s  {shown}", flush=True)


def main() -> None:
    defaults = [
        "--output_dir", "out/trl_synapo", "--use_cpu", "true", "--report_to", "none", "--max_steps", "60",
        "--num_generations", "8", "--per_device_train_batch_size", "16", "--max_completion_length", "8",
        "--learning_rate", "3e-3", "--critic_learning_rate", "3e-3", "--value_warmup_steps", "5",
        "--logging_steps", "5", "--save_strategy", "no", "--disable_tqdm", "true", "--temperature", "1.0",
    ]  # fmt: skip
    parser = TrlParser((Args, SynAPOConfig))
    script_args, args = parser.parse_args_and_config(defaults + sys.argv[1:])
    print("command:", " ".join(sys.argv))
    import transformers
    import trl

    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"preset {args.preset}: {args.synapo_params()}")
    tokenizer = tiny_tokenizer()
    trainer = SynAPOTrainer(
        model=tiny_policy(tokenizer, script_args.hidden_size, script_args.num_layers, args.seed),
        reward_funcs=[correct],
        args=args,
        train_dataset=sum_dataset(script_args.num_prompts, args.seed),
        processing_class=tokenizer,
        callbacks=[PrintProgress()],
    )
    trainer.train()
    trainer.save_model()
    print(f"saved the policy and its critic (critic/) to {args.output_dir}")


if __name__ == "__main__":
    main()
