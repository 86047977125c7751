"""Where a whole-model decode step's GPU time goes: loads a Qwen3-30B-A3B-shaped model with
random weights (a few layers), all experts in the budget, and prints the CUDA kernels of a few
eager static-cache decode steps (torch.profiler), summed by kernel name, and the graph-replay
step time. Usage: python scripts/profile_decode.py [layers] [budget_percent]"""

import json
import pathlib
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from generate import SHAPES  # noqa: E402

from moe_uvm.config import ExpertOffloadConfig  # noqa: E402
from moe_uvm.decode import StaticDecoder  # noqa: E402
from moe_uvm.generate import load_model  # noqa: E402
from moe_uvm.integrations.hf_shape import describe  # noqa: E402

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
percent = float(sys.argv[2]) if len(sys.argv) > 2 else 100
folder = pathlib.Path(tempfile.mkdtemp())
(folder / "config.json").write_text(json.dumps({**SHAPES["qwen3-30b-a3b"],
                                                "num_hidden_layers": layers}))
info = describe(folder)
expert = info.shape.num_moe_layers * info.shape.num_experts * info.shape.bytes_per_expert
budget = (info.non_expert_bytes + info.kv_bytes_per_token * 128 + percent / 100 * expert) / 1e9
loaded = load_model(folder, ExpertOffloadConfig(gpu_budget_gb=budget), random_weights=0,
                    device="cuda", kv_tokens=128)
model = loaded.model
ids = torch.randint(0, 1000, (1, 32))
for graphs in (True, False):
    dec = StaticDecoder(model, max_len=128, graphs=graphs)
    dec.generate(ids, max_new_tokens=64)
    start, first, end = dec.times
    print(f"graphs={graphs}: {(end - first) / 63 * 1e3:.3f} ms per step ({layers} layers)")
dec = StaticDecoder(model, max_len=128, graphs=False)
dec.generate(ids, max_new_tokens=8)
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    dec.generate(ids, max_new_tokens=9)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70))
