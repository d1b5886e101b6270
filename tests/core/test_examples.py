"""examples/advantages_demo.py runs and shows HVM's segments (it printed every response as one segment when the stage
left out the segment ids it was not asked for)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "advantages_demo.py"


def _demo():
    spec = importlib.util.spec_from_file_location("advantages_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("preset", "segmented"), [("synapo", True), ("ppo", False)])
def test_advantages_demo_prints_the_segments(preset, segmented, capsys):
    demo = _demo()
    demo.main(demo.Args(preset=preset))
    out = capsys.readouterr().out
    assert "segment 0:" in out and "metrics:" in out
    assert ("segment 1:" in out) == segmented
