"""The TRL environment: TRL 1.16 beside torch and `synapo_ext.core`, and the checks of what the trainer assumes."""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")

pytestmark = pytest.mark.trl


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string, ignoring pre/dev/local parts: "1.16.0.dev0" -> (1, 16)."""
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


def test_trl_version_is_supported():
    assert (1, 16) <= _release(trl.__version__) < (1, 17), f"synapo-ext targets TRL 1.16.x, got {trl.__version__}"


def test_grpo_trainer_and_core_import_together():
    # The TRL adapter subclasses these; importing them pulls in transformers, so this checks the env resolves.
    from trl import GRPOConfig, GRPOTrainer

    import synapo_ext.core

    assert issubclass(GRPOConfig, object) and callable(GRPOTrainer)
    assert synapo_ext.core.__name__ == "synapo_ext.core"


def test_version_check_refuses_another_minor_release(monkeypatch):
    from synapo_ext.trl._compat import SKIP_VERSION_CHECK_ENV, check_trl_version

    check_trl_version("1.16.0")
    check_trl_version("1.16.3.dev0")
    monkeypatch.delenv(SKIP_VERSION_CHECK_ENV, raising=False)
    for version in ("1.17.0", "1.15.2", "2.0.0"):
        with pytest.raises(ImportError, match=rf"TRL >=1.16,<1.17 and found TRL {version}.*pip install"):
            check_trl_version(version)
    monkeypatch.setenv(SKIP_VERSION_CHECK_ENV, "1")
    check_trl_version("1.17.0")  # the user's explicit choice: a warning, not an error


def test_hook_signatures_are_checked():
    from trl import GRPOTrainer

    from synapo_ext.trl._compat import check_hooks, check_old_logps_condition

    check_hooks(GRPOTrainer)
    check_old_logps_condition(GRPOTrainer)

    class Drifted(GRPOTrainer):
        def _calculate_rewards(self, inputs, prompts, completions):  # a parameter fewer
            return None

    with pytest.raises(ImportError, match="_calculate_rewards"):
        check_hooks(Drifted)

    class NewCondition(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):  # no copy of 1.16's old-log-prob condition
            return {}

    with pytest.raises(RuntimeError, match="old-log-prob pass condition changed"):
        check_old_logps_condition(NewCondition)


def test_rollout_output_is_checked():
    from synapo_ext.trl._compat import ROLLOUT_FIELDS, check_rollout_output

    output = dict.fromkeys(ROLLOUT_FIELDS)
    check_rollout_output(output, expected_old_logps=False)
    check_rollout_output({**output, "old_per_token_logps": None}, expected_old_logps=True)
    with pytest.raises(RuntimeError, match="completion_mask"):
        check_rollout_output({k: v for k, v in output.items() if k != "completion_mask"}, expected_old_logps=False)
    with pytest.raises(RuntimeError, match="old-log-prob pass ran"):
        check_rollout_output({**output, "old_per_token_logps": None}, expected_old_logps=False)
    with pytest.raises(RuntimeError, match="old-log-prob pass did not run"):
        check_rollout_output(output, expected_old_logps=True)
