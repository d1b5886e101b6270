"""docs/parameters.md is what `python -m synapo_ext.params_doc` writes from the code (no host library needed)."""

import dataclasses

from synapo_ext import params_doc
from synapo_ext.core import PRESETS, SynAPOParams


def test_the_parameter_doc_matches_the_code():
    with open(params_doc.PATH) as f:
        written = f.read()
    assert written == params_doc.markdown(), "docs/parameters.md is stale: run `python -m synapo_ext.params_doc`"


def test_every_parameter_and_preset_has_its_row():
    text = params_doc.markdown()
    for f in dataclasses.fields(SynAPOParams):
        assert f"| `{f.name}` |" in text and f"`+algorithm.synapo.{f.name}`" in text
    assert all(preset in text for preset in PRESETS)
    # what a parameter sets on verl, in the user's terms
    assert "sets `trainer.critic_warmup` = value_warmup_steps + 1" in text
