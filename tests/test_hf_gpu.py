"""The transformers integration on the GPU: experts in managed memory, a streaming load that never
passes expert weights through the device allocator, and residency that changes no output bit."""

import gc

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from moe_uvm.config import ExpertOffloadConfig  # noqa: E402
from moe_uvm.integrations import hf  # noqa: E402

pytestmark = pytest.mark.gpu

# Qwen3-MoE layout at a few MB per layer: 32 experts of 3 x 256 x 256 (393 KB, one 2 MiB slot
# each), so experts (2 x 32 x 2 MiB of slots) outweigh everything else.
SHAPE = dict(
    hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32,
    num_experts_per_tok=4, norm_topk_prob=True, vocab_size=1024, max_position_embeddings=256,
)


def random_model(dtype: torch.dtype, device: str) -> torch.nn.Module:
    config = AutoConfig.for_model("qwen3_moe", **SHAPE)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # The reference is transformers' per-expert loop (its grouped_mm path varies by torch/dtype).
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def release(manager) -> None:
    """Free the managed stores now (call once the model using them is unreachable)."""
    gc.collect()
    for store in manager.stores:
        store.free()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-moe-bf16")
    torch.manual_seed(0)
    model = random_model(torch.bfloat16, "cpu")
    model.save_pretrained(path, max_shard_size="4MB")
    return path


def test_streaming_load_keeps_expert_weights_out_of_the_device_allocator(bf16_checkpoint):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loaded = hf.load_offloaded(bf16_checkpoint, ExpertOffloadConfig(num_resident=8))
    loaded.manager.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    dense = sum(p.nbytes for n, p in loaded.model.named_parameters() if ".experts.moe." not in n)
    dense += sum(b.nbytes for b in loaded.model.buffers())
    manager = loaded.manager
    experts = sum(s.nbytes for s in manager.stores)
    assert manager.is_managed
    assert manager.resident_ids(0) == tuple(range(8))
    del loaded
    # Dense tensors are allocated one by one (block rounding and small bookkeeping stay far
    # below one layer's experts, 12.6 MB here); expert bytes only ever land in the stores.
    assert peak <= dense + 2**20, (peak, dense, experts)
    assert experts > 4 * dense
    release(manager)


def test_quarter_resident_generates_the_same_bits_as_all_resident(bf16_checkpoint):
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 12), device="cuda")
    results = []
    for resident in (-1, 8):
        loaded = hf.load_offloaded(bf16_checkpoint, ExpertOffloadConfig(num_resident=resident))
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
            do_sample=False, pad_token_id=0,
        )
        with torch.no_grad():
            logits = loaded.model(out).logits
        results.append((out, logits))
        manager = loaded.manager
        del loaded
        release(manager)
    (ids_all, logits_all), (ids_quarter, logits_quarter) = results
    assert torch.equal(ids_all, ids_quarter)
    assert torch.equal(logits_all, logits_quarter)


def test_wrapped_gpu_model_matches_transformers_in_fp32():
    torch.manual_seed(0)
    model = random_model(torch.float32, "cuda")
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 16), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
    manager = hf.offload_model_experts(model, ExpertOffloadConfig(num_resident=8))
    assert manager.is_managed
    with torch.no_grad():
        out = model(ids).logits
    # fp32 products on both sides (the kernel uses IEEE fp32 dots, torch matmul no TF32).
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    del model
    release(manager)


def test_cpu_model_offloaded_to_the_gpu_moves_the_rest_along():
    torch.manual_seed(0)
    model = random_model(torch.float32, "cpu")
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
    manager = hf.offload_model_experts(model, ExpertOffloadConfig(num_resident=8), device="cuda")
    assert manager.is_managed
    assert all(p.is_cuda for p in model.parameters())
    with torch.no_grad():
        out = model(ids.cuda()).logits.cpu()
    # CPU against GPU: the dense GEMMs and attention differ in summation order too.
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    del model
    release(manager)
