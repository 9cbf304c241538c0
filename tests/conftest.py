"""Shared fixtures. Tiny random models come from eijax.testing (a top-level `tests` package
shipped by a dependency shadows `tests.*` imports, so helpers live in the package)."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from eijax.testing import FAMILIES


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
