"""The README's TRL snippet runs as written (extracted from README.md, run in a fresh process on CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("trl")

pytestmark = pytest.mark.trl

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def trl_snippet() -> str:
    """The first ```python block of the README's TRL section."""
    with open(README) as f:
        text = f.read()
    section = re.search(r"^## TRL .*?(?=^## )", text, flags=re.S | re.M)
    assert section is not None, "README.md has no TRL section"
    block = re.search(r"```python\n(.*?)```", section.group(0), flags=re.S)
    assert block is not None, "the README's TRL section has no python block"
    return block.group(1)


def test_readme_trl_snippet_runs_as_written(tmp_path):
    code = trl_snippet()
    assert "SynAPOTrainer(" in code and "trainer.train()" in code
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "out" / "synapo" / "critic" / "model.safetensors").exists()
    assert "SynAPO value warm-up 2/2" in out.stderr  # the warm-up's own progress lines
