"""The trainer's value warm-up (VAPO's value pretraining, arXiv 2504.05118 section 4.1): critic-only rollout batches
before the first training step, until `synapo_ext.core.warmup.ValueWarmupRule` stops them.

Each batch is one WARNING line (visible at the default verbosity: the critic's held-out loss and explained variance)
and one `warmup/...` log entry; TRL's own rollout metrics of these batches (reward, lengths) go there too, so the
first training step's metrics average that step's rollout only.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from transformers import Trainer

from ..core import METRICS
from ..core.warmup import ValueWarmupRule
from .update import HELDOUT_VF_LOSS

__all__ = ["ValueWarmupMixin"]

logger = logging.getLogger(__name__)

_EV_NOTE = (
    " (explained variance far below 0: the returns are nearly constant, e.g. almost every reward equal, so their "
    "variance is tiny and any error of the critic dwarfs it; it says the batch has little to explain, not that the "
    "critic is broken)"
)
_STOP_REASONS = {
    "cap": "reached value_warmup_steps",
    "target_ev": "held-out explained variance reached value_warmup_target_ev",
    "plateau": "held-out critic loss stopped improving (value_warmup_patience)",
}


class ValueWarmupMixin:
    """The value warm-up of `SynAPOTrainer` (it provides `synapo`, `_rollout`, `_synapo_stage`, `_reduce_metrics`,
    `_metrics`, `accelerator` and the `_warmup_*` / `_ev_explained` counters)."""

    def _value_warmup(self) -> None:
        """VAPO's value pretraining: critic-only rollout batches until `ValueWarmupRule` stops them (at most
        `value_warmup_steps`). Its metrics go to their own log entries (`warmup/...`, one per batch), not into the
        first training step's; each batch is also a WARNING line (critic loss, explained variance)."""
        rule = ValueWarmupRule.from_params(self.synapo)
        cap = self.synapo.value_warmup_steps
        while True:
            trl_metrics, self._metrics["train"] = self._metrics["train"], defaultdict(list)
            try:
                means, totals = self._synapo_stage(self._rollout(self._next_warmup_batch()), "train")
                logs = self._reduce_metrics(means, totals)
                rollout_metrics = self._metrics["train"]  # TRL's reward / length metrics of this warm-up batch
            finally:
                self._metrics["train"] = trl_metrics
            logs.update({name: sum(values) / len(values) for name, values in rollout_metrics.items() if values})
            self._warmup_done += 1
            if logs.get(METRICS.batches_skipped, 0.0) > 0:  # nothing to learn from: counts towards the cap only
                decision = None
            else:
                decision = rule.update(logs[HELDOUT_VF_LOSS], logs[METRICS.explained_variance])
            stop = (decision is not None and decision.stop) or self._warmup_done >= cap
            reason = decision.reason if decision is not None and decision.stop else "cap"
            self._warmup_line(logs, decision, reason if stop else None)
            if stop:
                break
        self._warmup_finished, self._warmup_stop_reason = True, reason

    def _warmup_line(self, logs: dict[str, float], decision, stop_reason: str | None) -> None:
        """Log one warm-up batch: a `warmup/...` log entry and a WARNING line (visible at the default verbosity)."""
        cap = self.synapo.value_warmup_steps
        entry = {f"warmup/{name}": value for name, value in logs.items()}
        entry["warmup/step"] = float(self._warmup_done)
        if decision is not None:
            entry["warmup/explained_variance_window_mean"] = decision.ev_mean
            entry["warmup/heldout_vf_loss_window_mean"] = decision.loss_mean
        Trainer.log(self, entry)  # transformers' log: TRL's would fold in the training step's metrics
        if not self.accelerator.is_main_process:
            return
        if decision is None:
            logger.warning(
                "SynAPO value warm-up %d/%d: skipped, no row had a valid token and a score", self._warmup_done, cap
            )
        else:
            logger.warning(
                "SynAPO value warm-up %d/%d (critic only): held-out critic loss %.4g, explained variance %.3f "
                "(window mean %.3f)%s",
                self._warmup_done,
                cap,
                logs[HELDOUT_VF_LOSS],
                logs[METRICS.explained_variance],
                decision.ev_mean,
                self._explain_ev_once(logs[METRICS.explained_variance]),
            )
        if stop_reason is not None:
            logger.warning(
                "SynAPO value warm-up done after %d rollout batches (%s); policy training starts",
                self._warmup_done,
                _STOP_REASONS[stop_reason],
            )

    def _explain_ev_once(self, explained_variance: float) -> str:
        """`_EV_NOTE` the first time the explained variance is below -1, else ""."""
        if explained_variance >= -1 or self._ev_explained:
            return ""
        self._ev_explained = True
        return _EV_NOTE

    def _next_warmup_batch(self):
        if self._warmup_iterator is None:
            self._warmup_iterator = iter(self.get_train_dataloader())
        try:
            return next(self._warmup_iterator)
        except StopIteration:
            self._warmup_iterator = iter(self.get_train_dataloader())
            return next(self._warmup_iterator)
