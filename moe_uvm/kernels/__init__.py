"""Triton kernels and their plain-torch references."""

from .fused_moe import fused_moe
from .reference import fused_moe_reference
from .slot_copy import copy_experts_to_slots, copy_experts_to_slots_reference
from .slot_plan import plan_fill_fused, plan_prefetch_fused

__all__ = [
    "copy_experts_to_slots",
    "copy_experts_to_slots_reference",
    "fused_moe",
    "fused_moe_reference",
    "plan_fill_fused",
    "plan_prefetch_fused",
]
