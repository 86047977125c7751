"""Test setup: GPU tests skip cleanly without CUDA; on CPU, Triton kernels run in the
interpreter."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# The interpreter must be chosen before any @triton.jit runs (it is read at decoration time).
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_breaks_on_this_numpy() -> str | None:
    """triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"); 3.8 and 3.9 are fine."""
    import numpy
    import triton

    triton_v = tuple(int(p) for p in triton.__version__.split(".")[:2])
    numpy_v = tuple(int(p) for p in numpy.__version__.split(".")[:2])
    if os.environ.get("TRITON_INTERPRET") == "1" and triton_v < (3, 7) and numpy_v >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter (used by the CPU tests) fails with "
                f"numpy {numpy.__version__}: install numpy<2.4 or triton>=3.8")
    return None


if (_problem := _interpreter_breaks_on_this_numpy()) is not None:
    raise pytest.UsageError(_problem)


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
