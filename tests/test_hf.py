"""The transformers integration on tiny random-weight models of every supported family (fp32, CPU):
wrapped logits and greedy generation equal the original model's, a streaming load equals a normal
`from_pretrained` load, and checkpoint problems and unsupported models are refused by name."""

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from moe_uvm import memory, uvm  # noqa: E402
from moe_uvm.config import ExpertOffloadConfig  # noqa: E402
from moe_uvm.dense import DenseOffloadConfig  # noqa: E402
from moe_uvm.integrations import hf  # noqa: E402
from moe_uvm.memory import MemoryPlan  # noqa: E402
from moe_uvm.store import ManagedExpertStore  # noqa: E402

from helpers import COMMON, FAMILY_CONFIGS, rel_err, tiny_model  # noqa: E402

REL_TOL = 1e-5
"""fp32 on CPU: ||out - ref|| / ||ref|| of the logits (the kernel and transformers sum the same
products in different orders)."""


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(family, seed, directory) of a tiny model saved with save_pretrained in small shards."""
    seed = int.from_bytes(os.urandom(4), "little")
    path = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param, seed).save_pretrained(path, max_shard_size="40KB")
    return request.param, seed, path


def token_ids(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, COMMON["vocab_size"], (batch, length))


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_wrapped_logits_equal_original_and_come_from_the_stores(family, seed):
    model = tiny_model(family, seed)
    ids = token_ids()
    with torch.no_grad():
        ref = model(ids).logits
    manager = hf.offload_model_experts(model, ExpertOffloadConfig(num_resident=1))
    with torch.no_grad():
        out = model(ids).logits
    assert rel_err(out, ref) < REL_TOL, f"seed {seed}"
    blocks = hf.find_moe_blocks(model)
    assert [type(b.module.experts) for b in blocks] == [hf.FusedExperts] * 2
    assert manager.num_layers == 2
    # The stores are what the model reads: changing them changes the logits.
    blocks[0].module.experts.moe.w2_weight.data.mul_(2)
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) > 1e-3, f"seed {seed}"


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_generate_unchanged(family, seed):
    model = tiny_model(family, seed)
    ids = token_ids(batch=1)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    hf.offload_model_experts(model)
    assert torch.equal(model.generate(ids, **kwargs), ref), f"seed {seed}"


def test_streaming_load_equals_normal_load(checkpoint):
    family, seed, path = checkpoint
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the load below reads several shards
    normal = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    loaded = hf.load_offloaded(path, ExpertOffloadConfig(num_resident=2))
    model = loaded.model
    reference = dict(normal.named_parameters()) | dict(normal.named_buffers())
    for block in hf.find_moe_blocks(model):
        moe = block.module.experts.moe
        assert torch.equal(moe.w13_weight, reference.pop(f"{block.name}.experts.gate_up_proj"))
        assert torch.equal(moe.w2_weight, reference.pop(f"{block.name}.experts.down_proj"))
    mine = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in reference.items():
        assert torch.equal(mine[name], tensor), name
    if normal.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    ids = token_ids()
    with torch.no_grad():
        assert rel_err(model(ids).logits, normal(ids).logits) < REL_TOL, f"{family} seed {seed}"


def test_streaming_load_of_fused_expert_tensors(tmp_path, seed):
    """Checkpoints may also hold transformers 5's fused 3-D gate_up_proj / down_proj."""
    model = tiny_model("mixtral", seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "model.safetensors")
    model.config.save_pretrained(tmp_path)
    loaded = hf.load_offloaded(tmp_path).model
    for block in hf.find_moe_blocks(loaded):
        assert torch.equal(block.module.experts.moe.w13_weight,
                           model.get_submodule(block.name).experts.gate_up_proj)
        assert torch.equal(block.module.experts.moe.w2_weight,
                           model.get_submodule(block.name).experts.down_proj)


def test_streaming_load_with_dense_offload_equals_normal_load(tmp_path, seed):
    model = tiny_model("qwen3_moe", seed)
    model.save_pretrained(tmp_path)
    dense = DenseOffloadConfig(group_size=1, num_in_group=1, prefetch_step=0, params="self_attn")
    loaded = hf.load_offloaded(tmp_path, dense_config=dense)
    assert loaded.dense is not None and loaded.dense.offloaded_layers == (0, 1)
    ids = token_ids()
    with torch.no_grad():
        assert rel_err(loaded.model(ids).logits, model(ids).logits) < REL_TOL, f"seed {seed}"


