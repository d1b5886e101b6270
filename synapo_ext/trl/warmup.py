"""The trainer's value warm-up (VAPO's value pretraining, arXiv 2504.05118 section 4.1): critic-only rollout batches
before the first training step, until `synapo_ext.core.warmup.ValueWarmupRule` stops them.

The rule judges the critic by its held-out explained variance of the Monte-Carlo outcome return
(`METRICS.explained_variance_outcome`: the row's discounted score from each token on, what VAPO's rule means; with HVM
`METRICS.explained_variance` compares the local head with its own bootstrapped target instead) and by its held-out
loss. A stop with that explained variance <= 0 is a WARNING saying what to change. Each batch is one INFO line (the
critic's held-out loss and explained variance of the outcome; shown with `log_level="info"`, see `SynAPOTrainer`) and
one `warmup/...` log entry; TRL's own rollout metrics of these batches (reward, lengths) go there
too, so the first training step's metrics average that step's rollout only.

The step axis: warm-up batch k (1..N) is logged at global step k, so TensorBoard, W&B and every other reporter that
plots against the global step draw each `warmup/...` entry as a curve over the warm-up; the global step is back to 0
before training, whose entries then start at step 1 (other names, so no point of a curve is written twice).
`warmup/step` holds the same k.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from accelerate.logging import get_logger
from transformers import Trainer

from ..core import METRICS
from ..core.warmup import ValueWarmupRule
from .update import HELDOUT_VF_LOSS

__all__ = ["ValueWarmupMixin", "follow_log_level"]

logger = get_logger(__name__)  # as TRL's trainers log: the main process only

_EV_NOTE = (
    " (explained variance far below 0: the returns are nearly constant, e.g. almost every reward equal, so their "
    "variance is tiny and any error of the critic dwarfs it; it says the batch has little to explain, not that the "
    "critic is broken)"
)
_POOR_EV = (
    "SynAPO: the value warm-up stopped (%s) with the critic's held-out explained variance of the outcome return "
    "at %.3f (window mean) <= 0: the critic predicts the return no better than its mean, so the policy starts from "
    "advantages that are noise around GRPO's. Raise value_warmup_steps (or value_warmup_patience / "
    "value_warmup_window), check critic_learning_rate, or set value_warmup_target_ev so the warm-up goes on until the "
    "critic explains the return"
)
_STOP_REASONS = {
    "cap": "reached value_warmup_steps",
    "target_ev": "held-out explained variance of the outcome reached value_warmup_target_ev",
    "plateau": "held-out critic loss stopped improving (value_warmup_patience)",
}


def follow_log_level(args) -> None:
    """synapo_ext's loggers take `args.log_level` as transformers' take it (`log_level="info"` shows the warm-up's
    progress lines; the default "passive" leaves Python's logging as it is). Where nothing would print them (neither
    the root logger nor synapo_ext's has a handler), synapo_ext gets a stderr handler, as transformers' loggers have.
    """
    if args.log_level == "passive":
        return
    package = logging.getLogger("synapo_ext")
    package.setLevel(args.get_process_log_level())
    if not logging.getLogger().handlers and not package.handlers:
        package.addHandler(logging.StreamHandler())
        package.propagate = False  # a root handler added later would print each line twice


def _heldout_loss(logs: dict[str, float]) -> float:
    """The critic's loss on the batch before it trained on it: `critic/heldout_vf_loss`, or `critic/vf_loss` when the
    update was one step (the stage logs the quantity once, under that name)."""
    return logs.get(HELDOUT_VF_LOSS, logs[METRICS.vf_loss])


class ValueWarmupMixin:
    """The value warm-up of `SynAPOTrainer` (it provides `synapo`, `_rollout`, `_synapo_stage`, `_reduce_metrics`,
    `_metrics`, `accelerator` and the `_warmup_*` / `_ev_explained` counters)."""

    def _value_warmup(self) -> None:
        """VAPO's value pretraining: critic-only rollout batches until `ValueWarmupRule` stops them (at most
        `value_warmup_steps`). Its metrics go to their own log entries (`warmup/...`, one per batch, at global step
        k for batch k), not into the first training step's; each batch is also an INFO line (critic loss, explained
        variance)."""
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
                decision = rule.update(_heldout_loss(logs), logs.get(METRICS.explained_variance_outcome))
            stop = (decision is not None and decision.stop) or self._warmup_done >= cap
            reason = decision.reason if decision is not None and decision.stop else "cap"
            self._warmup_line(logs, decision, reason if stop else None)
            if stop:
                break
        self._warmup_finished, self._warmup_stop_reason = True, reason

    def _warmup_line(self, logs: dict[str, float], decision, stop_reason: str | None) -> None:
        """Log one warm-up batch: a `warmup/...` log entry at global step `_warmup_done` and an INFO line."""
        cap = self.synapo.value_warmup_steps
        entry = {f"warmup/{name}": value for name, value in logs.items()}
        entry["warmup/step"] = float(self._warmup_done)
        if decision is not None:
            if decision.ev_mean == decision.ev_mean:  # NaN: no defined explained variance in the window yet
                entry["warmup/explained_variance_window_mean"] = decision.ev_mean
            entry["warmup/heldout_vf_loss_window_mean"] = decision.loss_mean
        step, self.state.global_step = self.state.global_step, self._warmup_done
        try:
            Trainer.log(self, entry)  # transformers' log: TRL's would fold in the training step's metrics
        finally:
            self.state.global_step = step
        if decision is None:
            logger.info(
                "SynAPO value warm-up %d/%d: skipped, no row had a valid token and a score", self._warmup_done, cap
            )
        else:
            ev = logs.get(METRICS.explained_variance_outcome)
            logger.info(
                "SynAPO value warm-up %d/%d (critic only): held-out critic loss %.4g, explained variance of the "
                "outcome %s (window mean %s)%s",
                self._warmup_done,
                cap,
                _heldout_loss(logs),
                "undefined (every row's return is the same)" if ev is None else f"{ev:.3f}",
                "undefined" if decision.ev_mean != decision.ev_mean else f"{decision.ev_mean:.3f}",
                self._explain_ev_once(ev),
            )
        if stop_reason is not None:
            logger.info(
                "SynAPO value warm-up done after %d rollout batches (%s); policy training starts",
                self._warmup_done,
                _STOP_REASONS[stop_reason],
            )
            if decision is not None and decision.ev_mean <= 0:  # the critic explains nothing of the return: say so
                logger.warning(_POOR_EV, _STOP_REASONS[stop_reason], decision.ev_mean)

    def _explain_ev_once(self, explained_variance: float | None) -> str:
        """`_EV_NOTE` the first time the explained variance is below -1, else ""."""
        if explained_variance is None or explained_variance >= -1 or self._ev_explained:
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
