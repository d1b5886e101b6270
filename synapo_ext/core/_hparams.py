"""The rule of every SynAPO hyper-parameter, in one table: `SynAPOParams` checks its fields with it and each public
core function checks its hyper-parameter arguments with the same rule (e.g. `ea_gae_lambda(alpha=...)` by the rule
of `ea_gae_alpha`), so a value refused in one place is refused everywhere, with the same message.

A rule is a kind (`float`: a finite real; `int`; `bool`; `list[str]`), an optional range and whether None is legal.
Booleans are refused as numbers, numbers and strings (e.g. "no") as booleans, strings (e.g. "1e-5") as numbers.
Checks read Python scalars only (no pass over a tensor).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = ["ARGUMENT_RULES", "RULES", "Rule", "check_argument", "check_hparam", "check_lambda_clip", "check_value"]

_INF = math.inf


@dataclass(frozen=True)
class Rule:
    """kind: "float", "int", "bool" or "list[str]"; a number must lie in [low, high] (an end is excluded when
    `low_open` / `high_open`); `optional`: None is legal; `why`: appended to a range error."""

    kind: str
    low: float = -_INF
    high: float = _INF
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    why: str = ""

    @property
    def annotation(self) -> str:
        return f"{self.kind} | None" if self.optional else self.kind

    def range_text(self) -> str:
        """The legal range as a reader writes it: "in [0, 1]", "> 0", ">= 1", "< 1", "<= 1"."""
        low, high = _num(self.low), _num(self.high)
        if self.low != -_INF and self.high != _INF:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low != -_INF:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"{'<' if self.high_open else '<='} {high}"

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_PROBABILITY = Rule("float", 0.0, 1.0)
_NON_NEGATIVE = Rule("float", 0.0)
_REAL = Rule("float")
_BOOL = Rule("bool")

# SynAPOParams' fields (tested to be exactly its fields, each rule's kind its annotation)
RULES: dict[str, Rule] = {
    "gamma": _PROBABILITY,
    "gae_lambda": _PROBABILITY,
    "critic_lambda": _PROBABILITY,
    "whiten_advantages": _BOOL,
    "length_adaptive_lambda": _BOOL,
    "ea_gae_enabled": _BOOL,
    "ea_gae_alpha": Rule("float", 0.0, low_open=True),
    "ea_gae_beta": _REAL,
    "ea_gae_lambda_min": _PROBABILITY,
    "ea_gae_lambda_max": _PROBABILITY,
    "hvm_enabled": _BOOL,
    "hvm_global_lambda": _PROBABILITY,
    "hvm_global_weight": _NON_NEGATIVE,
    "hvm_delimiters": Rule("list[str]"),
    "hvm_min_len": Rule("int", 1),
    "hvm_max_len": Rule("int", 1, optional=True),
    "hvm_fallback_len": Rule("int", 1, optional=True),
    "scvl_enabled": _BOOL,
    "scvl_threshold": _REAL,
    "scvl_margin": _NON_NEGATIVE,
    "scvl_weight": _NON_NEGATIVE,
    "scvl_max_pairs": Rule("int", 1),
    "value_warmup_steps": Rule("int", 0),
    "clip_ratio_low": Rule("float", 0.0, 1.0, high_open=True, why=" (the ratio's lower clip is 1 - it)"),
    "clip_ratio_high": _NON_NEGATIVE,
    "positive_lm_coef": _NON_NEGATIVE,
    "positive_lm_threshold": _REAL,
    "value_warmup_target_ev": Rule("float", high=1.0, optional=True),
    "value_warmup_patience": Rule("int", 1, optional=True),
    "value_warmup_min_delta": _PROBABILITY,
    "value_warmup_window": Rule("int", 1),
}


# Hyper-parameters of core functions that are no SynAPOParams field (the hosts' own settings)
ARGUMENT_RULES: dict[str, Rule] = {
    "cliprange_value": Rule("float", 0.0, low_open=True, optional=True, why=" or None (None: no value clipping)"),
    "num_tokens": Rule("float", 0.0, low_open=True, optional=True),
    "num_pairs": Rule("float", 0.0),
}


def check_value(value: Any, name: str, rule: Rule) -> Any:
    """`value` under `rule`; returns it (a float for a `float` rule, so an int stays exact).

    Raises:
        TypeError: a value of the wrong kind (None where it is not optional), naming `name`.
        ValueError: NaN/inf, or outside the rule's range, naming `name`.
    """
    if value is None:
        if rule.optional:
            return None
        raise TypeError(f"`{name}` must not be None (expected {rule.annotation})")
    kind = rule.kind
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ValueError(f"`{name}` must be finite, got {value!r}")
    else:  # list[str]
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
    if not ok:
        raise TypeError(f"`{name}` must be {rule.annotation}, got {type(value).__name__} {value!r}")
    if kind in ("int", "float") and not rule.contains(value):
        raise ValueError(f"`{name}` must be {rule.range_text()}{rule.why}, got {value!r}")
    return float(value) if kind == "float" else value


def check_hparam(field: str, value: Any, name: str | None = None) -> Any:
    """`value` under the rule of the `SynAPOParams` field `field`; errors name `name` (the caller's argument, default
    `field`) and carry `field` in `.field`. Returns the value (a float for a float field)."""
    try:
        return check_value(value, name or field, RULES[field])
    except (TypeError, ValueError) as exc:
        exc.field = field
        raise


def check_argument(name: str, value: Any) -> Any:
    """`value` under `ARGUMENT_RULES[name]` (a Python number; a 0-d tensor is read as its number)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    return check_value(value, name, ARGUMENT_RULES[name])


def check_lambda_clip(
    lambda_min: Any, lambda_max: Any, names: tuple[str, str] = ("lambda_min", "lambda_max")
) -> tuple[float, float]:
    """EA-GAE's clip range: each in [0, 1] (the rule of `ea_gae_lambda_min` / `_max`), and min <= max."""
    low = check_hparam("ea_gae_lambda_min", lambda_min, names[0])
    high = check_hparam("ea_gae_lambda_max", lambda_max, names[1])
    if not low <= high:
        exc = ValueError(f"need `{names[0]}` <= `{names[1]}`, got {lambda_min} and {lambda_max}")
        exc.field = "ea_gae_lambda_min"
        raise exc
    return low, high