def test_dense_offload_of_expert_weights_refused(tmp_path, seed):
    tiny_model("qwen3_moe", seed).save_pretrained(tmp_path)
    dense = DenseOffloadConfig(group_size=1, num_in_group=1, prefetch_step=0)
    with pytest.raises(ValueError, match=r"expert weights .*restrict DenseOffloadConfig.params"):
        hf.load_offloaded(tmp_path, dense_config=dense)


@pytest.fixture(scope="module")
def mixtral_tensors(tmp_path_factory):
    """A saved Mixtral checkpoint (legacy per-expert names) as a dict, and its directory."""
    path = tmp_path_factory.mktemp("mixtral-base")
    tiny_model("mixtral", int.from_bytes(os.urandom(4), "little")).save_pretrained(path)
    return load_file(path / "model.safetensors"), path


def edited_checkpoint(mixtral_tensors, tmp_path, edit):
    tensors, source = mixtral_tensors
    tensors = dict(tensors)
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(source / "config.json", tmp_path / "config.json")
    return tmp_path


EXPERT = "model.layers.1.block_sparse_moe.experts.3"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.norm.weight"), r"missing \(1\): model\.norm\.weight"),
        (lambda t: t.pop(f"{EXPERT}.w2.weight"),
         r"missing \(1\): model\.layers\.1\.mlp\.experts\.3 \(w2\)"),
        (lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)}),
         r"unexpected \(1\): model\.layers\.0\.extra\.weight"),
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.ones(32, 8)}),
         r"mismatched \(1\): model\.layers\.0\.self_attn\.q_proj\.weight: checkpoint \[32, 8\], "
         r"model \[32, 32\]"),
        (lambda t: t.update({f"{EXPERT}.w1.weight": torch.ones(64, 31)}),
         rf"mismatched \(1\): {EXPERT}\.w1\.weight: checkpoint expert 3 \[64, 31\]"),
        (lambda t: t.update({f"{EXPERT[:-1]}4.w1.weight": torch.ones(64, 32)}),
         r"mismatched \(1\): .*experts\.4\.w1\.weight: checkpoint expert 4 \[64, 32\], "
         r"model 4 experts"),
    ],
    ids=["missing-dense", "missing-expert", "unexpected", "mismatched-dense", "mismatched-expert",
         "expert-out-of-range"],
)
def test_checkpoint_problems_are_named(mixtral_tensors, tmp_path, edit, message):
    path = edited_checkpoint(mixtral_tensors, tmp_path, edit)
    with pytest.raises(hf.CheckpointError, match=message):
        hf.load_offloaded(path)


def test_directory_without_safetensors_refused(tmp_path):
    AutoConfig.for_model("mixtral", **COMMON).save_pretrained(tmp_path)
    with pytest.raises(hf.CheckpointError, match="no safetensors checkpoint"):
        hf.load_offloaded(tmp_path)


def test_model_without_moe_blocks_refused_naming_the_families(tmp_path):
    config = AutoConfig.for_model("llama", **COMMON)
    model = AutoModelForCausalLM.from_config(config)
    families = r"\(mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3\)"
    with pytest.raises(ValueError, match=f"LlamaForCausalLM has no sparse-MoE block of a "
                       f"supported family {families}"):
        hf.offload_model_experts(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llama' has no MoE block moe-uvm supports; supported "
                       "families: mixtral, qwen2_moe"):
        hf.load_offloaded(tmp_path)


def test_unsupported_activation_and_double_offload_refused(seed):
    with pytest.raises(ValueError, match="activation 'gelu'; FusedMoE runs SiLU-gated experts"):
        hf.offload_model_experts(tiny_model("mixtral", seed, hidden_act="gelu"))
    model = tiny_model("olmoe", seed)
    hf.offload_model_experts(model)
    with pytest.raises(ValueError, match="already offloaded"):
        hf.offload_model_experts(model)


def test_meta_model_is_sent_to_load_offloaded():
    config = AutoConfig.for_model("olmoe", **COMMON, **FAMILY_CONFIGS["olmoe"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="meta device; use load_offloaded"):
        hf.offload_model_experts(model)



# --- memory guard and all-or-nothing conversion ------------------------------------------------


def device_tensors(model):
    """Distinct parameters and buffers of `model` outside its FusedExperts (the expert stores)."""
    experts = {id(t) for m in model.modules() if isinstance(m, hf.FusedExperts)
               for t in (*m.parameters(), *m.buffers())}
    found = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in experts}
    return list(found.values())


