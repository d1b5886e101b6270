"""What `SynAPOTrainer` assumes about TRL, stated and checked in one place.

The trainer wraps private `GRPOTrainer` methods (TRL issue #4525 recommends it; TRL keeps them stable within a minor
release but not across them). Each assumption below is checked where it is cheap:
the version and the hooks' signatures when `synapo_ext.trl` is imported, the old-log-prob condition when a trainer is
built, and the rollout's fields on every rollout.

1. The TRL release is 1.16.x (`SUPPORTED_TRL`).
2. The hooks the trainer wraps exist with these leading parameters (`HOOKS`).
3. TRL runs its no-grad old-log-prob pass on `self.model`, before any reference-model pass, exactly when
   `gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0` or vLLM's importance-sampling
   correction is on (`trl_runs_old_logps`, grpo_trainer.py:2642-2645); the rollout output then holds
   `old_per_token_logps`. The trainer asks that pass for the entropy too (EA-GAE needs the rollout-time entropy).
4. The rollout output (`_generate_and_score_completions`) holds `ROLLOUT_FIELDS`, `(B, ...)` tensors in the
   process's row order, and `advantages` may be replaced by a `(B, T)` tensor (`_compute_loss` unsqueezes only 1-D).
5. `_generate_single_turn(prompt_ids, images, multimodal_fields, num_generations)` returns one completion (a list of
   token ids, cut after the first of `self.eos_token_ids`) per prompt in `prompt_ids`, generating with
   `self.generation_config` (transformers' path), and `_generate` keeps their order (tree rollouts rely on it).
6. `_calculate_rewards` returns the gathered `(B_global, n_funcs)` rewards with NaN where a function returned None,
   and this process's rows are `process_index * B : (process_index + 1) * B` of them.
"""

from __future__ import annotations

import inspect
import logging
import os

__all__ = [
    "HOOKS",
    "ROLLOUT_FIELDS",
    "SUPPORTED_TRL",
    "check_hooks",
    "check_old_logps_condition",
    "check_rollout_output",
    "check_trl_version",
    "trl_runs_old_logps",
]

logger = logging.getLogger(__name__)

SUPPORTED_TRL = ((1, 16), (1, 17))  # >= 1.16, < 1.17 (pyproject's `trl` extra)
SKIP_VERSION_CHECK_ENV = "SYNAPO_TRL_SKIP_VERSION_CHECK"

# hook -> its leading parameters (after self) as TRL 1.16 defines them
HOOKS = {
    "_generate_and_score_completions": ("inputs",),
    "_calculate_rewards": ("inputs", "prompts", "completions", "completion_ids_list"),
    "_generate_single_turn": ("prompt_ids", "images", "multimodal_fields", "num_generations"),
    "_get_per_token_logps_and_entropies": ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size"),
    "_compute_loss": ("model", "inputs"),
    "_save_checkpoint": ("model", "trial"),
    "_load_optimizer_and_scheduler": ("checkpoint",),
}
ROLLOUT_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch")
# The condition of TRL's old-log-prob pass, as written in `_generate_and_score_completions` (assumption 3)
_OLD_LOGPS_SOURCE = (
    "self.args.gradient_accumulation_steps % generate_every != 0",
    "self.use_vllm and self.vllm_importance_sampling_correction",
)


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string, ignoring pre/dev/local parts: "1.16.0.dev0" -> (1, 16)."""
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_trl_version(version: str | None = None) -> None:
    """Raise `ImportError` unless TRL is 1.16.x (`SYNAPO_TRL_SKIP_VERSION_CHECK=1`: a warning instead)."""
    if version is None:
        import trl

        version = trl.__version__
    low, high = SUPPORTED_TRL
    if low <= _release(version) < high:
        return
    message = (
        f"synapo_ext.trl supports TRL >=1.16,<1.17 and found TRL {version}. SynAPOTrainer wraps private GRPOTrainer "
        "methods that change between TRL minor releases, so another version can break training silently. Install "
        "the supported one: pip install 'trl>=1.16,<1.17' (or pip install -e '.[trl]' in a clone of synapo_ext). "
        f"To try {version} anyway, set {SKIP_VERSION_CHECK_ENV}=1 (unsupported)."
    )
    if os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        logger.warning(message)
        return
    raise ImportError(message)


def check_hooks(trainer_class: type) -> None:
    """Raise `ImportError` if a hook the trainer wraps is missing or its parameters changed (assumption 2)."""
    for name, expected in HOOKS.items():
        method = getattr(trainer_class, name, None)
        if method is None:
            raise ImportError(f"TRL's {trainer_class.__name__} has no `{name}`: synapo_ext.trl needs TRL 1.16.x")
        params = tuple(inspect.signature(method).parameters)[1 : 1 + len(expected)]
        if params != expected:
            raise ImportError(
                f"TRL's {trainer_class.__name__}.{name} takes {params}, synapo_ext.trl expects {expected} (TRL 1.16.x)"
            )


def check_old_logps_condition(trainer_class: type) -> None:
    """Raise `RuntimeError` if TRL's old-log-prob condition is no longer the one `trl_runs_old_logps` mirrors."""
    try:
        source = inspect.getsource(trainer_class._generate_and_score_completions)
    except (OSError, TypeError):  # no source shipped: the rollout's own check (check_rollout_output) still runs
        logger.debug("TRL's source is not available: the old-log-prob condition is checked on each rollout only")
        return
    missing = [text for text in _OLD_LOGPS_SOURCE if text not in source]
    if missing:
        raise RuntimeError(
            f"TRL's old-log-prob pass condition changed (not found: {missing}); synapo_ext.trl mirrors TRL 1.16's in "
            "synapo_ext/trl/_compat.py::trl_runs_old_logps"
        )


def trl_runs_old_logps(trainer) -> bool:
    """Whether TRL's rollout runs its no-grad old-log-prob pass (grpo_trainer.py:2642-2645, assumption 3)."""
    generate_every = trainer.args.steps_per_generation * trainer.num_iterations
    return trainer.args.gradient_accumulation_steps % generate_every != 0 or bool(
        trainer.use_vllm and trainer.vllm_importance_sampling_correction
    )


def check_rollout_output(output: dict, expected_old_logps: bool) -> None:
    """Raise `RuntimeError` if TRL's rollout output lacks a field the trainer reads, or if the old-log-prob pass ran
    when `trl_runs_old_logps` said it would not (or the reverse): the entropy would come from the wrong pass."""
    missing = [name for name in ROLLOUT_FIELDS if name not in output]
    if missing:
        raise RuntimeError(
            f"TRL's rollout output has no {missing} (fields: {sorted(output)}); synapo_ext.trl needs TRL 1.16.x"
        )
    if ("old_per_token_logps" in output) != expected_old_logps:
        raise RuntimeError(
            f"TRL's old-log-prob pass {'did not run' if expected_old_logps else 'ran'} although "
            f"synapo_ext.trl's copy of its condition said it {'would' if expected_old_logps else 'would not'}: "
            "the condition in synapo_ext/trl/_compat.py::trl_runs_old_logps no longer matches this TRL"
        )
