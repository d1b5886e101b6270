"""The critic: a token-classification model (1 head, or 2 with HVM: local, global), built, evaluated and saved.

V(s_t) for completion token t is the critic's output at the token before it (position P + t - 1 of the
prompt + completion sequence), verl's `values` layout.
"""

from __future__ import annotations

import copy
import json
import logging
import os

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForTokenClassification, PreTrainedModel

__all__ = ["build_critic", "critic_values", "load_critic_state", "save_critic_state"]

logger = logging.getLogger(__name__)

CRITIC_DIR = "critic"
OPTIMIZER_FILE = "critic_optimizer.pt"
SCHEDULER_FILE = "critic_scheduler.pt"
STATE_FILE = "critic_trainer_state.json"


def _num_labels(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "num_labels", None)


def _vocab_size(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def build_critic(critic_model: str | PreTrainedModel | None, policy: PreTrainedModel, *, num_heads: int, **kwargs):
    """The critic for `policy`: loaded from a path, taken as given, or initialised from the policy's weights.

    Args:
        critic_model: a path / hub id of a token-classification model, a model, or None (copy the policy's
            backbone; the value head is zero, so every value starts at 0).
        policy: the policy model (its config and weights seed a `None` critic; its vocabulary is the reference).
        num_heads: 2 with HVM (head 0 local, head 1 global), else 1.
        **kwargs: passed to `from_pretrained` for a path.

    Raises:
        ValueError: the critic's vocabulary or number of outputs does not match (naming `critic_model`).
    """
    if critic_model is None:
        config = copy.deepcopy(policy.config)
        config.num_labels = num_heads  # from_config(num_labels=...) is refused by transformers 5 (notes/trl.md)
        config.problem_type = "regression"
        critic = AutoModelForTokenClassification.from_config(config)
        missing, _ = critic.load_state_dict(policy.state_dict(), strict=False)
        head = critic.get_output_embeddings() or getattr(critic, "score", None)
        if isinstance(head, nn.Linear):
            nn.init.zeros_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        logger.info("critic initialised from the policy; fresh parameters: %s", missing)
        critic.to(dtype=next(policy.parameters()).dtype)
    elif isinstance(critic_model, str):
        critic = AutoModelForTokenClassification.from_pretrained(critic_model, num_labels=num_heads, **kwargs)
    elif isinstance(critic_model, nn.Module):
        critic = critic_model
    else:
        raise TypeError(f"`critic_model` must be a path, a model or None, got {type(critic_model).__name__}")
    if _num_labels(critic) != num_heads:
        raise ValueError(
            f"`critic_model` has {_num_labels(critic)} outputs per token, expected {num_heads} "
            f"({'local, global with HVM on' if num_heads == 2 else 'one value with HVM off'})"
        )
    if _vocab_size(critic) != _vocab_size(policy):
        raise ValueError(
            f"`critic_model` has a vocabulary of {_vocab_size(critic)} tokens but the policy has "
            f"{_vocab_size(policy)}: the critic must read the policy's token ids"
        )
    return critic


def critic_values(
    critic: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
) -> torch.Tensor:
    """float32 (B, T, H): V(s_t) for the last `logits_to_keep` tokens of `input_ids` (the completion)."""
    logits = critic(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, P + T, H)
    return logits[:, -logits_to_keep - 1 : -1].float()


def _unwrapped(critic: nn.Module) -> nn.Module:
    return getattr(critic, "module", critic)


def save_critic_state(
    output_dir: str, critic: nn.Module, optimizer=None, scheduler=None, state=None, *, weights: bool = True
) -> None:
    """Write `output_dir/critic/`: the weights (safetensors + config) and, if given, optimizer, scheduler, counters."""
    critic_dir = os.path.join(output_dir, CRITIC_DIR)
    os.makedirs(critic_dir, exist_ok=True)
    if weights:
        _unwrapped(critic).save_pretrained(critic_dir)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(critic_dir, OPTIMIZER_FILE))
    if scheduler is not None:
        torch.save(scheduler.state_dict(), os.path.join(critic_dir, SCHEDULER_FILE))
    if state is not None:
        with open(os.path.join(critic_dir, STATE_FILE), "w") as f:
            json.dump(state, f)


def load_critic_state(checkpoint: str, critic: nn.Module, optimizer=None, scheduler=None) -> dict | None:
    """Restore what `save_critic_state` wrote (weights_only loads); returns the counters, or None if absent."""
    critic_dir = os.path.join(checkpoint, CRITIC_DIR)
    weights = os.path.join(critic_dir, "model.safetensors")
    if not os.path.exists(weights):
        logger.warning("no critic in checkpoint %s: the critic starts from its current weights", checkpoint)
        return None
    model = _unwrapped(critic)
    state_dict = load_file(weights, device=str(next(model.parameters()).device))
    model.load_state_dict(state_dict, strict=False)  # tied / non-persistent entries may be absent
    for obj, name in ((optimizer, OPTIMIZER_FILE), (scheduler, SCHEDULER_FILE)):
        path = os.path.join(critic_dir, name)
        if obj is not None and os.path.exists(path):
            obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    path = os.path.join(critic_dir, STATE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None
