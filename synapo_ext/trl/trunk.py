"""A critic on the policy's own trunk (`critic_trunk="shared"`): value heads on the policy's last hidden states.

The separate critic (`critic_trunk="separate"`, the default) is a second transformer with its own optimizer. The
shared-trunk critic is small heads on the hidden states h[b, t] of the policy's backbone (the input of its LM head):

    V[b, t] = head(h[b, t])                    h: (B, T, D) states before each completion token, the critic's layout
    head    = Linear(D, H)                     (`critic_trunk_head="linear"`; H = 2 with HVM: local, global)
            | Linear(D, H) . GELU . Linear(D, D) (`critic_trunk_head="mlp"`)

It follows the policy by construction (the features are the current policy's) and costs no second model (no critic
weights, gradients or Adam states: docs/trl_at_scale.md, 27.4 vs 14.2 GiB a rank for 7B + 7B under FSDP2).

Where the features come from. A forward hook on the policy's backbone keeps h of the no-grad pass the rollout already
runs on the policy: TRL's old-log-prob pass, or the stage's entropy pass for EA-GAE (`_get_per_token_logps_and_
entropies`, fused LM head: the hook sees the backbone's `last_hidden_state`). When neither runs (VAPO's preset without
an old-log-prob pass) the stage runs one no-grad forward of the backbone alone (no LM head). The rollout-time values,
the advantages and the critic's update all use these features:

- `critic_trunk_grad_scale = 0` (default): the value gradient stops at the trunk. The heads train on the detached
  features with the critic's optimizer and losses (`update.update_critic`: `critic_epochs` passes, mini-batches of
  `critic_mini_batch_size`, value clipping, HVM, SCVL), with no forward at all: the features are kept from the rollout.
- `critic_trunk_grad_scale = c > 0`: the value loss is also computed in TRL's loss pass, on the with-grad hidden
  states of the policy's micro-batch, and added to the policy loss; the trunk receives c times its gradient
  (`scale_grad`: identity forward, gradient times c), the heads the full gradient, and the heads' optimizer steps with
  the policy's (once per optimizer step, after TRL's backward). The stage's separate update then runs only during the
  value warm-up (the policy frozen, no loss pass).

Checkpoints: the heads are `critic/model.safetensors` (safetensors, with a `trunk_critic.json` of their shape), the
optimizer, scheduler and counters as for the separate critic. Refused by name: DeepSpeed and multi-process runs
(untested), a separate critic model or path with `critic_trunk="shared"`, `critic_trunk_grad_scale > 0` without
`critic_trunk="shared"`, a policy without a `base_model` backbone returning `last_hidden_state`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.modeling_outputs import TokenClassifierOutput

from ..core import METRICS
from .distributed import PreparedCritic, average_gradients

__all__ = [
    "CRITIC_TRUNKS",
    "TRUNK_HEADS",
    "SharedTrunkMixin",
    "TrunkCritic",
    "TrunkCriticFields",
    "ValueHeads",
    "scale_grad",
]

CRITIC_TRUNKS = ("separate", "shared")
TRUNK_HEADS = ("linear", "mlp")
TRUNK_CONFIG_FILE = "trunk_critic.json"
ROW_INDEX = "synapo_row_index"  # (B,) key of TRL's batch: each row's index in its rollout batch (grad_scale > 0)


@dataclass
class TrunkCriticFields:
    """`SynAPOConfig`'s fields for the critic's trunk (a base class of it).

    Parameters:
        critic_trunk (`str`, *optional*, defaults to `"separate"`):
            `"separate"`: the critic is its own model (`critic_model`). `"shared"`: value heads on the policy's own
            last hidden states (synapo_ext/trl/trunk.py): no second model.
        critic_trunk_grad_scale (`float`, *optional*, defaults to `0.0`):
            With `critic_trunk="shared"`: 0 stops the value gradient at the trunk (the heads train on detached policy
            features); c > 0 adds the value loss to the policy's loss pass with c times its gradient into the trunk.
        critic_trunk_head (`str`, *optional*, defaults to `"linear"`):
            The heads: `"linear"` (one linear layer per head) or `"mlp"` (Linear(D, D), GELU, Linear(D, heads)).
    """

    critic_trunk: str = field(
        default="separate", metadata={"help": "Critic trunk: 'separate' (its own model) or 'shared' (the policy's)."}
    )
    critic_trunk_grad_scale: float = field(
        default=0.0, metadata={"help": "Shared trunk: scale of the value gradient into the policy (0: stopped)."}
    )
    critic_trunk_head: str = field(
        default="linear", metadata={"help": "Shared trunk: value heads, 'linear' or 'mlp'."}
    )

    def _validate_trunk_fields(self) -> None:
        """The trunk fields, each refused with its name."""
        if self.critic_trunk not in CRITIC_TRUNKS:
            raise ValueError(f"`critic_trunk` must be one of {list(CRITIC_TRUNKS)}, got {self.critic_trunk!r}")
        if self.critic_trunk_head not in TRUNK_HEADS:
            raise ValueError(f"`critic_trunk_head` must be one of {list(TRUNK_HEADS)}, got {self.critic_trunk_head!r}")
        scale = self.critic_trunk_grad_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"`critic_trunk_grad_scale` must be a finite number >= 0, got {scale!r}")
        if self.critic_trunk != "shared" and scale != 0:
            raise ValueError(
                f"`critic_trunk_grad_scale` ({scale}) scales the value gradient into the policy's trunk: it needs "
                "critic_trunk='shared'"
            )
        if self.critic_trunk == "shared" and getattr(self, "critic_model_name_or_path", None) is not None:
            raise ValueError(
                "`critic_model_name_or_path` names a separate critic model, but critic_trunk='shared' puts the value "
                "heads on the policy: set one of them"
            )


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward pass; the gradient flowing back into x is multiplied by `scale` (0: `x.detach()`)."""
    return x.detach() if scale == 0 else _ScaleGrad.apply(x, float(scale))


