"""Builders and measures shared by the test modules: random MoE layers and models, fused-MoE
inputs and the store's strided layout, tiny transformers models of every supported family."""

import torch
from torch import nn

from moe_uvm.kernels.fused_moe_configs import MoeDecodeConfig
from moe_uvm.layer import FusedMoE

# fp32: only summation order differs. fp16: inputs and the SiLU-and-mul activation are rounded
# to fp16 (the reference keeps fp32); bf16 has 3 fewer mantissa bits.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# One-token path: small explicit tiles so K loops run several steps and K/N edges are masked.
SMALL_DECODE = MoeDecodeConfig(gate_up_block_n=4, gate_up_block_k=32, down_block_n=8,
                               down_block_k=16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in fp32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def store_layout(w13: torch.Tensor, w2: torch.Tensor, device=None, pin=False):
    """Copies of w13/w2 laid out as the expert store does: w13[e] then w2[e] back to back in one
    slot per expert, slots padded (here to 512 elements plus a gap), so stride(0) > dense size."""
    num_experts, two_i, hidden = w13.shape
    intermediate = w2.shape[2]
    dense = two_i * hidden + hidden * intermediate
    slot = (dense + 64 + 511) // 512 * 512
    flat = torch.empty(num_experts * slot, dtype=w13.dtype, device=device or w13.device,
                       pin_memory=pin)
    strided13 = flat.as_strided(w13.shape, (slot, hidden, 1))
    strided2 = flat.as_strided(w2.shape, (slot, intermediate, 1), two_i * hidden)
    strided13.copy_(w13)
    strided2.copy_(w2)
    return strided13, strided2


def make_routing(num_tokens, num_experts, top_k, hidden, dtype, device=DEVICE):
    """Activations ~ N(0, 1) and softmax-top-k routing (distinct experts per token, int64)."""
    x = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
    logits = torch.randn(num_tokens, num_experts, device=device)
    topk_weights, topk_ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return x, topk_weights, topk_ids


def make_inputs(num_tokens, num_experts, top_k, hidden, intermediate, dtype, device=DEVICE):
    """Routing plus weights scaled so every stage stays O(1), drawn in `dtype` (no fp32 copy)."""
    x, topk_weights, topk_ids = make_routing(num_tokens, num_experts, top_k, hidden, dtype, device)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, device=device, dtype=dtype)
    w2 = torch.randn(num_experts, hidden, intermediate, device=device, dtype=dtype)
    return x, w13.mul_(hidden**-0.5), w2.mul_(intermediate**-0.5), topk_weights, topk_ids


def random_moe(E=8, k=2, H=32, I=16, dtype=torch.float32, device="cpu", renormalize=True):
    moe = FusedMoE(E, k, H, I, renormalize=renormalize, dtype=dtype, device=device)
    with torch.no_grad():
        moe.w13_weight.normal_(0, H**-0.5)
        moe.w2_weight.normal_(0, I**-0.5)
    return moe


class TinyMoEModel(nn.Module):
    """Residual stack of router + FusedMoE blocks: the shape of a decode step's MoE part."""

    def __init__(self, layers=3, E=8, k=2, H=32, I=16, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.gates = nn.ModuleList(
            nn.Linear(H, E, bias=False, dtype=dtype, device=device) for _ in range(layers)
        )
        self.moes = nn.ModuleList(random_moe(E, k, H, I, dtype, device) for _ in range(layers))

    def forward(self, h):
        for gate, moe in zip(self.gates, self.moes, strict=True):
            h = h + moe(h, gate(h))
        return h


COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, bos_token_id=1,
    eos_token_id=2,
)
# One tiny config per family, each with two MoE layers; the DeepSeek ones put a dense MLP first
# (first_k_dense_replace) and use grouped routing, V3 with its sigmoid + correction-bias router.
DEEPSEEK = dict(
    num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=48, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
    qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=4, topk_group=2,
)
FAMILY_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
        shared_expert_intermediate_size=64, norm_topk_prob=True,
    ),
    "qwen3_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=8,
        tie_word_embeddings=True,
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(DEEPSEEK, q_lora_rank=None, topk_method="group_limited_greedy"),
    "deepseek_v3": dict(DEEPSEEK, q_lora_rank=16, routed_scaling_factor=2.5),
}
def tiny_model(model_type: str, seed: int, **overrides) -> torch.nn.Module:
    """A random-weight model: norms near 1, every other weight N(0, 0.2^2) (large enough that
    the routed experts move the logits), DeepSeek-V3's correction bias random too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**COMMON, **FAMILY_CONFIGS[model_type], **overrides}
    config = AutoConfig.for_model(model_type, **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def routed(num_tokens, experts, k=2):
    """topk_ids [num_tokens, k] (int32) where the tokens pick from `experts` round robin."""
    ids = torch.tensor(experts, dtype=torch.int32)
    pos = torch.arange(num_tokens * k) % len(experts)
    return ids[pos].view(num_tokens, k)


def feed(manager, ids):
    """Record the same routing at every layer of a manager, as one step would."""
    for layer in range(manager.num_layers):
        manager.record(layer, ids)


KERNEL_MODULES = ("fused_moe", "slot_plan", "slot_copy", "expert_ids")


def use_reference_kernels(patch) -> None:
    """On CPU, run the plain-torch references instead of the Triton interpreter (whole models
    take minutes per token there; the kernels are checked against these references in their
    own tests). `patch`: a pytest MonkeyPatch."""
    import importlib

    for name in KERNEL_MODULES:
        patch.setattr(importlib.import_module(f"moe_uvm.kernels.{name}"), "_INTERPRETED", False)


def tiny_checkpoint():
    """The trained tiny Qwen3-MoE checkpoint: the workspace's shared copy, else a git-ignored
    copy under local/ (what the GPU machine gets through the device tool's carry); None when
    neither is there."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    for path in (root.parent / "shared" / "models" / "tiny-qwen3moe-bytes",
                 root / "local" / "models" / "tiny-qwen3moe-bytes"):
        if (path / "config.json").is_file():
            return path
    return None
