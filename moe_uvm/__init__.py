"""moe-uvm: MoE expert weights in CUDA managed memory; residency is advice, compute on the GPU.

The names most code needs are importable from the package itself (loaded on first use, so
`import moe_uvm` stays cheap):

    from moe_uvm import ExpertOffloadConfig, FusedMoE, offload_experts
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ExpertOffloadConfig": "moe_uvm.config",
    "ExpertOffloadManager": "moe_uvm.manager",
    "ReadviseError": "moe_uvm.manager",
    "FusedMoE": "moe_uvm.layer",
    "find_moe_layers": "moe_uvm.offload",
    "offload_experts": "moe_uvm.offload",
    "DenseOffloadConfig": "moe_uvm.dense",
    "DenseOffloader": "moe_uvm.dense",
    "UVMError": "moe_uvm.uvm",
    "OversubscriptionError": "moe_uvm.uvm",
    "Profile": "moe_uvm.profile",
    "load_profile": "moe_uvm.profile",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moe_uvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