class ValueHeads(nn.Module):
    """float (..., D) hidden states -> float32 (..., H) values, computed in float32 outside any autocast.

    `head="linear"`: Linear(D, H). `head="mlp"`: Linear(D, D), GELU, Linear(D, H). The output layer starts at zero
    (every value 0, as the separate critic's fresh head)."""

    def __init__(self, hidden_size: int, num_heads: int, head: str = "linear") -> None:
        super().__init__()
        if head not in TRUNK_HEADS:
            raise ValueError(f"`head` must be one of {list(TRUNK_HEADS)}, got {head!r}")
        self.hidden_size, self.num_heads, self.head = hidden_size, num_heads, head
        out = nn.Linear(hidden_size, num_heads)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = out if head == "linear" else nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), out)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.net(hidden.float())


def policy_backbone(policy: nn.Module) -> nn.Module:
    """The module whose output's `last_hidden_state` feeds the policy's LM head (TRL's fused head calls the same
    `base_model`).

    Raises:
        ValueError: the policy has no such backbone (naming `critic_trunk`).
    """
    inner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy  # PEFT
    backbone = getattr(inner, "base_model", None)
    if backbone is None or backbone is inner:
        raise ValueError(
            f"critic_trunk='shared' needs a causal LM with a `base_model` backbone (e.g. Qwen2ForCausalLM.model); "
            f"{type(inner).__name__} has none"
        )
    return backbone


class TrunkCritic(nn.Module):
    """The shared-trunk critic as the trainer calls a critic: `critic(input_ids=, attention_mask=).logits` is float32
    (B, L, H), the heads on the policy backbone's detached last hidden states (one no-grad forward of the backbone).

    Only the heads are parameters (`state_dict`, `parameters`, checkpoints); the policy is referenced, not owned, and
    its train / eval mode is never changed here."""

    def __init__(self, policy: nn.Module, num_heads: int, head: str = "linear") -> None:
        super().__init__()
        backbone = policy_backbone(policy)
        hidden_size = policy.config.get_text_config().hidden_size
        self.heads = ValueHeads(hidden_size, num_heads, head)
        object.__setattr__(self, "_backbone", backbone)  # not a submodule: not saved, not trained here
        self.config = {"num_heads": num_heads, "head": head, "hidden_size": hidden_size}

    @property
    def backbone(self) -> nn.Module:
        return self._backbone

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) last hidden states of the policy's backbone, no gradient."""
        with torch.no_grad():
            out = self._backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return TokenClassifierOutput(logits=self.heads(self.hidden_states(input_ids, attention_mask)))

    def save_pretrained(self, save_directory: str, state_dict=None, safe_serialization: bool = True, **kwargs):
        """The heads as `model.safetensors` plus `trunk_critic.json` (their shape), what `critic.load_critic_state`
        reads back."""
        os.makedirs(save_directory, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, os.path.join(save_directory, "model.safetensors"))
        with open(os.path.join(save_directory, TRUNK_CONFIG_FILE), "w") as f:
            json.dump(self.config, f)


