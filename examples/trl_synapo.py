"""SynAPO on TRL 1.16, shaped like TRL's own scripts (`trl/scripts/grpo.py`): `ScriptArguments`, `SynAPOConfig` and
`ModelConfig` through `TrlParser` (flags or `--config file.yaml`), a model and a dataset by name or local path, reward
functions chosen by flag, the model saved (policy, critic in `critic/`) and pushed to the Hub at the end.

Without `--model_name_or_path` it runs the offline demo: a tiny Qwen2 and a character tokenizer built on the spot
learn "a+b=" -> the sum (a, b in 0..4) on CPU, from scratch, in a couple of minutes; the reward is 1 when the
completion starts with the right sum. A randomly initialised policy gets it right about 6 % of the time, so about
4 groups of 8 in 10 hold a success to learn from. The demo prints the mean reward every `--print_every` steps and
the greedy accuracy on the 25 prompts before and after training. It is an example, not a benchmark.

    python examples/trl_synapo.py --help          # every option; the defaults shown are the demo's
    python examples/trl_synapo.py                 # the demo: preset synapo, 800 steps
    python examples/trl_synapo.py --preset vapo --ea_gae_beta -0.05 --output_dir out/vapo
    # a real model, a dataset with a `prompt` column and a reward function by name (or a dotted import path):
    accelerate launch --config_file examples/accelerate/fsdp2_8gpu.yaml examples/trl_synapo.py \
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct --dtype bfloat16 \
        --dataset_name trl-lib/DeepMath-103K --reward_funcs accuracy_reward \
        --use_peft --lora_r 16 --output_dir out/qwen-synapo --push_to_hub

With `--model_name_or_path` the library's defaults apply (the demo's `DEFAULTS` are for a 100k-parameter model on
CPU): TRL's learning rate, bf16, the preset's `value_warmup_steps`. `--dataset_name` takes a hub id, a local folder
of data files, or a folder written by `Dataset.save_to_disk`. `--reward_funcs` takes the names in `REWARDS` or
`module.function` (the script's folder and the working directory are on the import path).

`explained_variance` is the critic's held-out explained variance, 1 - Var(return - value) / Var(return), on each
fresh batch before the critic trains on it. It can be far below 0 (e.g. -177) when the returns are nearly constant
(almost every reward 0 early on, or 1 late): their variance is then tiny and any error of the critic dwarfs it. Read
`vf_loss` then; the number says the batch has little to explain, not that the critic is broken.
"""

from __future__ import annotations

import importlib
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from synapo_ext.core import METRICS
from synapo_ext.trl import SynAPOConfig, SynAPOTrainer

# This script's defaults for the trainer: `--help` shows them, and any can be overridden on the command line. Tuned
# for a tiny model trained from scratch on a toy task on CPU, not for a real one:
# - use_cpu, bf16 off, activation checkpointing off: CPU settings (on a GPU: --use_cpu false --bf16 true);
# - learning rates of 1e-3 (policy and critic): a 100k-parameter model from scratch, not a pretrained LLM (1e-6..1e-5);
# - ea_gae_alpha 0.5: completions here are ~8 tokens, and lambda = 1 - 1 / (alpha * length) is clipped to 0 for
#   alpha * length <= 1: with the library's 0.05 (made for thousands of tokens) lambda would be 0 and the first token
#   (the answer) would get only the critic's one-step difference V(s1) - V(s0). With 0.5 it is about 0.75;
# - value_warmup_steps 5 (the preset's 50 is for a pretrained model's long responses).
DEFAULTS = {
    "output_dir": "out/trl_synapo", "use_cpu": True, "bf16": False, "activation_checkpointing": False,
    "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "logging_steps": 1,
    "max_steps": 800, "num_generations": 8, "per_device_train_batch_size": 32,
    "max_completion_length": 8, "temperature": 1.0,
    "learning_rate": 1e-3, "lr_scheduler_type": "constant", "critic_learning_rate": 1e-3,
    "ea_gae_alpha": 0.5, "value_warmup_steps": 5, "log_level": "info",
}  # fmt: skip


