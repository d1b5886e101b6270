"""The research write-up's spelling of the TRL usage, and what to write instead of keywords neither TRL nor SynAPO
knows (legacy TRL `PPOConfig` / `PPOTrainer` <= 0.11 names, near-misses).

Accepted as aliases: `SynAPOTrainer(config=..., tokenizer=...)` (TRL's `args`, `processing_class`) and
`SynAPOConfig(ppo_epochs=...)` (TRL's `num_iterations`). Anything else unknown is a `TypeError` built here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["RENAMED_CONFIG_KEYWORDS", "RENAMED_TRAINER_KEYWORDS", "one_of", "unknown_keyword_message"]

# Keywords of the research write-up, legacy TRL (`PPOConfig` <= 0.11) or near-misses, and what to write instead.
RENAMED_CONFIG_KEYWORDS = {
    "batch_size": "per_device_train_batch_size (rows per device per step) or generation_batch_size",
    "mini_batch_size": "per_device_train_batch_size (policy) and critic_mini_batch_size (critic)",
    "num_mini_batches": "steps_per_generation",
    "num_ppo_epochs": "ppo_epochs (= TRL's num_iterations)",
    "vf_coef": "critic_learning_rate (the critic has its own optimizer: no shared loss coefficient)",
    "cliprange": "epsilon (and epsilon_high for clip-higher)",
    "kl_coef": "beta (TRL's KL coefficient)",
    "init_kl_coef": "beta (TRL's KL coefficient)",
    "lam": "gae_lambda (the actor's fixed lambda) or critic_lambda (the critic's targets)",
    "response_length": "max_completion_length",
    "total_episodes": "max_steps",
    "whiten_rewards": "whiten_advantages",
    "hvm_weight": "hvm_global_weight",
    "value_model": "critic_model_name_or_path (or SynAPOTrainer(critic_model=...))",
    "critic_model": "critic_model_name_or_path (or SynAPOTrainer(critic_model=...))",
    "value_model_path": "critic_model_name_or_path",
    "model_name": "SynAPOTrainer(model=...): the model is the trainer's argument",
    "model_name_or_path": "SynAPOTrainer(model=...): the model is the trainer's argument",
    "sft_model_path": "SynAPOTrainer(model=...): the model is the trainer's argument",
    "reward_model_path": "SynAPOTrainer(reward_funcs=...): rewards are the trainer's argument",
    "tokenizer": "SynAPOTrainer(tokenizer=...) or processing_class=...: the tokenizer is the trainer's argument",
}

# Keywords of the research write-up, legacy TRL (`PPOTrainer` <= 0.11) or near-misses, and what to write instead.
RENAMED_TRAINER_KEYWORDS = {
    "ref_model": "nothing: TRL keeps its own reference model (set `beta` > 0 in SynAPOConfig for a KL penalty)",
    "reward_model": "reward_funcs=[reward_model] (a model, a hub id or a function)",
    "value_model": "critic_model=...",
    "data_collator": "nothing: GRPO batches the dataset's `prompt` column itself",
    "optimizer": "optimizers=(optimizer, lr_scheduler)",
}


def one_of(name: str, value, alias: str, alias_value):
    """`value`, or the write-up's `alias` for it; both given (and different) is a `TypeError`."""
    if alias_value is None:
        return value
    if value is not None and value is not alias_value:
        raise TypeError(f"pass either `{name}` or `{alias}` (the write-up's name for it), not both")
    return alias_value


def unknown_keyword_message(
    owner: str, name: str, known: Iterable[str], renamed: dict[str, str], elsewhere: dict[str, str] | None = None
) -> str:
    """Why `owner` refuses the keyword `name`, and what to write instead.

    Args:
        owner: "SynAPOConfig" or "SynAPOTrainer".
        known: the keywords `owner` takes (for "did you mean").
        renamed: known other spellings -> what to write instead.
        elsewhere: keywords that belong to the other object -> where they go.
    """
    if name in renamed:
        return f"{owner} has no argument `{name}`: write {renamed[name]} instead"
    if elsewhere and name in elsewhere:
        return f"{owner} has no argument `{name}`: {elsewhere[name]}"
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.75)
    if close:
        hint = f"did you mean {' or '.join(f'`{c}`' for c in close)}?"
    elif owner == "SynAPOConfig":
        hint = "see SynAPOConfig's docstring (`python examples/trl_synapo.py --help` lists every option)"
    else:
        hint = f"its arguments are {sorted(known)}"
    return f"{owner} has no argument `{name}`: {hint}"
