"""The GRPOConfig feature table (synapo_ext/trl/features.py, docs/trl_features.md) cannot go stale: every field of the
installed GRPOConfig is classified, the tests it names exist, what it says is refused is refused, the doc is rendered
from it."""

from __future__ import annotations

import ast
import dataclasses
import os

import pytest

pytest.importorskip("trl")

from trl import GRPOConfig  # noqa: E402

from synapo_ext.trl import SynAPOConfig  # noqa: E402
from synapo_ext.trl.features import FEATURES, STATUSES, render_markdown  # noqa: E402

pytestmark = pytest.mark.trl

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(HERE, "..", "..", "docs", "trl_features.md")


def test_every_grpo_config_field_is_classified():
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    unclassified = sorted(fields - FEATURES.keys())
    assert not unclassified, (
        f"GRPOConfig fields with no row in synapo_ext/trl/features.py: {unclassified}; classify each (supported with "
        "a test / refused by SynAPOConfig / no effect, with why), then regenerate docs/trl_features.md"
    )
    assert not sorted(FEATURES.keys() - fields), "rows for fields GRPOConfig no longer has"


def _test_names() -> set[str]:
    names = set()
    for name in os.listdir(HERE):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(HERE, name)) as f:
                tree = ast.parse(f.read())
            names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return names


def test_rows_are_well_formed_and_name_existing_tests():
    existing = _test_names()
    for name, feature in FEATURES.items():
        assert feature.status in STATUSES, (name, feature.status)
        assert feature.note.strip(), name
        if feature.status in ("supported", "refused"):
            assert feature.tests, f"{name} is {feature.status} but names no test"
        missing = [t for t in feature.tests if t not in existing]
        assert not missing, f"{name} names tests that tests/trl does not have: {missing}"


@pytest.mark.parametrize("name", sorted(n for n, f in FEATURES.items() if f.status == "refused"))
def test_refused_fields_are_refused_by_name(name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        SynAPOConfig("out", use_cpu=True, report_to=[], **{name: FEATURES[name].refused_value})


def test_doc_is_the_rendered_table():
    with open(DOC) as f:
        assert f.read() == render_markdown(), (
            "docs/trl_features.md is stale: python -m synapo_ext.trl.features > docs/trl_features.md"
        )
