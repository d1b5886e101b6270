"""Fixtures for the core tests.

The hypothesis settings (`DEFAULT`: 200 examples per property; `SLOW`: 1000, under the `slow` marker) and the case
strategies live in `strategies.py`; the float64 plain-loop oracle lives in `reference.py`.
"""

import os

import pytest
import torch
from hypothesis import settings

# `HYPOTHESIS_PROFILE=ci` runs without the local example database and prints a reproduction blob on failure.
settings.register_profile("ci", database=None, print_blob=True)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator, so every non-hypothesis case is reproducible."""
    return torch.Generator().manual_seed(1234)
