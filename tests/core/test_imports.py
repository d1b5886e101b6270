"""`synapo_ext.core` imports with torch alone (STYLE rule 1)."""

import subprocess
import sys

import pytest

HOSTS = ("verl", "trl", "transformers", "tokenizers", "accelerate")

PUBLIC = (
    "ea_gae_lambda",
    "compute_gae",
    "segment_ids",
    "boundary_table_from_tokenizer",
    "hvm_advantages",
    "HVMResult",
    "scvl_pairs",
    "scvl_loss",
    "scvl_group_stats",
)

BLOCKED = f"""
import sys
for name in {HOSTS!r}:
    sys.modules[name] = None  # any `import name` now raises ImportError
import synapo_ext.core as core
for name in {PUBLIC!r}:
    getattr(core, name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {HOSTS!r} and sys.modules[m] is not None)
assert not leaked, leaked
"""

UNBLOCKED = f"""
import sys
import synapo_ext.core
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {HOSTS!r})
assert not leaked, leaked
"""


@pytest.mark.parametrize("script", [BLOCKED, UNBLOCKED], ids=["hosts-blocked", "hosts-installed-but-unused"])
def test_core_imports_with_torch_alone(script):
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
