"""`SynAPOConfig`: TRL's `GRPOConfig` plus SynAPO's parameters (the core's `SynAPOParams`) and critic settings."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from ..core import PRESETS, SynAPOParams, params_from_preset
from ..core._hparams import ARGUMENT_RULES, RULES, Rule, check_hparam, check_value
from ..core.config import PRESET_FIELDS
from ._spelling import RENAMED_CONFIG_KEYWORDS, unknown_keyword_message
from .tree import TreeRolloutFields
from .trunk import TrunkCriticFields

__all__ = ["CRITIC_SCHEDULERS", "PRESET_FIELDS", "SynAPOConfig"]


# `transformers.get_scheduler` names the critic can use: each steps without a metric and needs no extra kwargs.
CRITIC_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
)


# The critic's settings and TRL's optimizer settings (the critic's AdamW uses the betas and epsilon too), each
# refused at construction, or when assigned later, by its rule (`synapo_ext.core._hparams`).
FIELD_RULES = {
    "learning_rate": Rule("float", 0.0),
    "weight_decay": Rule("float", 0.0),
    "adam_beta1": Rule("float", 0.0, 1.0, high_open=True),
    "adam_beta2": Rule("float", 0.0, 1.0, high_open=True),
    "adam_epsilon": Rule("float", 0.0),
    "critic_learning_rate": Rule("float", 0.0, low_open=True),
    "critic_weight_decay": Rule("float", 0.0),
    "critic_max_grad_norm": Rule("float", 0.0, optional=True, why=" or None (0 or None: clipping off)"),
    "cliprange_value": ARGUMENT_RULES["cliprange_value"],  # the rule `value_loss` checks its argument by
    "critic_epochs": Rule("int", 1),
    "critic_mini_batch_size": Rule("int", 1, optional=True),
}


def _check_field(name: str, value: Any) -> None:
    """A `FIELD_RULES` field; a string for a number gets a hint (YAML 1.1 loaders read `1e-5` as a string)."""
    try:
        check_value(value, name, FIELD_RULES[name])
    except TypeError as exc:
        if isinstance(value, str):
            raise TypeError(
                f"{exc} (a YAML loader reads `1e-5` as a string: write `1.0e-5`, or convert with float())"
            ) from None
        raise


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _from_preset(text: str) -> dict[str, str]:
    return {"help": f"{text} Default: the preset's value."}


@dataclass
class SynAPOConfig(GRPOConfig, SynAPOParams, TreeRolloutFields, TrunkCriticFields):
    r"""
    Configuration class for [`SynAPOTrainer`]: every [`GRPOConfig`] argument plus SynAPO's.

    SynAPO's parameters are the core's `SynAPOParams` fields, with the same names and defaults (see
    `synapo_ext.core.SynAPOParams` for each one). A `preset` fills the fields it controls; any of them given explicitly
    wins over the preset. Clip-higher is TRL's own `epsilon` / `epsilon_high` (`epsilon_high` defaults to the preset's
    `clip_ratio_high`: 0.28 for VAPO and SynAPO) and the token-level loss is TRL's `loss_type="dapo"` (the default).

    Parameters:
        > Parameters that select the method

        preset (`str`, *optional*, defaults to `"synapo"`):
            One of `ppo`, `vapo`, `synapo`, `synapo-no-hvm`, `synapo-no-scvl`, `synapo-no-eagae`. It sets
            `length_adaptive_lambda`, `critic_lambda`, `ea_gae_enabled`, `hvm_enabled`, `scvl_enabled`,
            `value_warmup_steps`, `positive_lm_coef` (those left at `None`) and `epsilon_high` (if `None`).

        > Parameters that control the critic

        critic_model_name_or_path (`str`, *optional*):
            Path or hub id of a token-classification critic. `None` (and no `critic_model` passed to the trainer):
            the critic is initialised from the policy's weights with a fresh value head.
        critic_learning_rate (`float`, *optional*, defaults to `1e-5`):
            Learning rate of the critic's AdamW (a raw `torch.optim.AdamW`; its betas and epsilon are the policy's
            `adam_beta1`, `adam_beta2`, `adam_epsilon`). The critic is prepared as accelerate runs the policy (DDP,
            FSDP2 or DeepSpeed ZeRO-2/3, with the policy's mixed precision; `gradient_checkpointing` applies to it
            too): see docs/trl_at_scale.md.
        critic_weight_decay (`float`, *optional*, defaults to `0.0`):
            Weight decay of the critic's AdamW.
        critic_lr_scheduler_type (`str`, *optional*, defaults to `"constant"`):
            `transformers.get_scheduler` name for the critic (`constant`, `linear`, `cosine`, ...).
        critic_epochs (`int`, *optional*, defaults to `1`):
            Passes over each rollout batch for the critic.
        critic_mini_batch_size (`int`, *optional*):
            Rows per critic optimizer step (per process). Defaults to `per_device_train_batch_size`.
        critic_max_grad_norm (`float`, *optional*, defaults to `1.0`):
            Gradient clipping of the critic (`0` or `None`: off).
        cliprange_value (`float`, *optional*, defaults to `0.5`):
            PPO value clipping around the rollout-time values (`None`: off).
        critic_trunk (`str`, *optional*, defaults to `"separate"`), critic_trunk_grad_scale (`float`, *optional*,
            defaults to `0.0`), critic_trunk_head (`str`, *optional*, defaults to `"linear"`):
            `"shared"`: the critic is value heads on the policy's own last hidden states (no second model), with the
            value gradient stopped at the trunk (0) or scaled into it; see `synapo_ext.trl.trunk.TrunkCriticFields`
            and docs/critic_trunk.md.

        > Parameters that control tree rollouts (docs/trl_tree_rollouts.md)

        rollout_tree_roots (`int`, *optional*, defaults to `0`):
            Trees per prompt; `0`: independent samples (TRL's generation). Each prompt's `num_generations` rows grow
            as `rollout_tree_roots` trees that branch at segment boundaries (a token containing one of
            `hvm_delimiters`), and `num_generations` must be `rollout_tree_roots * rollout_tree_branching **
            rollout_tree_depth`. Needs `gamma=1`, transformers' generation (no vLLM) and whole trees on each process.
        rollout_tree_branching (`int`, *optional*, defaults to `2`):
            Children of each inner node.
        rollout_tree_depth (`int`, *optional*, defaults to `1`):
            Branchings from a root to a leaf.
        rollout_tree_segments (`int`, *optional*, defaults to `1`):
            Segments each level generates before it branches (the last level runs to the end).
        rollout_tree_local_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the critic's in-segment GAE added to the tree's node advantages (`0`: tree advantages only).
        rollout_tree_credit (`str`, *optional*, defaults to `"nodes"`):
            `"nodes"`: each token's tree advantage is its node's value minus its parent's; `"outcome"` (a control):
            the leaf's score minus its root's value on every token, GRPO's credit on the same tree samples.

        > GRPO's reward normalisation (docs/trl_features.md classifies every GRPOConfig field)

        scale_rewards (`str`, *optional*, defaults to `"none"`):
            Only `"none"`: SynAPO's advantages come from a critic and are scaled by `whiten_advantages`; `"group"` /
            `"batch"` (GRPO's default is `"group"`) are refused.
        multi_objective_aggregation (`str`, *optional*, defaults to `"sum_then_normalize"`):
            Only `"sum_then_normalize"`: a row's score is `sum_k reward_weights[k] * reward_k` of the raw rewards,
            the "normalize" being the critic's baseline; `"normalize_then_sum"` is refused.

        > The write-up's spelling

        ppo_epochs (`int`, *optional*):
            The research write-up's (and legacy TRL's) name of TRL's `num_iterations`: policy updates per generation
            batch. Setting it sets `num_iterations`; the critic's passes stay `critic_epochs`.

        > SynAPO's own parameters (`synapo_ext.core.SynAPOParams`)

        gamma, gae_lambda, critic_lambda, whiten_advantages, length_adaptive_lambda, ea_gae_enabled, ea_gae_alpha,
        ea_gae_beta, ea_gae_lambda_min, ea_gae_lambda_max, hvm_enabled, hvm_global_lambda, hvm_global_weight,
        hvm_delimiters, hvm_min_len, hvm_max_len, hvm_fallback_len, scvl_enabled, scvl_threshold, scvl_margin,
        scvl_weight, scvl_max_pairs, value_warmup_steps (at most this many rollout batches train only the critic
        before the policy moves), value_warmup_target_ev, value_warmup_patience, value_warmup_min_delta,
        value_warmup_window (the warm-up's stopping rule, `synapo_ext.core.warmup`), positive_lm_coef,
        positive_lm_threshold: as in the core. `clip_ratio_low` / `clip_ratio_high` are computed in runtime from
        `epsilon` / `epsilon_high`.
    """

    preset: str = field(default="synapo", metadata=_help(f"SynAPO preset, one of {sorted(PRESETS)}."))
    # Preset-controlled SynAPOParams fields (None: the preset's value)
    length_adaptive_lambda: bool | None = field(default=None, metadata=_from_preset("VAPO's length-adaptive lambda."))
    critic_lambda: float | None = field(default=None, metadata=_from_preset("Lambda of the critic targets."))
    ea_gae_enabled: bool | None = field(default=None, metadata=_from_preset("Entropy-aware lambda (EA-GAE)."))
    hvm_enabled: bool | None = field(default=None, metadata=_from_preset("Two-head critic over segments (HVM)."))
    scvl_enabled: bool | None = field(default=None, metadata=_from_preset("Contrastive critic loss (SCVL)."))
    value_warmup_steps: int | None = field(
        default=None, metadata=_from_preset("Rollout batches that train only the critic before the policy moves.")
    )
    positive_lm_coef: float | None = field(default=None, metadata=_from_preset("NLL weight on correct responses."))
    clip_ratio_low: float = field(default=0.2, init=False, metadata=_help("Computed in runtime: `epsilon`."))
    clip_ratio_high: float = field(default=0.28, init=False, metadata=_help("Computed in runtime: `epsilon_high`."))
    # Critic
    critic_model_name_or_path: str | None = field(
        default=None, metadata=_help("Token-classification critic to load; None: initialise from the policy.")
    )
    critic_learning_rate: float = field(default=1e-5, metadata=_help("Learning rate of the critic's AdamW."))
    critic_weight_decay: float = field(default=0.0, metadata=_help("Weight decay of the critic's AdamW."))
    critic_lr_scheduler_type: str = field(default="constant", metadata=_help("Critic LR scheduler name."))
    critic_epochs: int = field(default=1, metadata=_help("Critic passes over each rollout batch."))
    critic_mini_batch_size: int | None = field(
        default=None, metadata=_help("Rows per critic step (per process); default per_device_train_batch_size.")
    )
    critic_max_grad_norm: float | None = field(default=1.0, metadata=_help("Critic gradient clipping (0: off)."))
    cliprange_value: float | None = field(default=0.5, metadata=_help("PPO value clip range (None: off)."))
    # GRPO's reward normalisation, replaced by the critic's baseline (and `whiten_advantages`)
    scale_rewards: str = field(
        default="none",
        metadata=_help(
            "GRPO's reward scaling. SynAPO's advantages come from a critic (whitened by `whiten_advantages`): only "
            "'none' (the default here) is accepted; 'group' / 'batch' are refused."
        ),
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata=_help(
            "How reward functions combine. SynAPO's score is the weighted sum of the reward functions' raw values "
            "('sum_then_normalize': the normalisation is the critic's baseline and `whiten_advantages`); "
            "'normalize_then_sum' is refused."
        ),
    )
    # The write-up's spelling
    ppo_epochs: int | None = field(
        default=None, metadata=_help("Alias of TRL's num_iterations (the write-up's name); sets it when given.")
    )

    def __post_init__(self):
        preset = params_from_preset(self.preset)  # raises naming `preset`
        if self.ppo_epochs is not None:
            if isinstance(self.ppo_epochs, bool) or not isinstance(self.ppo_epochs, int) or self.ppo_epochs < 1:
                raise ValueError(f"`ppo_epochs` must be an integer >= 1, got {self.ppo_epochs!r}")
            if self.num_iterations not in (1, self.ppo_epochs):
                raise ValueError(
                    f"`ppo_epochs` ({self.ppo_epochs}) and `num_iterations` ({self.num_iterations}) name the same "
                    "setting and disagree: set only one"
                )
            self.num_iterations = self.ppo_epochs
        self._validate_critic_fields()  # before TRL's checks: name the critic's field first
        self._validate_trunk_fields()
        self.validate_tree_fields()
        self._refuse_group_normalisation()
        for name in PRESET_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(preset, name))
        if self.epsilon_high is None:
            self.epsilon_high = preset.clip_ratio_high
        self.clip_ratio_low, self.clip_ratio_high = self.epsilon, self.epsilon_high
        if self.scvl_enabled and self.num_generations is not None and self.num_generations < 2:
            raise ValueError(
                f"`num_generations` must be >= 2 with SCVL on (pairs come from one prompt's responses), got "
                f"{self.num_generations}; raise it or set scvl_enabled=False"
            )
        super().__post_init__()
        self.validate()  # SynAPOParams' checks, each naming its field
        self.validate_tree_rollouts()  # after TRL resolved steps_per_generation
        self._built = True  # from here on, assignments are checked (`__setattr__`)

    def _validate_critic_fields(self) -> None:
        """The critic's settings and TRL's optimizer settings, each refused here (not when AdamW is built or after
        the first rollout) with its field's name."""
        for name in FIELD_RULES:
            _check_field(name, getattr(self, name))
        if self.critic_lr_scheduler_type not in CRITIC_SCHEDULERS:
            raise ValueError(
                f"`critic_lr_scheduler_type` must be one of {list(CRITIC_SCHEDULERS)} (schedulers that step "
                f"without a metric or extra arguments), got {self.critic_lr_scheduler_type!r}"
            )

    def _refuse_group_normalisation(self) -> None:
        """GRPO's reward normalisation options, which have no meaning for a critic's value-based advantages."""
        scale = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if scale != "none":
            raise ValueError(
                f"`scale_rewards` must be 'none' with SynAPOTrainer, got {self.scale_rewards!r}: it scales GRPO's "
                "group-relative advantages, and SynAPO's come from a critic (their scale is set by "
                "`whiten_advantages`, on by default); leave scale_rewards unset"
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "`multi_objective_aggregation` must be 'sum_then_normalize' with SynAPOTrainer, got "
                f"{self.multi_objective_aggregation!r}: SynAPO's score is the weighted sum of the reward functions' "
                "raw values (`reward_weights`), which the critic learns to predict; a per-group normalisation of each "
                "function would make the score group-relative"
            )

    def __setattr__(self, name: str, value: Any) -> None:
        """Once built, an assignment is checked as at construction: `preset` and `ppo_epochs` are refused (applied
        when the config was built, assigning them would change nothing), a SynAPO, critic or optimizer field is
        checked by its rule."""
        if self.__dict__.get("_built", False):
            if name == "preset":
                raise AttributeError(
                    f"`preset` cannot be changed after SynAPOConfig is built (it was applied then: assigning "
                    f"{value!r} would change no setting); build a new one: SynAPOConfig(preset={value!r}, ...)"
                )
            if name == "ppo_epochs":
                raise AttributeError(
                    "`ppo_epochs` cannot be changed after SynAPOConfig is built (it set `num_iterations` then); "
                    "assign `num_iterations` instead"
                )
            if name in RULES:
                check_hparam(name, value)
            elif name in FIELD_RULES:
                _check_field(name, value)
        super().__setattr__(name, value)

    def synapo_params(self) -> SynAPOParams:
        """The core's parameters (a plain `SynAPOParams`) as this config resolves them."""
        return SynAPOParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SynAPOParams)})


