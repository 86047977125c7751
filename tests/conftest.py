"""Test setup: GPU tests skip cleanly without CUDA; on CPU, Triton kernels run in the
interpreter."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# The interpreter must be chosen before any @triton.jit runs (it is read at decoration time).
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# kernels/ and policies/ become moe_uvm.kernels / moe_uvm.policies only through the install's
# package-dir mapping. `python -m pytest` puts the checkout first on sys.path, so with a
# non-editable install the checkout's moe_uvm/ (which has neither) shadows the installed one.
try:
    import moe_uvm.kernels  # noqa: F401
    import moe_uvm.policies  # noqa: F401
except ModuleNotFoundError as exc:
    if not exc.name or not exc.name.startswith("moe_uvm"):
        raise
    raise pytest.UsageError(
        f"{exc.name} is not importable: the tests need the package installed in editable mode "
        "from this checkout: pip install -e '.[test]'"
    ) from exc


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