@pytest.fixture
def planned(monkeypatch):
    """The MemoryPlans reserved (on the CPU: computed, not checked) during a test."""
    plans = []
    reserve = MemoryPlan.reserve

    def recording(self, **kwargs):
        plans.append(self)
        return reserve(self, **kwargs)

    monkeypatch.setattr(MemoryPlan, "reserve", recording)
    return plans


@pytest.mark.parametrize("dense", [False, True])
def test_streaming_load_counts_the_bytes_it_puts_on_the_device(tmp_path, seed, monkeypatch,
                                                               planned, dense):
    """bf16 load with norms kept in fp32 (a keep-in-fp32 rule, as some families have): the
    non-expert bytes counted before loading are what the loaded model holds, and the dense pool
    counted is the offloader's."""
    model = tiny_model("qwen3_moe", seed)
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(type(model), "_keep_in_fp32_modules_strict", ["norm"], raising=False)
    dense_config = (DenseOffloadConfig(group_size=1, num_in_group=1, prefetch_step=0,
                                       params="self_attn") if dense else None)
    loaded = hf.load_offloaded(tmp_path, dtype=torch.bfloat16, dense_config=dense_config)
    plan = planned[0]
    tensors = device_tensors(loaded.model)
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.bfloat16, torch.float32}
    if dense:
        assert plan.parts[memory.DENSE_POOL] == loaded.dense.pool_bytes
        # the offloaded parameters are views into the pool (counted as such): set them aside
        pool = loaded.dense.pool.untyped_storage().data_ptr()
        kept = [t for t in tensors if t.untyped_storage().data_ptr() != pool]
        assert len(kept) < len(tensors)
        tensors = kept
    assert plan.parts[memory.NON_EXPERT_WEIGHTS] == sum(t.nbytes for t in tensors)
    stores = loaded.manager.stores
    assert plan.parts[memory.EXPERT_STORES] == sum(s.nbytes for s in stores)


def fake_gpu(monkeypatch, free):
    monkeypatch.setattr(uvm, "mem_get_info", lambda device=0: (free, 40 * 2**30))

    def no_runtime():
        raise AssertionError("nothing may be allocated on a refused plan")

    monkeypatch.setattr(uvm, "_runtime", no_runtime)


def test_model_whose_experts_fit_but_not_with_the_rest_is_refused_up_front(monkeypatch, seed):
    model = tiny_model("qwen3_moe", seed)
    blocks = hf.find_moe_blocks(model)
    experts = [b.module.experts for b in blocks]
    cuda = torch.device("cuda", 0)
    plan = hf.plan_expert_memory(blocks, None, cuda)
    rest = sum(t.nbytes for t in device_tensors(model)
               if not any(t is p for e in experts for p in e.parameters()))
    fake_gpu(monkeypatch, free=2 * 2**30 + plan.total + rest // 2)
    with pytest.raises(uvm.OversubscriptionError,
                       match=rf"managed expert stores .*non-expert weights "
                             rf"{uvm.format_bytes(rest)}"):
        hf.offload_model_experts(model, device=cuda)
    assert [b.module.experts for b in blocks] == experts
    assert uvm.reserved_bytes(0) == 0


@pytest.mark.parametrize("fail", ["store", "copy"])
def test_failed_conversion_leaves_the_model_its_own_experts(monkeypatch, seed, fail):
    model = tiny_model("qwen3_moe", seed)
    ids = token_ids()
    with torch.no_grad():
        ref = model(ids).logits
    blocks = hf.find_moe_blocks(model)
    experts = [b.module.experts for b in blocks]
    made, freed = [], set()
    init, free = ManagedExpertStore.__init__, ManagedExpertStore.free

    def recording_init(self, *args, **kwargs):
        if fail == "store" and len(made) == 1:
            raise RuntimeError("injected store failure")
        init(self, *args, **kwargs)
        made.append(self)

    def recording_free(self):
        freed.add(id(self))
        free(self)

    monkeypatch.setattr(ManagedExpertStore, "__init__", recording_init)
    monkeypatch.setattr(ManagedExpertStore, "free", recording_free)
    if fail == "copy":
        def broken(self, name, tensor):
            raise RuntimeError("injected copy failure")

        monkeypatch.setattr(hf.FusedExperts, "load_fused", broken)
    with pytest.raises(RuntimeError, match="injected"):
        hf.offload_model_experts(model, ExpertOffloadConfig(num_resident=1))
    assert [b.module.experts for b in blocks] == experts
    assert made and {id(s) for s in made} <= freed
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
