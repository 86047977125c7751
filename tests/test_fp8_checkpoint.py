"""FP8 checkpoints through the Hugging Face loader: tiny checkpoints made here in the layout
DeepSeek-V3 and the Qwen3 FP8 releases ship (`quantization_config` quant_method fp8, e4m3,
`weight_block_size`; every linear weight of the decoder layers e4m3 with a `weight_scale_inv`
beside it, routers, norms and embeddings 16-bit) load, keep their experts FP8 in the stores and
match their dequantised twins; malformed ones are refused by name before anything is allocated.

Tolerances (logits, fp32 activations on CPU): against the fp32 twin (the FP8 values
dequantised exactly) bitwise equal, on random tiny models of two families; against the bf16
twin (dequantised, then rounded to bf16 as a bf16 release of the same model would be) on the
trained tiny checkpoint, ||out - ref|| / ||ref|| < 1e-2 and the same next-byte argmax at >= 99%
of held-out positions (measured: 2.7e-3, 100%, mean KL 1.2e-5 nats). Random models are too
chaotic for the bf16 comparison (a near-tie in routing flips an expert: up to 0.28 seen).
"""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from moe_uvm.config import ExpertOffloadConfig  # noqa: E402
from moe_uvm.integrations import hf  # noqa: E402
from moe_uvm.integrations.hf_shape import describe  # noqa: E402
from moe_uvm.kernels import fp8  # noqa: E402

from helpers import (  # noqa: E402
    COMMON,
    rel_err,
    tiny_checkpoint,
    tiny_model,
    use_reference_kernels,
)

BF16_TWIN_TOL = 1e-2
BF16_TWIN_ARGMAX = 0.99
# 16 x 16 blocks on the tiny models (hidden 32, expert intermediate 48): several blocks per
# matrix; 32 x 32 leaves partial blocks at the edges (48 = 32 + 16).
BLOCKS = [(16, 16), (32, 32)]


def _quantized_names(tensors: dict) -> list[str]:
    """What FP8 releases quantise: the 2-D linear weights of the decoder layers, but not the
    routers (mlp.gate) or norms."""
    return [k for k, v in tensors.items() if k.startswith("model.layers.") and v.dim() == 2
            and k.endswith(".weight") and not k.endswith("mlp.gate.weight")
            and "norm" not in k]


def fp8_checkpoint(model, path, block, *, twin_dtype=None):
    """Save `model` as an FP8 checkpoint (block scales) in `path`; with twin_dtype, save its
    dequantised twin there instead (same names as the model's own checkpoint)."""
    plain = path.parent / f"{path.name}-plain"
    model.save_pretrained(plain)
    tensors = load_file(plain / "model.safetensors")
    config = json.loads((plain / "config.json").read_text())
    out = {}
    for key, value in tensors.items():
        if key in _quantized_names(tensors):
            q, scale = fp8.quantize(value[None].float(), block)
            if twin_dtype is None:
                out[key], out[f"{key}_scale_inv"] = q[0], scale[0]
            else:
                out[key] = fp8.dequantize(q, scale, block)[0].to(twin_dtype)
        else:
            out[key] = value
    if twin_dtype is None:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                         "quant_method": "fp8", "weight_block_size": list(block)}
    path.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


def _logits(path, ids, check=None):
    loaded = hf.load_offloaded(path, ExpertOffloadConfig(num_resident=2), device="cpu",
                               dtype=torch.float32)
    try:
        if check is not None:
            check(loaded.model)
        with torch.no_grad():
            return loaded.model(ids).logits
    finally:
        loaded.manager.close()


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_checkpoint_loads_fp8_experts_and_equals_its_dequantised_fp32_twin(
        family, block, tmp_path, monkeypatch):
    seed = int.from_bytes(os.urandom(4), "little")
    model = tiny_model(family, seed)
    quantized = fp8_checkpoint(model, tmp_path / "fp8", block)
    exact = fp8_checkpoint(model, tmp_path / "fp32-twin", block, twin_dtype=torch.float32)
    use_reference_kernels(monkeypatch)
    ids = torch.randint(3, COMMON["vocab_size"], (2, 7))
    tensors = load_file(quantized / "model.safetensors")

    def check(loaded):
        # The experts were never widened: the stores hold the checkpoint's e4m3 bytes and scales.
        block_module = hf.find_moe_blocks(loaded)[0]
        moe = block_module.module.experts.moe
        assert moe.w13_weight.dtype == fp8.FP8_DTYPE and moe.block_shape == block
        name = f"{block_module.name}.experts.1"
        gate, up = tensors[f"{name}.gate_proj.weight"], tensors[f"{name}.up_proj.weight"]
        assert torch.equal(moe.w13_weight[1].view(torch.uint8),
                           torch.cat([gate, up]).view(torch.uint8))
        assert torch.equal(moe.w2_weight_scale[1],
                           tensors[f"{name}.down_proj.weight_scale_inv"])
        # Other FP8 weights were dequantised into the model's dtype on their way in.
        attn = next(k for k in _quantized_names(tensors) if "self_attn" in k)
        assert loaded.get_parameter(attn).dtype == torch.float32

    out = _logits(quantized, ids, check)
    assert torch.equal(out, _logits(exact, ids)), f"seed {seed}"