_INIT_FIELDS = frozenset(f.name for f in dataclasses.fields(SynAPOConfig) if f.init)
_dataclass_init = SynAPOConfig.__init__


@functools.wraps(_dataclass_init)
def _init_with_hints(self, *args, **kwargs):
    """The dataclass `__init__` with `output_dir` its only positional parameter, as `GRPOConfig("out")` (the
    dataclass order puts SynAPO's fields first), and an unknown keyword refused saying what to write instead."""
    if len(args) > 1:
        raise TypeError(
            f"SynAPOConfig takes one positional argument (output_dir), got {len(args)}: pass the others by keyword"
        )
    if args:
        if "output_dir" in kwargs:
            raise TypeError("SynAPOConfig got output_dir both as its positional argument and as a keyword")
        kwargs["output_dir"] = args[0]
    for name in kwargs:
        if name not in _INIT_FIELDS:
            raise TypeError(unknown_keyword_message("SynAPOConfig", name, _INIT_FIELDS, RENAMED_CONFIG_KEYWORDS))
    _dataclass_init(self, **kwargs)


_init_with_hints.__signature__ = inspect.Signature(
    [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("output_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        *(
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for name, p in inspect.signature(_dataclass_init).parameters.items()
            if name not in ("self", "output_dir")
        ),
    ]
)


SynAPOConfig.__init__ = _init_with_hints
