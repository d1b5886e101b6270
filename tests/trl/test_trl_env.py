"""The TRL environment: TRL 1.16 imports beside torch and `synapo_ext.core` (the adapter tests come later)."""

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
