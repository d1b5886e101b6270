"""When to stop VAPO's value pretraining: a step cap, a target held-out explained variance, a plateau of the loss.

VAPO (arXiv 2504.05118, section 4.1) trains the value model on Monte-Carlo returns of the fixed initial policy
"until value loss and explained variance are good enough", then starts RL. Hosts call `ValueWarmupRule.update` once
per warm-up rollout batch with the critic's *held-out* numbers: measured on the fresh batch before the critic trains
on it, so they describe rollouts the critic has not seen. The explained variance is the value's against the
Monte-Carlo outcome return (the row's discounted score from each token on: what GAE with lambda = 1 targets;
`METRICS.explained_variance_outcome`), not against the critic's own training target, which with HVM is bootstrapped
from the global head. A stop with `ev_mean <= 0` means the critic explains nothing of the return: hosts say so.

    ev_mean, loss_mean = means over the last `window` batches
    stop when  ev_mean >= target_ev                                       ("target_ev", after a full window)
          or   loss_mean has not gone below best * (1 - min_delta)
               for `patience` batches in a row                          ("plateau", after a full window)
          or   `max_steps` batches are done                               ("cap")

With neither `target_ev` nor `patience` set the rule is the fixed count `max_steps` (VAPO's `value_warmup_steps`).
Plain Python: no torch, no host.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["ValueWarmupRule", "WarmupDecision"]


@dataclass(frozen=True)
class WarmupDecision:
    """One `update`'s outcome. `reason`: "target_ev", "plateau", "cap", or None while warm-up goes on."""

    step: int  # warm-up batches done, this one included
    stop: bool
    reason: str | None
    ev_mean: float  # mean held-out explained variance over the window (its defined values; NaN if none)
    loss_mean: float  # mean held-out critic loss over the window


class ValueWarmupRule:
    """The stopping rule of value pretraining (see the module docstring).

    Args:
        max_steps: the cap, warm-up batches (>= 0; 0: no warm-up).
        target_ev: stop once the window's mean held-out explained variance reaches it (None: off).
        patience: stop once the window's mean held-out loss has not improved for this many batches (None: off).
        min_delta: relative improvement that counts for the plateau test (0.01: 1 % below the best so far).
        window: batches averaged by both tests (per-batch numbers are noisy).

    Raises:
        ValueError: a bad argument, naming it.
    """

    def __init__(
        self,
        *,
        max_steps: int,
        target_ev: float | None = None,
        patience: int | None = None,
        min_delta: float = 0.01,
        window: int = 5,
    ) -> None:
        for name, value, optional in (("max_steps", max_steps, False), ("patience", patience, True)):
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if optional else 0):
                raise ValueError(f"`{name}` must be an integer >= {1 if optional else 0}, got {value!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"`window` must be an integer >= 1, got {window!r}")
        if target_ev is not None and not (_is_number(target_ev) and math.isfinite(target_ev) and target_ev <= 1.0):
            raise ValueError(f"`target_ev` must be a finite number <= 1 or None, got {target_ev!r}")
        if not (_is_number(min_delta) and math.isfinite(min_delta) and 0.0 <= min_delta <= 1.0):
            raise ValueError(f"`min_delta` must be a number in [0, 1], got {min_delta!r}")
        self.max_steps, self.target_ev, self.patience = max_steps, target_ev, patience
        self.min_delta, self.window = float(min_delta), window
        self.step = 0
        self._evs: deque[float] = deque(maxlen=window)
        self._losses: deque[float] = deque(maxlen=window)
        self._best_loss = math.inf
        self._since_best = 0

    @classmethod
    def from_params(cls, params) -> ValueWarmupRule:
        """The rule a `SynAPOParams` describes (`value_warmup_steps` is the cap)."""
        return cls(
            max_steps=params.value_warmup_steps,
            target_ev=params.value_warmup_target_ev,
            patience=params.value_warmup_patience,
            min_delta=params.value_warmup_min_delta,
            window=params.value_warmup_window,
        )

    def update(self, loss: float, explained_variance: float | None) -> WarmupDecision:
        """Record one warm-up batch's held-out critic loss and explained variance (of the outcome return); say whether
        to stop.

        `explained_variance` None: undefined for this batch (`core.explained_variance`: returns without variance);
        the batch counts for the loss and the cap, not for the explained-variance window (whose mean is then over
        the defined ones among the last `window` batches, NaN while there is none, and the target test waits for
        `window` of them).

        Raises:
            ValueError: `loss`, or `explained_variance` when given, is not finite.
        """
        for name, value in (("loss", loss), ("explained_variance", explained_variance)):
            if value is None and name == "explained_variance":
                continue
            if not (_is_number(value) and math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        self.step += 1
        if explained_variance is not None:
            self._evs.append(float(explained_variance))
        self._losses.append(float(loss))
        ev_mean = sum(self._evs) / len(self._evs) if self._evs else math.nan
        loss_mean = sum(self._losses) / len(self._losses)
        full = len(self._losses) == self.window
        reason = None
        if full and self.patience is not None:
            # plateau test: the window's mean loss must beat the best so far by min_delta (relative)
            if self._best_loss == math.inf or loss_mean < self._best_loss - self.min_delta * abs(self._best_loss):
                self._best_loss, self._since_best = loss_mean, 0
            else:
                self._since_best += 1
                if self._since_best >= self.patience:
                    reason = "plateau"
        if len(self._evs) == self.window and self.target_ev is not None and ev_mean >= self.target_ev:
            reason = "target_ev"
        if reason is None and self.step >= self.max_steps:
            reason = "cap"
        return WarmupDecision(self.step, reason is not None, reason, ev_mean, loss_mean)

    def state_dict(self) -> dict:
        """The rule's progress as plain JSON-able data (for a host's checkpoint)."""
        return {
            "step": self.step,
            "evs": list(self._evs),
            "losses": list(self._losses),
            "best_loss": None if math.isinf(self._best_loss) else self._best_loss,
            "since_best": self._since_best,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s progress (the settings stay this rule's own)."""
        self.step, self._since_best = int(state["step"]), int(state["since_best"])
        self._evs = deque((float(x) for x in state["evs"]), maxlen=self.window)
        self._losses = deque((float(x) for x in state["losses"]), maxlen=self.window)
        self._best_loss = math.inf if state["best_loss"] is None else float(state["best_loss"])


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
