"""`synapo_ext.testing`'s builders under verl's transformers, <5.11 (the checks: tests/builder_checks.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("verl")

from tests.builder_checks import (  # noqa: E402, F401  (collected here)
    test_byte_bpe_tokenizer_round_trip,
    test_char_tokenizer_ids_and_round_trip,
    test_char_tokenizer_refuses_bad_arguments,
    test_tiny_qwen2_is_seeded_and_round_trips,
)

pytestmark = pytest.mark.verl
