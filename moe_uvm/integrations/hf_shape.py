"""What a Hugging Face MoE checkpoint's config implies for planning, without loading a weight:
the routed experts' shape, the bytes of everything else, and the KV cache per token. The model
is built on the meta device (no memory) and measured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_uvm.integrations.hf_blocks import family_of, find_moe_blocks
from moe_uvm.integrations.hf_load import checkpoint_fp8_block, parameters_on_meta
from moe_uvm.presets import ModelShape


@dataclass(frozen=True)
class ModelInfo:
    """shape: the routed experts (ModelShape); non_expert_bytes: every other weight on the
    device; embedding_bytes: the input embedding among them (a decode step reads only its rows,
    unless it is tied to the output head); kv_bytes_per_token: the KV cache of one token over
    all layers; buffer_bytes: the computed buffers (rotary tables) the loader also puts there."""

    shape: ModelShape
    non_expert_bytes: int
    embedding_bytes: int
    kv_bytes_per_token: int
    buffer_bytes: int = 0

    def fixed_bytes(self, kv_tokens: int = 0) -> int:
        """What a load takes out of gpu_budget_gb before the experts' share: non-expert weights,
        computed buffers, the routing counters and a KV cache of `kv_tokens` tokens (batch x
        context). A budget of this + X% of the expert bytes is the benchmarks' X% budget."""
        from moe_uvm.memory import routing_counters_nbytes

        return (self.non_expert_bytes + self.buffer_bytes + self.kv_bytes_per_token * kv_tokens
                + routing_counters_nbytes(self.shape.num_moe_layers, self.shape.num_experts))

    @property
    def step_read_bytes(self) -> int:
        """Non-expert bytes one decode step reads: all but an untied input embedding."""
        return self.non_expert_bytes - self.embedding_bytes


def kv_bytes_per_token(config, num_layers: int, dtype: torch.dtype) -> int:
    """K and V of one token over `num_layers` layers, as transformers caches them: with MLA
    (DeepSeek) the decompressed per-head keys (nope + rope dims) and values."""
    size = torch.empty((), dtype=dtype).element_size()
    heads = config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):
        k = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
        v = heads * config.v_head_dim
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        k = v = getattr(config, "num_key_value_heads", heads) * head_dim
    return (k + v) * num_layers * size


def describe(model_dir: str | Path, dtype: torch.dtype | None = None,
             quantize_experts: str | None = None) -> ModelInfo:
    """The ModelInfo of the checkpoint (or bare config.json) in `model_dir`, at `dtype` (default
    the config's, bf16 if it names none). Experts count one byte per weight in an FP8
    checkpoint or with quantize_experts="fp8" (their block scales, under 0.1%, are left out);
    other FP8 weights are counted at `dtype`, as the loader dequantises them."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (give a local checkpoint folder)")
    config = AutoConfig.from_pretrained(path)
    family_of(config.model_type)  # an unsupported model is refused by name
    fp8_experts = checkpoint_fp8_block(config, path) is not None or quantize_experts == "fp8"
    dtype = dtype or getattr(config, "dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks = find_moe_blocks(model)
    E, H, I = blocks[0].shape
    experts = {id(p) for b in blocks for p in b.module.experts.parameters()}
    size = torch.empty((), dtype=dtype).element_size()
    params = {id(p): p for p in model.parameters()}  # tied weights once
    non_expert = sum(p.numel() for i, p in params.items() if i not in experts) * size
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embed
    top_k = (getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", None)
             or getattr(config, "moe_topk", None))
    layers = config.num_hidden_layers
    shared = getattr(config, "n_shared_experts", None) or 0
    shape = ModelShape(f"{config.model_type} ({path.name})", layers, len(blocks), E, top_k, H, I,
                       shared, 1 if fp8_experts else size)
    # the computed (non-persistent) buffers of non-expert modules, as the loader counts them
    expert_modules = {id(b.module.experts) for b in blocks}
    buffers = {id(b): b for m in model.modules() if id(m) not in expert_modules
               for name, b in m._buffers.items()
               if name in m._non_persistent_buffers_set and b is not None}
    return ModelInfo(shape, non_expert, 0 if tied else embed.numel() * size,
                     kv_bytes_per_token(config, layers, dtype),
                     sum(b.nbytes for b in buffers.values()))
