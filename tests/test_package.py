"""The package's top-level names: lazily imported, each the object of its home module."""

import importlib

import pytest

import moe_uvm


def test_every_export_is_its_modules_object():
    for name, module in moe_uvm._EXPORTS.items():
        assert getattr(moe_uvm, name) is getattr(importlib.import_module(module), name)
    assert set(moe_uvm.__all__) == {"__version__", *moe_uvm._EXPORTS}


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'fused_moe_v2'"):
        moe_uvm.fused_moe_v2  # noqa: B018


def test_kernels_and_policies_install_under_the_package():
    from moe_uvm.kernels import fused_moe, fused_moe_reference
    from moe_uvm.policies import residency

    assert callable(fused_moe) and callable(fused_moe_reference)
    assert hasattr(residency, "first_n")
