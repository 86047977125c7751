"""Programmatic dependent launch (PDL, Hopper and later) for the fused-MoE kernels.

A kernel launched with PDL may be scheduled while the kernel before it on the stream is still
finishing, so its launch latency and block scheduling hide behind that kernel's tail (a few
microseconds a launch: a decode layer of small experts is ~25 us in 3-4 launches). Each such
kernel starts with `pdl_enter`: wait until the previous kernel has completed and its writes
are visible (griddepcontrol.wait), then let the next kernel be scheduled. Nothing is read before
the wait, so results, and their bits, are those of plain launches. Off in the Triton
interpreter, before compute capability 9.0, and where MOE_UVM_PDL=0."""

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _supported(device_index: int) -> bool:
    if os.environ.get("MOE_UVM_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    cuda_extra = getattr(getattr(tl, "extra", None), "cuda", None)
    if not hasattr(cuda_extra, "gdc_wait"):
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_launch(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch on `device`: PDL=True plus launch_pdl where
    programmatic dependent launch is used, else PDL=False."""
    if device.type != "cuda" or not _supported(device.index or 0):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}
