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


def test_kernels_and_policies_import_from_the_checkout_without_the_install_mapping():
    """`python -m pytest` from the checkout imports moe_uvm/ from there, ahead of any install;
    with a non-editable install (or none) the mapping must still hold."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(moe_uvm.__file__).resolve().parent.parent
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]\n"
        "sys.path_importer_cache.clear()\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "import moe_uvm.kernels, moe_uvm.policies\n"
        "print(moe_uvm.kernels.__file__, moe_uvm.policies.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kernels, policies = out.stdout.split()
    assert pathlib.Path(kernels).parent.parent == root / "moe_uvm"
    assert pathlib.Path(policies).parent.parent == root / "moe_uvm"


def test_the_checkout_shadows_no_top_level_package():
    """With the checkout first on sys.path (`python -m pytest`), `import kernels` must not find
    ours: transformers imports the Hugging Face package of that name when it is installed."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(moe_uvm.__file__).resolve().parent.parent
    code = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "for name in ('kernels', 'policies'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(spec.origin if spec and spec.origin else '-')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for origin in out.stdout.split():
        assert not origin.startswith(str(root) + "/"), origin
