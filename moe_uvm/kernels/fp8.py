"""FP8 (e4m3) expert weights: the scale layouts the kernels read, quantisation (for tests and
quantise-at-load) and dequantisation (the reference), and the checks of both.

Two layouts, as FP8 MoE checkpoints ship them:
- block scales, `block_shape=(bn, bk)` (DeepSeek-V3, Qwen3-FP8: 128 x 128): one fp32 scale per
  bn x bk block of each matrix; w13_scale [E, 2*ceil(I/bn), ceil(H/bk)] holds w1's block rows
  then w3's (the checkpoint's weight_scale_inv of gate_proj and up_proj, stacked), w2_scale
  [E, ceil(H/bn), ceil(I/bk)];
- per-output-channel scales (`block_shape=None`): w13_scale [E, 2I], w2_scale [E, H].
A weight's value is `fp8 * scale` (scale = amax / 448 when quantised here)."""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def scale_shape(num_experts: int, rows: int, cols: int, block_shape: tuple[int, int] | None,
                halves: int = 1) -> tuple[int, ...]:
    """Scale tensor shape of [E, rows, cols] weights made of `halves` stacked matrices (2 for
    w13: w1 then w3, each rows/2 rows)."""
    if block_shape is None:
        return (num_experts, rows)
    bn, bk = block_shape
    return (num_experts, halves * math.ceil(rows // halves / bn), math.ceil(cols / bk))


def _expand(scale: torch.Tensor, rows: int, cols: int, block_shape, halves: int) -> torch.Tensor:
    """[E, rows, cols] fp32 scale of every weight element."""
    if block_shape is None:
        return scale.float()[:, :, None].expand(-1, rows, cols)
    bn, bk = block_shape
    half = rows // halves
    per_half = math.ceil(half / bn)
    parts = []
    for h in range(halves):
        s = scale[:, h * per_half:(h + 1) * per_half].float()
        s = s.repeat_interleave(bn, dim=1)[:, :half].repeat_interleave(bk, dim=2)[:, :, :cols]
        parts.append(s)
    return torch.cat(parts, dim=1)


def dequantize(w: torch.Tensor, scale: torch.Tensor, block_shape=None,
               halves: int = 1) -> torch.Tensor:
    """fp32 values of FP8 weights [E, rows, cols] (any stride on dim 0)."""
    _, rows, cols = w.shape
    return w.float() * _expand(scale, rows, cols, block_shape, halves)


def quantize(w: torch.Tensor, block_shape: tuple[int, int] | None = None,
             halves: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weights, fp32 scales) of [E, rows, cols] weights: each block (or output row)
    scaled so its largest magnitude maps to 448, rounded to nearest. All-zero blocks get
    scale 1."""
    num_experts, rows, cols = w.shape
    x = w.float()
    if block_shape is None:
        amax = x.abs().amax(dim=2)
    else:
        bn, bk = block_shape
        half = rows // halves
        amaxes = []
        for h in range(halves):
            part = x[:, h * half:(h + 1) * half]
            pad_r, pad_c = -half % bn, -cols % bk
            part = torch.nn.functional.pad(part.abs(), (0, pad_c, 0, pad_r))
            blocks = part.view(num_experts, part.shape[1] // bn, bn, part.shape[2] // bk, bk)
            amaxes.append(blocks.amax(dim=(2, 4)))
        amax = torch.cat(amaxes, dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x / _expand(scale, rows, cols, block_shape, halves)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE), scale.contiguous()


def check_block_shape(block_shape) -> tuple[int, int] | None:
    if block_shape is None:
        return None
    try:
        bn, bk = (int(v) for v in block_shape)
    except (TypeError, ValueError):
        raise ValueError(f"block_shape={block_shape!r}: expected two ints (bn, bk), e.g. "
                         f"(128, 128), or None for per-output-channel scales") from None
    for name, v in (("bn", bn), ("bk", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"block_shape={block_shape!r}: {name}={v} must be a power of two "
                             f">= 16")
    return bn, bk


def check_scales(w13: torch.Tensor, w2: torch.Tensor, w13_scale, w2_scale, block_shape,
                 device: torch.device) -> None:
    """FP8 weights need both scales, in the layout of block_shape; other weights take none."""
    fp8 = w13.dtype == FP8_DTYPE or w2.dtype == FP8_DTYPE
    given = (w13_scale is not None, w2_scale is not None)
    if not fp8:
        if any(given) or block_shape is not None:
            raise ValueError(f"w13_scale/w2_scale/block_shape are for FP8 (e4m3) weights; "
                             f"w13 is {w13.dtype}, w2 {w2.dtype}")
        return
    if w13.dtype != w2.dtype:
        raise ValueError(f"w13 is {w13.dtype} and w2 {w2.dtype}: FP8 weights must both be "
                         f"{FP8_DTYPE}")
    if not all(given):
        raise ValueError("FP8 weights need w13_scale and w2_scale (fp32; block_shape=(bn, bk) "
                         "for block scales, None for one scale per output channel)")
    block_shape = check_block_shape(block_shape)
    num_experts, two_i, hidden = w13.shape
    for name, scale, (rows, cols), halves in (("w13_scale", w13_scale, (two_i, hidden), 2),
                                               ("w2_scale", w2_scale, (hidden, two_i // 2), 1)):
        expected = scale_shape(num_experts, rows, cols, block_shape, halves)
        if scale.dtype != torch.float32 or tuple(scale.shape) != expected:
            raise ValueError(f"{name} is {scale.dtype} of shape {tuple(scale.shape)}: expected "
                             f"float32 {list(expected)} for block_shape={block_shape}")
        if scale.device != device:
            raise ValueError(f"{name} is on {scale.device} but hidden_states is on {device}: "
                             "scales stay on the compute device")
