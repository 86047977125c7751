"""Fused-MoE kernels of one Qwen3-30B-A3B-shaped layer (bf16, weights in device memory), eager
launches for a kernel profiler: each T and config below runs 3 times. Usage, on a GPU machine:
    ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
        python3 scripts/profile_moe_kernels.py [T ...]
Configs: this GPU's table entry and, at T=1, the two-launch rule (default_decode_config)."""

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from fused_moe import SHAPES, device_tables, device_weights, routing  # noqa: E402

from moe_uvm.kernels.fused_moe import fused_moe_triton  # noqa: E402
from moe_uvm.kernels.fused_moe_configs import (  # noqa: E402
    default_decode_config,
    select_config,
    select_decode_config,
)

shape = SHAPES["qwen3-30b-a3b"]
e, k, h, i = (shape[n] for n in ("num_experts", "top_k", "hidden", "intermediate"))
weights = device_weights(shape)[:2]
generator = torch.Generator(device="cuda").manual_seed(0)
for t in [int(a) for a in sys.argv[1:]] or [1, 256]:
    x, topk_weights, topk_ids = routing(shape, t, generator)
    configs = [select_config(e, h, i, k, torch.bfloat16, t, device_tables())]
    if t == 1:
        configs = [select_decode_config(e, h, i, k, torch.bfloat16, device_tables()),
                   default_decode_config(e, h, i, k)]
    for config in configs:
        print(f"T={t}: {config}", flush=True)
        for _ in range(3):
            fused_moe_triton(x, *weights, topk_weights, topk_ids, config=config)
        torch.cuda.synchronize()
