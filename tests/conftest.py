"""Test setup: GPU tests skip cleanly without CUDA; on CPU, Triton kernels run in the
interpreter."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# The interpreter must be chosen before any @triton.jit runs (it is read at decoration time).
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    """A fresh seed per test run, printed on failure, so inputs are random but reproducible."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value
