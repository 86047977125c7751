"""Argument checks of the fused-MoE launcher: shapes, dtypes, strides, devices and slot arguments,
each refused with what was wrong and what is allowed, before any launch."""

import torch

from .fp8 import FP8_DTYPE, check_scales

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ID_DTYPES = (torch.int32, torch.int64)


def _check_expert_matrix(name: str, w: torch.Tensor, shape: tuple[int, int],
                         dtype: torch.dtype) -> None:
    if w.dim() != 3 or tuple(w.shape[1:]) != shape:
        raise ValueError(f"{name} has shape {tuple(w.shape)}: expected [*, {shape[0]}, {shape[1]}]")
    if w.dtype != dtype:
        raise ValueError(f"{name} has dtype {w.dtype}: expected {dtype} (hidden_states' dtype, "
                         f"or {FP8_DTYPE} with scales)")
    if w.stride(2) != 1 or w.stride(1) != shape[1]:
        raise ValueError(f"{name} has strides {w.stride()}: dims 1 and 2 must be contiguous "
                         f"(stride(1)={shape[1]}, stride(2)=1); dim 0 may be any stride")


def _check_slot_args(num_experts, intermediate, hidden, dtype, expert_slot, w13_slots, w2_slots,
                     fill_slot) -> None:
    maps = {"expert_slot": expert_slot, "fill_slot": fill_slot}
    pools = {"w13_slots": w13_slots, "w2_slots": w2_slots}
    given = [name for name, t in {**maps, **pools}.items() if t is not None]
    if any(t is not None for t in maps.values()) != all(t is not None for t in pools.values()):
        raise ValueError("expert_slot and fill_slot each need both w13_slots and w2_slots, and "
                         f"the pools need one of them: got {', '.join(given) or 'none'}")
    for name, t in maps.items():
        if t is not None and (t.dtype != torch.int32 or tuple(t.shape) != (num_experts,)
                              or not t.is_contiguous()):
            raise ValueError(f"{name} is {t.dtype} of shape {tuple(t.shape)}: expected a "
                             f"contiguous int32 [{num_experts}]")
    if w13_slots is not None:
        _check_expert_matrix("w13_slots", w13_slots, (2 * intermediate, hidden), dtype)
        _check_expert_matrix("w2_slots", w2_slots, (hidden, intermediate), dtype)
        if w2_slots.shape[0] != w13_slots.shape[0]:
            raise ValueError(f"w2_slots has {w2_slots.shape[0]} slots, w13_slots has "
                             f"{w13_slots.shape[0]}: must match")


def _check_same_device(hidden_states: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    # The kernels take raw pointers: a tensor on another device would be read at an address
    # that means nothing there (garbage, or an illegal access that ends the CUDA context).
    for name, t in tensors.items():
        if t is not None and t.device != hidden_states.device:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on "
                             f"{hidden_states.device}: they must be on the same device")


def check_inputs(hidden_states, w13, w2, topk_weights, topk_ids, expert_slot, w13_slots,
                  w2_slots, fill_slot, w13_scale=None, w2_scale=None, block_shape=None,
                  first_col=None) -> None:
    if hidden_states.dim() != 2 or hidden_states.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden_states is {hidden_states.dtype} of shape "
                         f"{tuple(hidden_states.shape)}: expected [T, H] in bf16, fp16 or fp32")
    num_tokens, hidden = hidden_states.shape
    if w13.dim() != 3 or w13.shape[1] % 2:
        raise ValueError(f"w13 has shape {tuple(w13.shape)}: expected [E, 2I, H]")
    intermediate = w13.shape[1] // 2
    check_scales(w13, w2, w13_scale, w2_scale, block_shape, hidden_states.device)
    weight_dtype = FP8_DTYPE if w13.dtype == FP8_DTYPE else hidden_states.dtype
    _check_expert_matrix("w13", w13, (2 * intermediate, hidden), weight_dtype)
    _check_expert_matrix("w2", w2, (hidden, intermediate), weight_dtype)
    if w2.shape[0] != w13.shape[0]:
        raise ValueError(f"w2 has {w2.shape[0]} experts, w13 has {w13.shape[0]}: must match")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.dtype not in _ID_DTYPES:
        raise ValueError(f"topk_ids is {topk_ids.dtype} of shape {tuple(topk_ids.shape)}: "
                         f"expected int32 or int64 [{num_tokens}, k]")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights has shape {tuple(topk_weights.shape)}: must equal "
                         f"topk_ids' {tuple(topk_ids.shape)}")
    _check_same_device(hidden_states, topk_ids=topk_ids, topk_weights=topk_weights,
                       expert_slot=expert_slot, fill_slot=fill_slot, first_col=first_col)
    if first_col is not None:
        if (first_col.dtype != torch.int32 or tuple(first_col.shape) != (w13.shape[0],)
                or not first_col.is_contiguous()):
            raise ValueError(f"first_col is {first_col.dtype} of shape {tuple(first_col.shape)}: "
                             f"expected a contiguous int32 [{w13.shape[0]}]")
        if fill_slot is not None:
            raise ValueError("first_col cannot go with fill_slot: a slot would be filled in part")
    _check_slot_args(w13.shape[0], intermediate, hidden, weight_dtype, expert_slot,
                     w13_slots, w2_slots, fill_slot)
