"""pytest set-up for every test: one thread and a fixed seed. Shared helpers live in helpers.py (import from there,
never from this file)."""

import pytest
import torch

import modeling_deberta_custom  # noqa: F401  (registers the Auto classes)

# The test models are tiny: one thread avoids thread start-up and contention costs that dominate at this size.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
