"""Widening e4m3 weights to the activations' dtype inside the fused-MoE kernels.

Triton converts e4m3 to bf16 with three conversion instructions per pair of values (e4m3x2 to
f16x2, then f16 to bf16 twice). Conversions issue at a fraction of the ALU rate, and on the H200
they, not HBM, bounded the FP8 kernels: Qwen3-30B-A3B at T=1 took 33.8 us for 37.7 MB of FP8
experts, longer than the same experts in bf16 (27.6 us for twice the bytes). `widen_bf16` does
the same widening with integer ops: four values a time, each placed in the high byte of a 16-bit
lane, sign kept and the 7 exponent-and-mantissa bits shifted into bf16's fields, which gives the
value times 2^-120 (bias 127 against 7; e4m3 subnormals land on bf16 subnormals), then one
bf16x2 FMA by 2^120 (exact) per pair. Every finite e4m3 value maps to the same bf16 as
`.to(tl.bfloat16)` (a GPU test checks all 254); the two NaN codes read as +-480, which no
quantised weight holds. Used where activations are bf16 on a CUDA GPU of compute capability
>= 8.0; fp16 activations keep Triton's conversion (one instruction per pair), and the Triton
interpreter (no inline asm) always does."""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def widen_bf16(w):
    """e4m3 tensor -> bf16, exactly for finite values (see the module docstring)."""
    # The asm is a literal here: jitted code reads no module-level strings. $2 holds four e4m3
    # values; prmt puts values 0, 1 (2, 3) in the high bytes of a0's (a1's) 16-bit lanes; the
    # lop3 is m | (0x80008000 & a): magnitude bits shifted into place, sign kept. $0 and $1
    # get the values as two bf16 pairs.
    return tl.inline_asm_elementwise(
        """
        {
        .reg .b32 a<2>, m<2>, e, z;
        prmt.b32 a0, 0, $2, 0x5140;
        prmt.b32 a1, 0, $2, 0x7362;
        and.b32 m0, a0, 0x7f007f00;
        and.b32 m1, a1, 0x7f007f00;
        shr.b32 m0, m0, 4;
        shr.b32 m1, m1, 4;
        lop3.b32 a0, m0, 0x80008000, a0, 0xf8;
        lop3.b32 a1, m1, 0x80008000, a1, 0xf8;
        mov.b32 e, 0x7b807b80;
        mov.b32 z, 0x80008000;
        fma.rn.bf16x2 $0, a0, e, z;
        fma.rn.bf16x2 $1, a1, e, z;
        }
        """,
        "=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16, is_pure=True, pack=4)


def alu_widen_applies(activation_dtype, device) -> bool:
    """Whether the kernels widen e4m3 with widen_bf16: bf16 activations on a CUDA GPU of compute
    capability >= 8.0 (bf16x2 FMA), outside the Triton interpreter."""
    if activation_dtype != torch.bfloat16 or device.type != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET") == "1" or not _ALU_ENABLED[0]:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


# Benchmarks flip this to time Triton's conversion against widen_bf16 in one process.
_ALU_ENABLED = [True]


def set_alu_widen(enabled: bool) -> None:
    """Turn widen_bf16 on or off for later launches (for A/B timing; on by default)."""
    _ALU_ENABLED[0] = bool(enabled)