@dataclass
class Args(ScriptArguments):
    """Options of this script: TRL's `ScriptArguments` (`--dataset_name`, ...) and the demo's (the trainer's come from
    SynAPOConfig, the model's from ModelConfig)."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["correct"],
        metadata={"help": "Reward functions: names in REWARDS (correct, accuracy_reward, think_format_reward, "
                  "reasoning_accuracy_reward) or a dotted import path `module.function`."},
    )  # fmt: skip
    num_prompts: int = field(
        default=256, metadata={"help": "Size of the synthetic training set (25 distinct prompts)."}
    )
    hidden_size: int = field(default=64, metadata={"help": "Hidden size of the tiny Qwen2 policy."})
    num_layers: int = field(default=2, metadata={"help": "Layers of the tiny Qwen2 policy."})
    num_threads: int = field(default=0, metadata={"help": "torch.set_num_threads (0: torch's default)."})
    print_every: int = field(default=10, metadata={"help": "Print the mean reward every this many steps."})


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
    """1.0 when the completion starts with the row's `answer` (the demo's reward; any dataset with an `answer`)."""
    return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer, strict=True)]


def reward_functions(names: list[str]) -> list:
    """`--reward_funcs`: names in REWARDS, or `module.function` (from the working directory or this folder)."""
    from trl.rewards import accuracy_reward, reasoning_accuracy_reward, think_format_reward

    registry = {"correct": correct, "accuracy_reward": accuracy_reward, "think_format_reward": think_format_reward,
                "reasoning_accuracy_reward": reasoning_accuracy_reward}  # fmt: skip
    funcs = []
    for name in names:
        if name in registry:
            funcs.append(registry[name])
        elif "." in name:
            module, attr = name.rsplit(".", 1)
            sys.path[:0] = [os.getcwd(), os.path.dirname(os.path.abspath(__file__))]
            funcs.append(getattr(importlib.import_module(module), attr))
        else:
            raise SystemExit(f"--reward_funcs: unknown {name!r}; use one of {sorted(registry)} or module.function")
    return funcs


def load_train_dataset(args: Args):
    """`--dataset_name`: a folder written by `Dataset.save_to_disk`, or anything `datasets.load_dataset` takes (a hub
    id, a local folder of data files), then `--dataset_train_split`."""
    from datasets import load_dataset, load_from_disk

    name = args.dataset_name
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        data = load_from_disk(name)
    elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        data = load_from_disk(name)
    else:
        data = load_dataset(name, name=args.dataset_config)
    return data[args.dataset_train_split] if hasattr(data, "keys") else data


@torch.no_grad()
def greedy_accuracy(model, tokenizer) -> float:
    """Share of the 25 prompts "a+b=" whose greedy completion starts with the sum."""
    pairs = [(a, b) for a in range(5) for b in range(5)]
    batch = tokenizer([f"{a}+{b}=" for a, b in pairs], return_tensors="pt", padding=True).to(model.device)
    was_training = model.training
    model.eval()
    out = model.generate(**batch, do_sample=False, max_new_tokens=2)
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(correct(texts, [str(a + b) for a, b in pairs])) / len(pairs)


class PrintProgress(TrainerCallback):
    """Every `every` steps: the mean reward of those steps and the critic's health; keeps every step's reward."""

    KEYS = (METRICS.vf_loss, METRICS.explained_variance, METRICS.lambda_mean, METRICS.segments_mean, "entropy")

    def __init__(self, every: int):
        self.every, self.rewards, self.pending, self.explained = max(every, 1), [], [], False
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "reward" not in logs:
            return
        self.rewards.append(logs["reward"])
        self.pending.append(logs["reward"])
        if len(self.pending) >= self.every or state.global_step >= state.max_steps:
            shown = "  ".join(f"{k.split('/')[-1]}={logs[k]:.3f}" for k in self.KEYS if k in logs)
            mean = sum(self.pending) / len(self.pending)
            elapsed = time.perf_counter() - self.start
            print(f"step {state.global_step:4d}  {elapsed:6.1f}s  reward={mean:.3f}  {shown}", flush=True)
            self.pending = []
            if logs.get(METRICS.explained_variance, 0.0) < -1 and not self.explained:
                self.explained = True
                print(
                    "      vf_explained_var < -1: the returns of this batch are nearly constant (almost all rewards "
                    "equal), so their variance is tiny and any critic error dwarfs it; read vf_loss instead"
                )


def parse() -> tuple[Args, SynAPOConfig, ModelConfig]:
    """TRL's parser over (script, trainer, model) arguments. The demo's DEFAULTS apply when no model is named (on the
    command line or in `--config`), so `--model_name_or_path` gets the library's defaults."""
    types = (Args, SynAPOConfig, ModelConfig)
    description = ("SynAPO on TRL. Without --model_name_or_path: the offline demo (a tiny Qwen2 on CPU); the "
                   "defaults shown are the demo's, a named model gets the library's. On a GPU pass --use_cpu false "
                   "--bf16 true (the demo defaults to the CPU).")  # fmt: skip
    parser = TrlParser(types, description=description)
    if not _names_a_model(sys.argv[1:]):
        parser.set_defaults(**DEFAULTS)
    return parser.parse_args_and_config()