class SharedTrunkMixin:
    """`SynAPOTrainer`'s shared-trunk critic (`critic_trunk="shared"`); with `"separate"` every method here defers to
    the separate critic's code. The trainer provides `args`, `synapo`, `model`, `accelerator`, `critic`, `_critic`,
    `_critic_backend`, `_metrics` and the stage's methods."""

    # --- set-up -----------------------------------------------------------------------------------------------

    @property
    def _trunk_shared(self) -> bool:
        return getattr(self.args, "critic_trunk", "separate") == "shared"

    def _build_trunk_critic(self, critic_model, policy, *, num_heads: int) -> TrunkCritic:
        if hasattr(policy, "peft_config"):
            raise NotImplementedError(
                "critic_trunk='shared' with a PEFT policy is untested (TRL's reference pass runs the same backbone "
                "with the adapter off): use critic_trunk='separate'"
            )
        if critic_model is not None:
            raise ValueError(
                "`critic_model` is a separate critic, but critic_trunk='shared' puts the value heads on the policy: "
                "pass critic_model=None"
            )
        if self._critic_backend != "single":
            raise NotImplementedError(
                f"critic_trunk='shared' is tested in one process only; this run is {self._critic_backend} "
                "(use critic_trunk='separate', which runs under DDP, FSDP2 and DeepSpeed)"
            )
        critic = TrunkCritic(policy, num_heads, self.args.critic_trunk_head).to(self.accelerator.device)
        self._trunk_sink = None  # (list, logits_to_keep) while a pass on the policy is captured
        self._trunk_features = None  # (input_ids, attention_mask, (B, T, D) detached) of the last no-grad pass
        self._trunk_grad_hidden = None  # (b, T, D) with grad, of the loss pass (grad_scale > 0)
        self._trunk_batch = None  # the rollout batch's CriticBatch (grad_scale > 0)
        self._trunk_rollout_features = None  # (B, T, D) detached features of the last rollout (the update's input)
        critic.backbone.register_forward_hook(self._trunk_hook)
        return critic

    def _prepare_trunk_critic(self) -> PreparedCritic:
        args = self.args
        optimizer = torch.optim.AdamW(
            self.critic.parameters(),
            lr=args.critic_learning_rate,
            weight_decay=args.critic_weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        return PreparedCritic(self.critic, optimizer, "single")

    def _critic_sharded(self) -> bool:
        return False if self._trunk_shared else super()._critic_sharded()

    # --- features ---------------------------------------------------------------------------------------------

    def _trunk_hook(self, module, args, output) -> None:
        sink = self._trunk_sink
        if sink is not None:
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            sink[0].append(hidden[:, -sink[1] - 1 : -1])  # states before each completion token (critic layout)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's log-prob pass; on the policy with the shared trunk, its backbone's hidden states are kept too: a
        no-grad pass's as the rollout's features, a with-grad pass's for the value loss (grad_scale > 0)."""
        grad_pass = torch.is_grad_enabled()
        keep = self._trunk_shared and model is self.model and (not grad_pass or self.args.critic_trunk_grad_scale > 0)
        if not keep:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        self._trunk_sink = ([], logits_to_keep)
        try:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
            hidden = torch.cat(self._trunk_sink[0]) if self._trunk_sink[0] else None
        finally:
            self._trunk_sink = None
        if hidden is not None and grad_pass:
            self._trunk_grad_hidden = hidden
        elif hidden is not None:
            self._trunk_features = (input_ids, attention_mask, hidden.detach())
        return out

    def _trunk_features_for(self, input_ids, attention_mask, T: int) -> torch.Tensor:
        """(B, T, D) detached features of this rollout: kept from a no-grad pass on the same tokens, else one no-grad
        forward of the backbone (chunks of the per-device batch)."""
        kept, self._trunk_features = self._trunk_features, None
        if kept is not None:
            ids, mask, hidden = kept
            same = ids.shape == input_ids.shape and torch.equal(ids, input_ids) and torch.equal(mask, attention_mask)
            if same and hidden.size(1) == T:
                return hidden
        chunk = self.args.per_device_train_batch_size
        parts = []
        with self.accelerator.autocast():
            for start in range(0, input_ids.size(0), chunk):
                rows = slice(start, start + chunk)
                parts.append(self.critic.hidden_states(input_ids[rows], attention_mask[rows])[:, -T - 1 : -1])
        return torch.cat(parts)

    # --- the stage's hooks ------------------------------------------------------------------------------------

    def _rollout_values(self, input_ids, attention_mask, T: int) -> torch.Tensor:
        if not self._trunk_shared:
            return super()._rollout_values(input_ids, attention_mask, T)
        features = self._trunk_features_for(input_ids, attention_mask, T)
        self._trunk_rollout_features = features
        with torch.no_grad():
            return self.critic.heads(features)  # float32 (B, T, H)

    def _critic_values_fn(self):
        """`update_critic`'s `values_fn`: the heads on the rollout's kept features (no forward)."""
        if not self._trunk_shared:
            return super()._critic_values_fn()
        features = self._trunk_rollout_features
        heads = self.critic.heads
        return lambda rows: heads(features[rows])

    def _critic_update_runs(self) -> bool:
        """grad_scale > 0: the heads train in the policy's loss pass; the stage updates them in the warm-up only."""
        if self._trunk_shared and self.args.critic_trunk_grad_scale > 0:
            return not self._warmup_finished
        return super()._critic_update_runs()

    def _keep_critic_batch(self, output, batch) -> None:
        """grad_scale > 0: the rollout batch travels with TRL's micro-batches as row indices (`ROW_INDEX`)."""
        if self._trunk_shared and self.args.critic_trunk_grad_scale > 0:
            B = batch.response_mask.size(0)
            output[ROW_INDEX] = torch.arange(B, device=batch.response_mask.device)
            self._trunk_batch = batch
        super()._keep_critic_batch(output, batch)

    # --- grad_scale > 0: the value loss in the policy's loss pass ---------------------------------------------

    def _compute_loss(self, model, inputs):
        scale = self.args.critic_trunk_grad_scale if self._trunk_shared else 0.0
        if scale == 0 or ROW_INDEX not in inputs or not self.model.training or self._trunk_batch is None:
            return super()._compute_loss(model, inputs)
        self._trunk_grad_hidden = None
        loss = super()._compute_loss(model, inputs)
        hidden, self._trunk_grad_hidden = self._trunk_grad_hidden, None
        if hidden is None:
            raise RuntimeError(
                "critic_trunk_grad_scale > 0: TRL's loss pass did not run the policy's backbone through "
                "_get_per_token_logps_and_entropies (synapo_ext/trl/_compat.py assumes it does)"
            )
        from .update import minibatch_critic_loss

        values = self.critic.heads(scale_grad(hidden, scale))  # (b, T, H): the heads' full gradient, c x the trunk's
        n_micro = self.args.steps_per_generation
        value_loss, metrics = minibatch_critic_loss(
            values, self._trunk_batch, inputs[ROW_INDEX], self.synapo, self.args.cliprange_value, n_micro
        )
        loss = loss + value_loss / self.current_gradient_accumulation_steps
        for name, value in metrics.items():
            self._metrics["train"][name].append(float(value))
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's step; with grad_scale > 0 the heads' optimizer steps when the policy's does (their gradient came
        from this step's backward)."""
        out = super().training_step(model, inputs, num_items_in_batch)
        if self._trunk_shared and self.args.critic_trunk_grad_scale > 0 and self.accelerator.sync_gradients:
            self._step_heads()
        return out

    def _step_heads(self) -> None:
        prepared, scheduler = self._prepare_critic(), self._critic_lr_scheduler()  # the scheduler before the step
        params = [p for p in self.critic.parameters() if p.grad is not None]
        if not params:
            return
        average_gradients(params)
        if self.args.critic_max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, self.args.critic_max_grad_norm)
            self._metrics["train"][METRICS.grad_norm].append(float(norm))
        prepared.optimizer.step()
        prepared.optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self._critic_updates += 1