@pytest.mark.skipif(tiny_checkpoint() is None, reason="the trained tiny checkpoint is not here "
                    "(../shared/models or local/models/tiny-qwen3moe-bytes)")
def test_trained_tiny_as_fp8_checkpoint_matches_its_bf16_twin(tmp_path, monkeypatch):
    from test_fp8 import HELD_OUT

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    quantized = fp8_checkpoint(model, tmp_path / "fp8", (128, 128))
    bf16 = fp8_checkpoint(model, tmp_path / "bf16-twin", (128, 128), twin_dtype=torch.bfloat16)
    use_reference_kernels(monkeypatch)
    ids = torch.tensor([list(HELD_OUT)])
    out, twin = _logits(quantized, ids), _logits(bf16, ids)
    agree = (out.argmax(-1) == twin.argmax(-1)).float().mean().item()
    assert rel_err(out, twin) < BF16_TWIN_TOL and agree >= BF16_TWIN_ARGMAX, \
        (rel_err(out, twin), agree)


def test_fp8_checkpoint_is_planned_in_fp8_bytes(tmp_path, seed):
    model = tiny_model("qwen3_moe", seed)
    quantized = fp8_checkpoint(model, tmp_path / "fp8", (16, 16))
    plain = tmp_path / "fp8-plain"  # the model's own checkpoint, fp32
    assert describe(quantized).shape.weight_bytes == 1
    assert describe(plain).shape.weight_bytes == 4
    assert describe(plain, quantize_experts="fp8").shape.weight_bytes == 1
    loaded = hf.load_offloaded(quantized, ExpertOffloadConfig(), device="cpu")
    try:
        moe = hf.find_moe_blocks(loaded.model)[0].module.experts.moe
        assert moe.w13_weight.dtype == fp8.FP8_DTYPE
        # 4 experts x ([6, 2] + [2, 3]) fp32 scales at 16 x 16 blocks
        assert moe.expert_scale_nbytes() == 4 * 4 * (6 * 2 + 2 * 3)
    finally:
        loaded.manager.close()


def _edited(tmp_path, seed, edit, config_edit=None):
    path = fp8_checkpoint(tiny_model("qwen3_moe", seed), tmp_path / "fp8", (16, 16))
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")
    if config_edit is not None:
        config = json.loads((path / "config.json").read_text())
        config_edit(config)
        (path / "config.json").write_text(json.dumps(config))
    return path


EXPERT = "model.layers.1.mlp.experts.2"
ATTN = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit, config_edit, message", [
    (lambda t: t.pop(f"{EXPERT}.up_proj.weight_scale_inv"), None,
     r"missing \(1\): model\.layers\.1\.mlp\.experts\.2 \(w3 scales\)"),
    (lambda t: t.pop(f"{ATTN}.weight_scale_inv"), None,
     rf"missing \(1\): {ATTN}\.weight_scale_inv"),
    (lambda t: t.update({f"{EXPERT}.down_proj.weight_scale_inv": torch.ones(1, 1)}), None,
     r"mismatched \(1\): .*experts\.2\.down_proj\.weight_scale_inv: checkpoint expert 2 scales "
     r"\[1, 1\], model 4 experts with \[2, 3\] scales"),
    (lambda t: t.update({f"{ATTN}.weight_scale_inv": torch.ones(3, 3)}), None,
     rf"mismatched \(1\): {ATTN}\.weight_scale_inv: checkpoint \[3, 3\], expected \[2, 2\]"),
    (lambda t: t.update({f"{EXPERT}.gate_proj.weight": torch.ones(48, 32)}), None,
     r"a 16/32-bit expert weight in an FP8 checkpoint"),
    (lambda t: None, lambda c: c.pop("quantization_config"),
     r"an FP8 expert tensor, but the checkpoint's config has no FP8 quantization_config"),
    (lambda t: None, lambda c: c["quantization_config"].update(quant_method="gptq"),
     r"quant_method 'gptq'; moe-uvm reads 16/32-bit checkpoints and FP8 ones"),
    (lambda t: None, lambda c: c["quantization_config"].pop("weight_block_size"),
     r"FP8 checkpoint without weight_block_size"),
    (lambda t: None, lambda c: c["quantization_config"].update(weight_block_size=[128, 100]),
     r"weight_block_size: .*bk=100 must be a power of two"),
], ids=["expert-scale-missing", "dense-scale-missing", "expert-scale-shape", "dense-scale-shape",
        "bf16-expert", "no-quantization-config", "other-method", "per-tensor", "bad-block"])