def _names_a_model(argv: list[str]) -> bool:
    """Whether `--model_name_or_path` is given on the command line or in the `--config` YAML file."""
    import yaml

    flags = ("--model_name_or_path", "--model-name-or-path")
    if any(arg in flags or arg.split("=", 1)[0] in flags for arg in argv):
        return True
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.partition("=")[2]
        if (arg == "--config" or arg.startswith("--config=")) and path:
            with open(path) as f:
                return bool((yaml.safe_load(f) or {}).get("model_name_or_path"))
    return False


def main() -> None:
    script_args, args, model_args = parse()
    if script_args.num_threads > 0:
        torch.set_num_threads(script_args.num_threads)
    import transformers
    import trl

    demo = model_args.model_name_or_path is None
    print("command:", " ".join(sys.argv))
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"preset {args.preset}: {args.synapo_params()}")
    print(f"lr {args.learning_rate}, critic lr {args.critic_learning_rate}, {args.max_steps} steps of "
          f"{args.per_device_train_batch_size} completions ({args.num_generations} per prompt)")  # fmt: skip
    if args.use_cpu and torch.cuda.is_available():
        print("note: training on the CPU (this script's default); pass --use_cpu false to use the GPU")
    if args.logging_steps != 1:
        print("note: --logging_steps is not 1, so each printed reward averages logged steps only")
    if demo:
        tokenizer = tiny_tokenizer()
        model = tiny_policy(tokenizer, script_args.hidden_size, script_args.num_layers, args.seed)
    else:  # as TRL's grpo script: the trainer loads the model by name with these keyword arguments
        tokenizer, model = None, model_args.model_name_or_path
        init = {"revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation,
                "dtype": model_args.dtype, "trust_remote_code": args.trust_remote_code}  # fmt: skip
        args.model_init_kwargs = {**init, **(args.model_init_kwargs or {})}
    if script_args.dataset_name:
        train_dataset = load_train_dataset(script_args)
    else:
        train_dataset = sum_dataset(script_args.num_prompts, args.seed)
    progress = PrintProgress(script_args.print_every)
    trainer = SynAPOTrainer(
        model=model,
        reward_funcs=reward_functions(script_args.reward_funcs),
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)  # TRL's full log dict per step: PrintProgress prints a summary instead
    before = greedy_accuracy(trainer.model, tokenizer) if demo else None
    if demo:
        print(f"greedy accuracy before training: {before:.2f}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    minutes = (time.perf_counter() - start) / 60
    r = progress.rewards
    k = min(10, len(r))
    if k:
        first, last = sum(r[:k]) / k, sum(r[-k:]) / k
        span = f"({len(r)} steps, {minutes:.1f} min)"
        print(f"mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} {span}")
    if demo:
        print(
            f"greedy accuracy: {before:.2f} before -> {greedy_accuracy(trainer.model, tokenizer):.2f} after training"
        )
    trainer.save_model()
    print(f"saved the policy and its critic (critic/) to {args.output_dir}")
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        print(f"pushed to the Hub: https://huggingface.co/{trainer.hub_model_id}")


if __name__ == "__main__":
    main()
