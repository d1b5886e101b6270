"""`synapo_ext.testing` imports with neither transformers, tokenizers nor a host: they load when a builder runs."""

import subprocess
import sys

BLOCKED = ("verl", "trl", "transformers", "tokenizers", "datasets", "accelerate")

SCRIPT = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # any `import name` now raises ImportError
import synapo_ext.testing as testing
assert callable(testing.char_tokenizer) and callable(testing.tiny_qwen2) and callable(testing.byte_bpe_tokenizer)
assert testing.DELIMITER == "\\n\\n"
try:
    testing.char_tokenizer("ab")
except ImportError as exc:
    assert "tokenizers" in str(exc) or "transformers" in str(exc), exc
else:
    raise AssertionError("a builder ran without tokenizers / transformers")
"""


def test_testing_module_imports_without_hosts():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