def test_malformed_fp8_checkpoints_are_refused_by_name(tmp_path, seed, edit, config_edit,
                                                        message, monkeypatch):
    path = _edited(tmp_path, seed, edit, config_edit)
    from moe_uvm.integrations import hf_load

    allocated = []
    monkeypatch.setattr(hf_load, "attach_experts", lambda *a, **k: allocated.append(a))
    with pytest.raises(hf.CheckpointError, match=message):
        hf.load_offloaded(path, device="cpu")
    assert not allocated  # refused before any store was made


def test_random_weights_of_an_fp8_config_build_fp8_experts(tmp_path, seed, monkeypatch):
    path = fp8_checkpoint(tiny_model("qwen3_moe", seed), tmp_path / "fp8", (16, 16))
    (path / "model.safetensors").unlink()
    loaded = hf.load_offloaded(path, device="cpu", random_weights=3)
    use_reference_kernels(monkeypatch)
    try:
        moe = hf.find_moe_blocks(loaded.model)[0].module.experts.moe
        assert moe.w13_weight.dtype == fp8.FP8_DTYPE and moe.block_shape == (16, 16)
        assert float(moe.w13_weight_scale.min()) > 0 and not torch.all(moe.w13_weight_scale == 1)
        with torch.no_grad():
            assert torch.isfinite(loaded.model(torch.tensor([[5, 6, 7]])).logits).all()
    finally:
        loaded.manager.close()


def test_generate_runs_fp8_checkpoints_and_quantises_on_request(tmp_path, seed, monkeypatch,
                                                                 capsys):
    from moe_uvm.cli import main

    model = tiny_model("qwen3_moe", seed)
    quantized = fp8_checkpoint(model, tmp_path / "fp8", (16, 16))
    use_reference_kernels(monkeypatch)
    common = ["--device", "cpu", "--prompt-tokens", "5", "--max-new-tokens", "3",
              "--ignore-eos"]
    for path, extra in ((quantized, []), (tmp_path / "fp8-plain", ["--quantize-experts", "fp8"])):
        out = tmp_path / f"{path.name}.json"
        assert main(["generate", "--model", str(path), *common, *extra, "--json",
                     str(out)]) == 0
        report = json.loads(out.read_text())
        assert len(report["new_tokens"][0]) == 3, report
    assert main(["generate", "--model", str(quantized), *common, "--quantize-experts",
                 "int4"]) == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(tiny_checkpoint() is None, reason="the trained tiny checkpoint is not here "
                    "(../shared/models or local/models/tiny-qwen3moe-bytes)")
def test_gpu_trained_tiny_fp8_checkpoint_matches_its_bf16_twin(tmp_path):
    """On the GPU in bf16 (the W8A16 kernels against the bf16 kernels on the twin's weights,
    experts offloaded and resident): same tolerances as on CPU."""
    from test_fp8 import HELD_OUT

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    quantized = fp8_checkpoint(model, tmp_path / "fp8", (128, 128))
    bf16 = fp8_checkpoint(model, tmp_path / "bf16-twin", (128, 128), twin_dtype=torch.bfloat16)
    ids = torch.tensor([list(HELD_OUT)], device="cuda")
    logits = []
    for path in (quantized, bf16):
        loaded = hf.load_offloaded(path, ExpertOffloadConfig(num_resident=16), device="cuda",
                                   dtype=torch.bfloat16)
        try:
            moe = hf.find_moe_blocks(loaded.model)[0].module.experts.moe
            assert moe.is_fp8 == (path == quantized)
            with torch.no_grad():
                logits.append(loaded.model(ids).logits.float())
        finally:
            loaded.manager.close()
    out, twin = logits
    agree = (out.argmax(-1) == twin.argmax(-1)).float().mean().item()
    assert rel_err(out, twin) < BF16_TWIN_TOL and agree >= BF16_TWIN_ARGMAX, \
        (rel_err(out, twin), agree)
