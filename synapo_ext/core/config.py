"""SynAPO's parameters (one dataclass both host adapters read) and the named presets.

Field names never clash with TRL's `GRPOConfig` (e.g. its `beta` is the KL coefficient), so
`SynAPOConfig(GRPOConfig)` can carry them under the same names; verl reads them from
`algorithm.synapo.*`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ._hparams import RULES, check_hparam, check_lambda_clip

__all__ = ["PRESETS", "SynAPOParams", "did_you_mean", "params_from_preset"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class SynAPOParams:
    """SynAPO parameters with the defaults of docs/spec.md (the `synapo` preset).

    Parameters that control GAE:
        gamma (`float`, *optional*, defaults to `1.0`): discount factor.
        gae_lambda (`float`, *optional*, defaults to `0.95`): the actor's fixed lambda when
            `length_adaptive_lambda` is off (PPO).
        critic_lambda (`float`, *optional*, defaults to `1.0`): lambda of the critic targets (VAPO's decoupled
            GAE; 1.0 = Monte-Carlo). Must be 1.0 with HVM on.
        whiten_advantages (`bool`, *optional*, defaults to `True`): whiten advantages over the batch's valid tokens.
        length_adaptive_lambda (`bool`, *optional*, defaults to `True`): VAPO's lambda = 1 - 1 / (alpha * l).
    Parameters that control EA-GAE:
        ea_gae_enabled (`bool`, *optional*, defaults to `True`): add the entropy term (needs rollout entropy).
        ea_gae_alpha (`float`, *optional*, defaults to `0.05`): alpha of the length-adaptive lambda (VAPO's too).
        ea_gae_beta (`float`, *optional*, defaults to `0.05`): entropy scale beta (< 0: the write-up's prose sign).
        ea_gae_lambda_min, ea_gae_lambda_max (`float`, *optional*, defaults to `0.0`, `1.0`): clip range.
    Parameters that control HVM:
        hvm_enabled (`bool`, *optional*, defaults to `True`): two-head critic over reasoning segments.
        hvm_global_lambda (`float`, *optional*, defaults to `0.95`): lambda of the GAE over segments.
        hvm_global_weight (`float`, *optional*, defaults to `1.0`): weight of the global advantage.
        hvm_delimiters (`list[str]`, *optional*, defaults to `["\\n\\n"]`): strings that end a segment.
        hvm_min_len, hvm_max_len, hvm_fallback_len (`int`, *optional*, defaults to `1`, `None`, `64`): segment
            length limits and the chunk length for responses without a delimiter.
    Parameters that control SCVL:
        scvl_enabled (`bool`, *optional*, defaults to `True`): contrastive critic loss at divergence points.
        scvl_threshold (`float`, *optional*, defaults to `0.5`): positive iff score >= threshold.
        scvl_margin (`float`, *optional*, defaults to `0.5`): hinge margin.
        scvl_weight (`float`, *optional*, defaults to `0.1`): weight in the critic loss.
        scvl_max_pairs (`int`, *optional*, defaults to `16`): pairs per group, longest common prefix first.
    Parameters that control the VAPO pieces:
        value_warmup_steps (`int`, *optional*, defaults to `50`): critic-only updates before the policy moves.
        clip_ratio_low, clip_ratio_high (`float`, *optional*, defaults to `0.2`, `0.28`): clip-higher.
        positive_lm_coef (`float`, *optional*, defaults to `0.1`): NLL weight on correct responses.
        positive_lm_threshold (`float`, *optional*, defaults to `0.5`): a response is correct iff score >= threshold
            (the positive-example LM loss's own threshold, independent of SCVL's).
    Parameters that stop the value warm-up early (`value_warmup_steps` is then the cap; `synapo_ext.core.warmup`):
        value_warmup_target_ev (`float`, *optional*): stop once the mean held-out explained variance of the last
            `value_warmup_window` warm-up batches reaches it (None: off).
        value_warmup_patience (`int`, *optional*): stop once the mean held-out critic loss of the last
            `value_warmup_window` batches has not improved by `value_warmup_min_delta` for this many batches
            (None: off).
        value_warmup_min_delta (`float`, *optional*, defaults to `0.01`): relative improvement of the plateau test.
        value_warmup_window (`int`, *optional*, defaults to `5`): warm-up batches averaged by both tests.
    """

    # GAE
    gamma: float = field(default=1.0, metadata=_help("Discount factor."))
    gae_lambda: float = field(default=0.95, metadata=_help("Actor lambda when length_adaptive_lambda is off."))
    critic_lambda: float = field(default=1.0, metadata=_help("Lambda of the critic targets (1.0: Monte-Carlo)."))
    whiten_advantages: bool = field(default=True, metadata=_help("Whiten advantages over valid tokens."))
    length_adaptive_lambda: bool = field(default=True, metadata=_help("VAPO's lambda = 1 - 1/(alpha * length)."))
    # EA-GAE
    ea_gae_enabled: bool = field(default=True, metadata=_help("Entropy-aware lambda (EA-GAE)."))
    ea_gae_alpha: float = field(default=0.05, metadata=_help("Alpha of the length-adaptive lambda."))
    ea_gae_beta: float = field(default=0.05, metadata=_help("Entropy scale beta of EA-GAE (< 0: prose sign)."))
    ea_gae_lambda_min: float = field(default=0.0, metadata=_help("Lower clip of the EA-GAE lambda."))
    ea_gae_lambda_max: float = field(default=1.0, metadata=_help("Upper clip of the EA-GAE lambda."))
    # HVM
    hvm_enabled: bool = field(default=True, metadata=_help("Two-head (local, global) critic over segments."))
    hvm_global_lambda: float = field(default=0.95, metadata=_help("Lambda of the GAE over segments."))
    hvm_global_weight: float = field(default=1.0, metadata=_help("Weight of the global advantage."))
    hvm_delimiters: list[str] = field(default_factory=lambda: ["\n\n"], metadata=_help("Segment delimiters."))
    hvm_min_len: int = field(default=1, metadata=_help("Minimum segment length in tokens."))
    hvm_max_len: int | None = field(default=None, metadata=_help("Maximum segment length in tokens."))
    hvm_fallback_len: int | None = field(default=64, metadata=_help("Chunk length for rows without a delimiter."))
    # SCVL
    scvl_enabled: bool = field(default=True, metadata=_help("Contrastive critic loss at divergence points."))
    scvl_threshold: float = field(default=0.5, metadata=_help("A response is positive iff score >= threshold."))
    scvl_margin: float = field(default=0.5, metadata=_help("SCVL hinge margin."))
    scvl_weight: float = field(default=0.1, metadata=_help("SCVL weight in the critic loss."))
    scvl_max_pairs: int = field(default=16, metadata=_help("Maximum SCVL pairs per group."))
    # VAPO pieces
    value_warmup_steps: int = field(default=50, metadata=_help("Critic-only updates before the policy moves."))
    clip_ratio_low: float = field(default=0.2, metadata=_help("PPO clip epsilon (low side)."))
    clip_ratio_high: float = field(default=0.28, metadata=_help("PPO clip epsilon (high side, clip-higher)."))
    positive_lm_coef: float = field(default=0.1, metadata=_help("NLL weight on correct responses."))
    positive_lm_threshold: float = field(
        default=0.5, metadata=_help("A response is correct (positive-example LM loss) iff score >= threshold.")
    )
    # Value warm-up stopping rule (value_warmup_steps is the cap)
    value_warmup_target_ev: float | None = field(
        default=None, metadata=_help("Stop the warm-up at this held-out explained variance (window mean; None: off).")
    )
    value_warmup_patience: int | None = field(
        default=None, metadata=_help("Stop the warm-up after this many batches without loss improvement (None: off).")
    )
    value_warmup_min_delta: float = field(
        default=0.01, metadata=_help("Relative loss improvement that resets the warm-up's plateau test.")
    )
    value_warmup_window: int = field(default=5, metadata=_help("Warm-up batches averaged by the stopping tests."))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field once, where it is set.

        Raises:
            TypeError: a value of the wrong type (a string for a number or a boolean), naming the field.
            ValueError: a non-finite float (NaN/inf) or an out-of-range value, naming the field.
        """
        if isinstance(self.hvm_delimiters, (str, tuple)):
            self.hvm_delimiters = (
                [self.hvm_delimiters] if isinstance(self.hvm_delimiters, str) else list(self.hvm_delimiters)
            )
        for name in RULES:  # each field by its rule (`_hparams`), the rule the public functions use too
            check_hparam(name, getattr(self, name))
        check_lambda_clip(self.ea_gae_lambda_min, self.ea_gae_lambda_max, ("ea_gae_lambda_min", "ea_gae_lambda_max"))
        if self.ea_gae_enabled and not self.length_adaptive_lambda:
            raise _bad(
                ValueError,
                "ea_gae_enabled",
                "`ea_gae_enabled` needs `length_adaptive_lambda` (EA-GAE extends VAPO's lambda)",
            )
        if self.hvm_enabled and self.critic_lambda != 1.0:
            raise _bad(
                ValueError,
                "critic_lambda",
                f"`critic_lambda` must be 1.0 with HVM on (its targets are Monte-Carlo per level), "
                f"got {self.critic_lambda}; set hvm_enabled=False to use another critic lambda",
            )
        if self.hvm_enabled and (not self.hvm_delimiters or not all(self.hvm_delimiters)):
            raise _bad(
                ValueError,
                "hvm_delimiters",
                f"`hvm_delimiters` must be non-empty strings, got {self.hvm_delimiters!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _bad(kind: type[Exception], field: str, message: str) -> Exception:
    """`kind(message)` that also names the offending field in `.field` (hosts map it to their own key)."""
    exc = kind(message)
    exc.field = field
    return exc


# Each preset lists only what differs from SynAPOParams' defaults (the full `synapo` method).
_PPO = {
    "length_adaptive_lambda": False,
    "critic_lambda": 0.95,
    "ea_gae_enabled": False,
    "hvm_enabled": False,
    "scvl_enabled": False,
    "value_warmup_steps": 0,
    "clip_ratio_high": 0.2,
    "positive_lm_coef": 0.0,
}
_VAPO = {"ea_gae_enabled": False, "hvm_enabled": False, "scvl_enabled": False}
# Fields a preset sets that a host's config may leave as None, "the preset's value" (the TRL config's; clip_ratio_*
# follow TRL's epsilon_* there)
PRESET_FIELDS = (
    "length_adaptive_lambda",
    "critic_lambda",
    "ea_gae_enabled",
    "hvm_enabled",
    "scvl_enabled",
    "value_warmup_steps",
    "positive_lm_coef",
)

PRESETS: dict[str, dict[str, Any]] = {
    "ppo": _PPO,
    "vapo": _VAPO,
    "synapo": {},
    "synapo-no-hvm": {"hvm_enabled": False},
    "synapo-no-scvl": {"scvl_enabled": False},
    "synapo-no-eagae": {"ea_gae_enabled": False},
}


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """ " (did you mean `x`?)" for the known names closest to a misspelt `name` (difflib, cutoff 0.75), else ""."""
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
    return f" (did you mean {' or '.join(f'`{prefix}{c}`' for c in close)}?)" if close else ""


def params_from_preset(preset: str = "synapo", **overrides: Any) -> SynAPOParams:
    """The parameters of a named preset, with `overrides` applied on top.

    Raises:
        ValueError: unknown preset or parameter name (listing the valid ones), or an invalid value.
    """
    if preset not in PRESETS:
        hint = did_you_mean(str(preset), PRESETS)
        raise _bad(ValueError, "preset", f"unknown SynAPO `preset` {preset!r}{hint}; choose one of {sorted(PRESETS)}")
    names = {f.name for f in dataclasses.fields(SynAPOParams)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        hints = "".join(did_you_mean(n, names) for n in unknown)
        raise ValueError(f"unknown SynAPO parameter(s) {unknown}{hints}; valid names: {sorted(names)}")
    return SynAPOParams(**{**PRESETS[preset], **overrides})
