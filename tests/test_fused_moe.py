"""fused_moe (Triton) against fused_moe_reference (plain torch, fp32) on fresh random inputs.

Unmarked tests use small shapes in fp16/fp32 on DEVICE: CUDA when present, else the CPU with
the Triton interpreter (interpreted bf16 dots are wrong, so no bf16 there). Both paths are
covered: grouped (T > 1) and one-token (T == 1). GPU tests cover bf16, the real layer shapes,
CUDA graphs, torch.compile and weight placement. Tolerances are relative Frobenius errors
‖out−ref‖/‖ref‖.
"""

import importlib
import math

import pytest
import torch

from moe_uvm.kernels import fused_moe, fused_moe_reference
from moe_uvm.kernels.fused_moe import (
    MoeBlockConfig,
    fused_moe_triton,
    select_config,
)
from moe_uvm.kernels.fused_moe_configs import (
    CONFIG_DIR,
    MoeDecodeConfig,
    TunedTables,
    config_file,
    config_key,
    default_config,
    default_decode_config,
    load_tables,
    min_block_m,
    save_tables,
    select_decode_config,
    tuned_tables,
)
from moe_uvm.kernels.moe_align import align_by_expert

from helpers import (
    DEVICE,
    SMALL_DECODE,
    TOLERANCE,
    make_inputs,
    make_routing,
    rel_err,
    store_layout,
)

# `moe_uvm.kernels.fused_moe` as an attribute is the function; the module is in sys.modules.
KERNEL_MODULE = importlib.import_module("moe_uvm.kernels.fused_moe")

QWEN3 = dict(num_experts=128, top_k=8, hidden=2048, intermediate=768)
MIXTRAL_FEW_EXPERTS = dict(num_experts=4, top_k=2, hidden=4096, intermediate=14336)


def slot_pool(w13, w2, experts, num_slots):
    """A strided slot pool holding copies of `experts`, and the int32 map pointing at them."""
    pool13, pool2 = store_layout(w13[:num_slots].clone(), w2[:num_slots].clone())
    expert_slot = torch.full((w13.shape[0],), -1, dtype=torch.int32, device=w13.device)
    for slot, expert in enumerate(experts):
        pool13[slot].copy_(w13[expert])
        pool2[slot].copy_(w2[expert])
        expert_slot[expert] = slot
    return expert_slot, pool13, pool2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,hidden,intermediate",
    [
        (1, 8, 2, 64, 32),  # one decode token
        (19, 8, 2, 96, 48),  # T, H and I all off the tile sizes
        (70, 8, 2, 64, 32),  # several row blocks per expert
        (7, 64, 6, 64, 32),  # E=64 top-6: most experts receive no tokens
    ],
)
def test_matches_reference(seed, dtype, num_tokens, num_experts, top_k, hidden, intermediate):
    x, w13, w2, topk_weights, topk_ids = make_inputs(
        num_tokens, num_experts, top_k, hidden, intermediate, dtype)
    out = fused_moe(x, w13, w2, topk_weights, topk_ids)
    ref = fused_moe_reference(x, w13, w2, topk_weights, topk_ids)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "config",
    [
        # split-K into 3 uneven parts, K tiles smaller than H and I
        MoeBlockConfig(gate_up_block_k=32, down_block_k=16, down_split_k=3),
        MoeBlockConfig(block_m=32, gate_up_block_n=16, down_block_n=32, down_split_k=2),
        MoeBlockConfig(block_m=64, gate_up_block_n=64, gate_up_block_k=64, down_block_n=128,
                       down_block_k=64),
    ],
)
@pytest.mark.parametrize("num_tokens", [37, 1])  # 1: each choice its own row block
def test_explicit_configs_match_reference(seed, config, num_tokens):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, 8, 2, 96, 80, torch.float32)
    out = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, config=config)
    ref = fused_moe_reference(x, w13, w2, topk_weights, topk_ids)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_one_token_row_blocks_skip_padding_and_out_of_range_ids(seed):
    """One token on the grouped kernels (no alignment): ids < 0 and >= E contribute nothing,
    as on every other path."""
    x, w13, w2, topk_weights, topk_ids = make_inputs(1, 16, 4, 80, 40, torch.float32)
    config = MoeBlockConfig(gate_up_block_k=32, down_block_k=16, down_split_k=2)
    topk_ids[0, 1], topk_ids[0, 3] = -1, 16
    topk_weights[0, 1] = topk_weights[0, 3] = float("nan")
    out = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, config=config)
    kept = topk_ids.clone()
    kept[0, 3] = -1
    ref = fused_moe_reference(x, w13, w2, topk_weights, kept)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_padding_ids_contribute_nothing(seed):
    x, w13, w2, topk_weights, topk_ids = make_inputs(9, 8, 2, 64, 32, torch.float32)
    topk_ids[2, 1] = -1
    topk_ids[5, :] = -1  # a token routed nowhere
    topk_weights += 1.0  # padding pairs carry real weights that must be ignored
    out = fused_moe(x, w13, w2, topk_weights, topk_ids)
    ref = fused_moe_reference(x, w13, w2, topk_weights, topk_ids)
    assert torch.equal(out[5], torch.zeros_like(out[5]))
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("num_tokens", [1, 11])
def test_store_layout_weights_match_dense_bitwise(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, 8, 2, 64, 48, torch.float16)
    strided13, strided2 = store_layout(w13, w2)
    assert strided13.stride(0) > w13[0].numel() and not strided13.is_contiguous()
    out = fused_moe(x, strided13, strided2, topk_weights, topk_ids)
    assert torch.equal(out, fused_moe(x, w13, w2, topk_weights, topk_ids))
    assert rel_err(out, fused_moe_reference(x, w13, w2, topk_weights, topk_ids)) < 5e-3


@pytest.mark.parametrize("num_tokens", [1, 13])
def test_slots_holding_copies_are_bitwise_equal(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, 8, 2, 64, 32, torch.float16)
    strided13, strided2 = store_layout(w13, w2)
    expert_slot, pool13, pool2 = slot_pool(w13, w2, experts=[5, 0, 2], num_slots=4)
    direct = fused_moe(x, strided13, strided2, topk_weights, topk_ids)
    via_slots = fused_moe(x, strided13, strided2, topk_weights, topk_ids,
                          expert_slot=expert_slot, w13_slots=pool13, w2_slots=pool2)
    assert torch.equal(via_slots, direct)


@pytest.mark.parametrize("num_tokens", [1, 6])
def test_slot_map_is_read_at_run_time(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, 8, 2, 64, 32, torch.float32)
    routed = int(topk_ids[0, 0])
    expert_slot, pool13, pool2 = slot_pool(w13, w2, experts=[routed], num_slots=2)
    slots = dict(expert_slot=expert_slot, w13_slots=pool13, w2_slots=pool2)
    direct = fused_moe(x, w13, w2, topk_weights, topk_ids)
    pool13[0].copy_(torch.randn_like(pool13[0]) * 64**-0.5)
    pool2[0].copy_(torch.randn_like(pool2[0]) * 32**-0.5)
    changed = fused_moe(x, w13, w2, topk_weights, topk_ids, **slots)
    swapped13, swapped2 = w13.clone(), w2.clone()
    swapped13[routed], swapped2[routed] = pool13[0], pool2[0]
    assert rel_err(changed, direct) > 1e-2
    assert rel_err(changed, fused_moe_reference(x, swapped13, swapped2, topk_weights,
                                                topk_ids)) < TOLERANCE[torch.float32]
    expert_slot[routed] = -1  # the same map tensor, rewritten in place between calls
    assert torch.equal(fused_moe(x, w13, w2, topk_weights, topk_ids, **slots), direct)


def test_reference_reads_slots(seed):
    x, w13, w2, topk_weights, topk_ids = make_inputs(5, 8, 2, 32, 16, torch.float32)
    expert_slot, pool13, pool2 = slot_pool(w13, w2, experts=[int(topk_ids[0, 0])], num_slots=1)
    pool13.normal_()
    swapped13 = w13.clone()
    swapped13[int(topk_ids[0, 0])] = pool13[0]
    with_slots = fused_moe_reference(x, w13, w2, topk_weights, topk_ids, expert_slot, pool13, pool2)
    assert torch.equal(with_slots, fused_moe_reference(x, swapped13, w2, topk_weights, topk_ids))


@pytest.mark.parametrize("num_tokens", [1, 10])
def test_int32_and_int64_ids_agree_bitwise(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, 8, 2, 64, 32, torch.float16)
    assert topk_ids.dtype == torch.int64
    out64 = fused_moe(x, w13, w2, topk_weights, topk_ids)
    out32 = fused_moe(x, w13, w2, topk_weights, topk_ids.to(torch.int32))
    assert torch.equal(out32, out64)


@pytest.mark.parametrize("num_tokens", [1, 23])
def test_repeated_calls_are_bitwise_equal(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, 64, 6, 64, 32, torch.float32)
    first = fused_moe(x, w13, w2, topk_weights, topk_ids)
    assert torch.equal(fused_moe(x, w13, w2, topk_weights, topk_ids), first)


@pytest.mark.parametrize(
    "num_tokens,top_k,num_experts,block_m",
    [(1, 2, 8, 16), (33, 2, 8, 16), (50, 6, 64, 16), (40, 2, 8, 64), (9, 8, 128, 32),
     # several counting/scatter programs (chunks of 32 and 256 pairs), the last one partial
     (301, 8, 128, 32), (2053, 8, 128, 128), (700, 2, 8, 64)],
)
def test_alignment_matches_brute_force(seed, num_tokens, top_k, num_experts, block_m):
    topk_ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    topk_ids = topk_ids.to(DEVICE)
    topk_ids[num_tokens // 2, 0] = -1
    sorted_pairs, block_expert = align_by_expert(topk_ids, num_experts, block_m)
    num_pairs = num_tokens * top_k
    bound = (num_pairs + min(num_experts, num_pairs) * (block_m - 1) + block_m - 1) // block_m
    assert block_expert.numel() == bound and sorted_pairs.numel() == bound * block_m
    rows = sorted_pairs.view(bound, block_m)
    flat_ids = topk_ids.flatten()
    used = block_expert >= 0
    num_used = int(used.sum())
    assert bool(used[:num_used].all()) and not bool(used[num_used:].any())  # -1 only at the end
    assert bool((block_expert[1:num_used] >= block_expert[: num_used - 1]).all())
    assert bool((rows[num_used:] == num_pairs).all())
    for expert in range(num_experts):
        expected = (flat_ids == expert).nonzero().flatten().to(torch.int32)
        expert_rows = rows[block_expert == expert].flatten()
        pairs = expert_rows[expert_rows != num_pairs]
        assert torch.equal(pairs, expected)  # each pair once, in pair order (stable)
        assert len(expert_rows) == -(-len(expected) // block_m) * block_m  # minimal padding


@pytest.mark.parametrize("num_tokens", [1, 4])
def test_compiles_fullgraph_and_passes_opcheck(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, 8, 2, 32, 16, torch.float32)
    w13, w2 = store_layout(w13, w2)  # two strided views aliasing one buffer, as the store makes

    def moe_block(x, topk_weights, topk_ids):
        return x + fused_moe(2 * x, w13, w2, topk_weights, topk_ids)

    compiled = torch.compile(moe_block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, topk_weights, topk_ids), moe_block(x, topk_weights, topk_ids))
    torch.library.opcheck(torch.ops.moe_uvm.fused_moe.default,
                          (x, w13, w2, topk_weights, topk_ids, None, None, None, None, None, None))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(w13=a["w13"][:, :, :16]), "w13 has shape"),
        (lambda a: a.update(w2=a["w2"][:, :, ::2]), "w2 has shape"),
        (lambda a: a.update(w2=a["w2"].transpose(1, 2).contiguous().transpose(1, 2)),
         "dims 1 and 2 must be contiguous"),
        (lambda a: a.update(topk_ids=a["topk_ids"].float()), "topk_ids is torch.float32"),
        (lambda a: a.update(topk_weights=a["topk_weights"][:, :1]), "topk_weights has shape"),
        (lambda a: a.update(w2=a["w2"].half()), "expected torch.float32 .hidden_states. dtype"),
        (lambda a: a.update(expert_slot=torch.zeros(8, dtype=torch.int32)),
         "each need both w13_slots and w2_slots"),
        (lambda a: a.update(fill_slot=torch.zeros(8, dtype=torch.int32), w13_slots=a["w13"]),
         "got fill_slot, w13_slots"),
        (lambda a: a.update(w13_slots=a["w13"], w2_slots=a["w2"]), "the pools need one of them"),
        (lambda a: a.update(fill_slot=torch.zeros(8, dtype=torch.int64), w13_slots=a["w13"],
                            w2_slots=a["w2"]), "fill_slot is torch.int64"),
        (lambda a: a.update(fill_slot=torch.zeros(8, 2, dtype=torch.int32)[:, 0],
                            w13_slots=a["w13"], w2_slots=a["w2"]), "expected a contiguous"),
        (lambda a: a.update(fill_slot=torch.zeros(8, dtype=torch.int32), w13_slots=a["w13"],
                            w2_slots=a["w2"][:3]), "w2_slots has 3 slots"),
    ],
)
def test_rejects_bad_inputs(change, message):
    x, w13, w2, topk_weights, topk_ids = make_inputs(3, 8, 2, 32, 16, torch.float32)
    args = dict(hidden_states=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids,
                expert_slot=None, w13_slots=None, w2_slots=None, fill_slot=None)
    change(args)
    with pytest.raises(ValueError, match=message):
        fused_moe_triton(**args)


@pytest.mark.parametrize(
    "name,pools",
    [("topk_ids", False), ("topk_weights", False), ("expert_slot", True), ("fill_slot", True)],
)
def test_rejects_routing_and_slot_maps_on_another_device(name, pools):
    x, w13, w2, topk_weights, topk_ids = make_inputs(3, 8, 2, 32, 16, torch.float32)
    args = dict(hidden_states=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids,
                expert_slot=None, w13_slots=None, w2_slots=None, fill_slot=None)
    if pools:
        args.update(w13_slots=w13[:2], w2_slots=w2[:2])
        args[name] = torch.full((8,), -1, dtype=torch.int32, device=x.device)
    args[name] = args[name].to("meta")
    message = rf"{name} is on meta but hidden_states is on {x.device}: they must be on the same"
    with pytest.raises(ValueError, match=message):
        fused_moe_triton(**args)


def random_first_cols(num_experts, intermediate, device):
    """first_col for fused_moe: random columns, some experts whole (0), one left out (I)."""
    cols = torch.randint(0, intermediate + 1, (num_experts,), dtype=torch.int32)
    cols[0], cols[-1] = 0, intermediate
    return cols.to(device)


@pytest.mark.parametrize("num_tokens,config", [
    (1, SMALL_DECODE), (1, None), (6, None),
    (9, MoeBlockConfig(gate_up_block_n=16, gate_up_block_k=32, down_block_n=32,
                       down_block_k=16, down_split_k=3))],
    ids=["one-token-gemv", "one-token-grouped", "grouped", "grouped-split-k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_first_col_leaves_out_the_columns_below_it(seed, num_tokens, config, dtype):
    """Each expert adds only its intermediate columns from first_col[e] on (the hybrid's GPU part
    of a split expert); with the CPU's part (the columns below) the whole layer comes back."""
    E, k, H, I = 8, 3, 48, 40  # I not a multiple of the K blocks: a split lands mid-block
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, E, k, H, I, dtype)
    first_col = random_first_cols(E, I, x.device)
    first_col[topk_ids[0, 0]] = I // 2  # a routed expert split mid-block: something left out
    out = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, config=config,
                           first_col=first_col)
    ref = fused_moe_reference(x, w13, w2, topk_weights, topk_ids, first_col=first_col)
    assert rel_err(out, ref) < TOLERANCE[dtype]
    # The columns below, computed as the reference's whole minus its part from first_col on.
    whole = fused_moe_reference(x, w13, w2, topk_weights, topk_ids)
    zero = torch.zeros_like(first_col)
    assert torch.equal(fused_moe_reference(x, w13, w2, topk_weights, topk_ids, first_col=zero),
                       whole)
    assert rel_err(out, whole) > 1e-2  # something was left out
    with pytest.raises(ValueError, match="first_col is torch.int64"):
        fused_moe(x, w13, w2, topk_weights, topk_ids, first_col=first_col.long())
    pool13, pool2 = store_layout(w13[:2].clone(), w2[:2].clone())
    fill = torch.full((E,), -1, dtype=torch.int32, device=x.device)
    with pytest.raises(ValueError, match="cannot go with fill_slot"):
        fused_moe(x, w13, w2, topk_weights, topk_ids, w13_slots=pool13, w2_slots=pool2,
                  fill_slot=fill, first_col=first_col)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["topk_ids", "topk_weights"])
def test_gpu_rejects_routing_on_the_host_through_the_op(name):
    # Through the custom op (not the meta device: a meta argument dispatches to the fake kernel).
    x, w13, w2, topk_weights, topk_ids = make_inputs(3, 8, 2, 32, 16, torch.float32, "cuda")
    args = dict(topk_weights=topk_weights, topk_ids=topk_ids)
    args[name] = args[name].cpu()
    with pytest.raises(ValueError, match=f"{name} is on cpu but hidden_states is on cuda:"):
        fused_moe(x, w13, w2, **args)


def test_config_rule_uses_thin_tiles_for_decode_and_wide_for_prefill():
    mixtral_decode = select_config(8, 4096, 14336, 2, torch.bfloat16, 1)
    assert mixtral_decode.block_m == 16 and mixtral_decode.down_split_k > 1
    assert default_config(128, 2048, 768, 8, 4096).block_m == 128
    assert default_config(128, 2048, 768, 8, 4096).gate_up_warps == 8
    with pytest.raises(ValueError, match="gate_up_block_n=24"):
        MoeBlockConfig(gate_up_block_n=24)


@pytest.mark.parametrize(
    "num_experts,top_k,num_tokens,expected",
    [(8, 2, 1, 16), (8, 2, 16, 16), (8, 2, 64, 32), (8, 2, 256, 128), (8, 2, 4096, 128),
     (128, 8, 64, 16), (128, 8, 256, 32), (128, 8, 300, 64)],
)
def test_min_block_m_is_twice_the_mean_rows_per_expert(num_experts, top_k, num_tokens, expected):
    assert min_block_m(num_experts, top_k, num_tokens) == expected


@pytest.mark.parametrize("shape,num_tokens", [("mixtral", 64), ("mixtral", 256), ("qwen3", 256)])
def test_min_block_m_streams_each_routed_expert_once(shape, num_tokens):
    """Row blocks per routed expert under softmax-top-k routing (the alignment pads each expert
    to a multiple of block_m, checked by test_alignment_matches_brute_force): each block streams
    the expert's weights, so blocks / experts is the factor by which host-resident weights
    cross PCIe. block_m=16 here gave 1.49x on the H100 (Mixtral T=64)."""
    num_experts, top_k = {"mixtral": (8, 2), "qwen3": (128, 8)}[shape]
    block_m = min_block_m(num_experts, top_k, num_tokens)
    generator = torch.Generator().manual_seed(0)  # fixed: rare draws may exceed 2x the mean
    ratios = {16: [], block_m: []}
    for _ in range(20):
        logits = torch.randn(num_tokens, num_experts, generator=generator)
        counts = torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(),
                                minlength=num_experts)
        routed = counts[counts > 0]
        for m in ratios:
            ratios[m].append(int(((routed + m - 1) // m).sum()) / routed.numel())
    assert max(ratios[block_m]) <= 1.01
    assert sum(ratios[16]) / 20 > 1.3  # what the rule fixes


@pytest.mark.parametrize("num_tokens", [1, 17, 64, 65, 200, 256, 257, 1024])
@pytest.mark.parametrize("shape", [(8, 4096, 14336, 2), (128, 2048, 768, 8), (64, 2048, 1408, 6)])
def test_selected_block_m_is_never_below_the_rule(shape, num_tokens):
    num_experts, hidden, intermediate, top_k = shape
    config = select_config(num_experts, hidden, intermediate, top_k, torch.bfloat16, num_tokens)
    assert config.block_m >= min_block_m(num_experts, top_k, num_tokens)


def test_tuned_entry_below_the_rule_is_skipped():
    key = config_key(8, 64, 32, 2, torch.float16)
    tables = TunedTables("test GPU", grouped={key: ((256, MoeBlockConfig(block_m=16)),)})
    assert select_config(8, 64, 32, 2, torch.float16, 8, tables) == MoeBlockConfig(block_m=16)
    assert (select_config(8, 64, 32, 2, torch.float16, 256, tables)
            == default_config(8, 64, 32, 2, 256))
    assert default_config(8, 64, 32, 2, 256).block_m == 128


def test_every_shipped_table_file_loads_and_is_named_for_its_device():
    files = sorted(CONFIG_DIR.glob("*.json"))
    assert files, "moe_uvm/kernels/configs/ holds no tuned tables"
    for path in files:
        tables = load_tables(path)
        assert config_file(tables.device_name) == path
        assert tuned_tables(tables.device_name) == tables
        assert tables.grouped and tables.decode


def test_a_gpu_without_a_file_borrows_its_architectures_tables_else_uses_the_rules():
    assert tuned_tables("NVIDIA Imaginary GPU").grouped == {}
    assert tuned_tables("NVIDIA Imaginary GPU", (7, 5)).grouped == {}
    h100 = tuned_tables("NVIDIA H100 80GB HBM3")
    assert h100.compute_capability == (9, 0)
    assert tuned_tables("NVIDIA H800 PCIe", (9, 0)) == h100  # first file of its architecture
    tuned = select_config(128, 2048, 768, 8, torch.bfloat16, 16, h100)
    assert tuned == h100.grouped[config_key(128, 2048, 768, 8, torch.bfloat16)][2][1]
    assert select_config(128, 2048, 768, 8, torch.bfloat16, 16) == default_config(
        128, 2048, 768, 8, 16)


def test_tables_round_trip_and_bad_files_are_refused_naming_the_file(tmp_path):
    key = config_key(8, 64, 32, 2, torch.bfloat16)
    tables = TunedTables("Some GPU", (8, 9),
                         {key: ((4, MoeBlockConfig()), (64, MoeBlockConfig(32)))},
                         {key: MoeDecodeConfig()})
    path = tmp_path / "Some_GPU.json"
    save_tables(tables, path, "a test")
    assert load_tables(path) == tables
    text = path.read_text()
    path.write_text(text.replace('"gate_up_block_n": 32', '"gate_up_block_n": 24', 1))
    with pytest.raises(ValueError, match=r"Some_GPU.json is invalid.*gate_up_block_n=24"):
        load_tables(path)
    path.write_text(text.replace('"max_tokens": 64', '"max_tokens": 2'))
    with pytest.raises(ValueError, match="ascending max_tokens"):
        load_tables(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="Some_GPU.json is invalid"):
        load_tables(path)




@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "num_experts,top_k,hidden,intermediate,config",
    [
        (8, 2, 64, 32, None),  # the rule's config
        (64, 6, 96, 48, None),  # top_k not a power of two, H and I off the rule's tiles
        (64, 6, 96, 48, SMALL_DECODE),  # K steps divide H and I
        (16, 4, 80, 40, SMALL_DECODE),  # K steps do not divide H or I
    ],
)
def test_one_token_path_matches_reference(seed, dtype, num_experts, top_k, hidden, intermediate,
                                          config):
    x, w13, w2, topk_weights, topk_ids = make_inputs(1, num_experts, top_k, hidden, intermediate,
                                                     dtype)
    out = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, config=config)
    ref = fused_moe_reference(x, w13, w2, topk_weights, topk_ids)
    assert out.dtype == dtype and out.shape == x.shape
    # fp16: only the inputs and the output are rounded (activations stay fp32 on this path).
    assert rel_err(out, ref) < {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("config", [None, SMALL_DECODE])
def test_one_token_padding_ids_contribute_nothing(seed, config):
    x, w13, w2, topk_weights, topk_ids = make_inputs(1, 16, 4, 80, 40, torch.float32)
    topk_ids[0, 1] = -1
    topk_weights[0, 1] = float("nan")  # a padding weight is never read
    out = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, config=config)
    ref = fused_moe_reference(x, w13, w2, topk_weights, topk_ids)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]
    topk_ids[0, :] = -1
    out = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, config=config)
    assert torch.equal(out, torch.zeros_like(out))


def test_one_token_path_reads_slots_of_strided_weights(seed):
    x, w13, w2, topk_weights, topk_ids = make_inputs(1, 16, 4, 80, 40, torch.float16)
    strided13, strided2 = store_layout(w13, w2)
    expert_slot, pool13, pool2 = slot_pool(w13, w2, experts=topk_ids[0, :2].tolist(), num_slots=3)
    pool13[0].copy_(torch.randn_like(pool13[0]) * 80**-0.5)  # slot 0 now differs from w13
    swapped13 = w13.clone()
    swapped13[int(topk_ids[0, 0])] = pool13[0]
    for config in (None, SMALL_DECODE):
        out = fused_moe_triton(x, strided13, strided2, topk_weights, topk_ids, expert_slot,
                               pool13, pool2, config=config)
        ref = fused_moe_reference(x, swapped13, w2, topk_weights, topk_ids)
        assert rel_err(out, ref) < 2e-3


def test_one_token_never_aligns(seed, monkeypatch):
    """T == 1 skips the alignment: on the GEMV path, and on the grouped kernels where the
    tuned decode entry is None; T == 2 aligns (which the patched alignment breaks)."""
    x, w13, w2, topk_weights, topk_ids = make_inputs(2, 8, 2, 64, 32, torch.float32)

    def no_alignment(*args, **kwargs):
        raise RuntimeError("alignment ran")

    monkeypatch.setattr(KERNEL_MODULE, "align_by_expert", no_alignment)
    out = fused_moe_triton(x[:1], w13, w2, topk_weights[:1], topk_ids[:1])
    ref = fused_moe_reference(x[:1], w13, w2, topk_weights[:1], topk_ids[:1])
    assert rel_err(out, ref) < TOLERANCE[torch.float32]
    with pytest.raises(RuntimeError, match="alignment ran"):
        fused_moe_triton(x, w13, w2, topk_weights, topk_ids)
    tables = TunedTables("test GPU", decode={config_key(8, 64, 32, 2, torch.float32): None})
    assert select_decode_config(8, 64, 32, 2, torch.float32, tables) is None
    monkeypatch.setattr(KERNEL_MODULE, "_tables", lambda device: tables)

    def no_gemv(*args, **kwargs):
        raise RuntimeError("one-token GEMV ran")

    # The grouped kernels, one row block per choice: no alignment either.
    monkeypatch.setattr(KERNEL_MODULE, "one_token_moe", no_gemv)
    out = fused_moe_triton(x[:1], w13, w2, topk_weights[:1], topk_ids[:1])
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_decode_config_needs_one_token_and_valid_tiles():
    x, w13, w2, topk_weights, topk_ids = make_inputs(2, 8, 2, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="got T=2"):
        fused_moe_triton(x, w13, w2, topk_weights, topk_ids, config=MoeDecodeConfig())
    with pytest.raises(ValueError, match="down_block_n=3"):
        MoeDecodeConfig(down_block_n=3)


@pytest.mark.parametrize("shape", [(8, 4096, 14336, 2), (128, 2048, 768, 8)])
def test_decode_rule_fills_the_gpu_with_loads(shape):
    """~8 MB in flight per K step over >= 2 programs per SM (the rule's docstring says why)."""
    num_experts, hidden, intermediate, top_k = shape
    config = default_decode_config(num_experts, hidden, intermediate, top_k)
    gate_up_programs = top_k * math.ceil(intermediate / config.gate_up_block_n)
    down_programs = math.ceil(hidden / config.down_block_n)
    assert gate_up_programs >= 2 * 132 and down_programs >= 2 * 132
    down_elements = hidden * top_k * config.down_block_k
    assert down_elements >= 4 << 20 or config.down_block_k >= intermediate


@pytest.mark.gpu
def test_cpu_tensors_outside_the_interpreter_use_the_plain_torch_path(seed):
    x, w13, w2, topk_weights, topk_ids = make_inputs(5, 8, 2, 32, 16, torch.float32, "cpu")
    expert_slot, pool13, pool2 = slot_pool(w13, w2, experts=[1, 6], num_slots=2)
    out = fused_moe(x, w13, w2, topk_weights, topk_ids,
                    expert_slot=expert_slot, w13_slots=pool13, w2_slots=pool2)
    ref = fused_moe_reference(x, w13, w2, topk_weights, topk_ids, expert_slot, pool13, pool2)
    assert torch.equal(out, ref)


def gpu_inputs(shape, num_tokens, dtype):
    x, w13, w2, topk_weights, topk_ids = make_inputs(
        num_tokens, shape["num_experts"], shape["top_k"], shape["hidden"],
        shape["intermediate"], dtype, device="cuda")
    strided13, strided2 = store_layout(w13, w2)
    del w13, w2
    return x, strided13, strided2, topk_weights, topk_ids


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 256, 300])  # one-token, then block_m 16..128
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [QWEN3, MIXTRAL_FEW_EXPERTS], ids=["qwen3", "mixtral"])
def test_gpu_matches_reference(seed, shape, dtype, num_tokens):
    x, w13, w2, topk_weights, topk_ids = gpu_inputs(shape, num_tokens, dtype)
    out = fused_moe(x, w13, w2, topk_weights, topk_ids)
    assert rel_err(out, fused_moe_reference(x, w13, w2, topk_weights, topk_ids)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 4, 16])
@pytest.mark.parametrize("shape", [QWEN3, MIXTRAL_FEW_EXPERTS], ids=["qwen3", "mixtral"])
def test_gpu_first_col_leaves_out_the_columns_below_it(seed, shape, num_tokens):
    """bf16 on the real shapes, each path the GPU picks: an expert split at random columns (as
    the hybrid splits one) gives the reference's sum over the columns from first_col on."""
    x, w13, w2, topk_weights, topk_ids = gpu_inputs(shape, num_tokens, torch.bfloat16)
    first_col = random_first_cols(shape["num_experts"], shape["intermediate"], "cuda")
    first_col[topk_ids[0, 0]] = shape["intermediate"] // 2 + 8  # split mid-block
    out = fused_moe(x, w13, w2, topk_weights, topk_ids, first_col=first_col)
    ref = fused_moe_reference(x, w13, w2, topk_weights, topk_ids, first_col=first_col)
    assert rel_err(out, ref) < 1e-2


def table_cases():
    """Every tuned entry of every shipped GPU table (and each shape's one-token config), run on
    the tuned layer shape with fewer experts so a test stays within a few GB."""
    cases = []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        tables = load_tables(path)
        for key, entries in tables.grouped.items():
            num_experts, hidden, intermediate, top_k, _ = key
            shape = dict(num_experts=min(num_experts, 16 if top_k > 2 else 4), top_k=top_k,
                         hidden=hidden, intermediate=intermediate)
            name = f"{path.stem}-E{num_experts}-H{hidden}-I{intermediate}-k{top_k}"
            cases += [pytest.param(shape, t, c, id=f"{name}-T{t}") for t, c in entries]
            decode = select_decode_config(num_experts, hidden, intermediate, top_k,
                                          torch.bfloat16, tables)
            if decode is not None:
                cases.append(pytest.param(shape, 1, decode, id=f"{name}-one-token"))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("shape,num_tokens,config", table_cases())
def test_gpu_table_configs_compile_and_match_reference(seed, shape, num_tokens, config):
    x, w13, w2, topk_weights, topk_ids = gpu_inputs(shape, num_tokens, torch.bfloat16)
    out = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, config=config)
    assert rel_err(out, fused_moe_reference(x, w13, w2, topk_weights, topk_ids)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16])
def test_gpu_graph_replay_equals_eager_bitwise(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids = gpu_inputs(QWEN3, num_tokens, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused_moe(x, w13, w2, topk_weights, topk_ids)  # compile before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_moe(x, w13, w2, topk_weights, topk_ids)
    fresh = make_routing(num_tokens, 128, 8, 2048, torch.bfloat16, device="cuda")
    for static, new in zip((x, topk_weights, topk_ids), fresh, strict=True):
        static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, fused_moe(x, w13, w2, topk_weights, topk_ids))


@pytest.mark.gpu
def test_gpu_compile_fullgraph_matches_eager(seed):
    x, w13, w2, topk_weights, topk_ids = gpu_inputs(QWEN3, 16, torch.bfloat16)

    class MoeBlock(torch.nn.Module):
        def forward(self, x, topk_weights, topk_ids):
            return x + fused_moe(torch.nn.functional.rms_norm(x, (x.shape[-1],)), w13, w2,
                                 topk_weights, topk_ids)

    block = MoeBlock()
    compiled = torch.compile(block, fullgraph=True)
    eager = block(x, topk_weights, topk_ids)
    assert rel_err(compiled(x, topk_weights, topk_ids), eager) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 300])
def test_gpu_slots_holding_copies_are_bitwise_equal(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids = gpu_inputs(QWEN3, num_tokens, torch.bfloat16)
    expert_slot, pool13, pool2 = slot_pool(w13, w2, experts=range(0, 128, 2), num_slots=64)
    via_slots = fused_moe(x, w13, w2, topk_weights, topk_ids,
                          expert_slot=expert_slot, w13_slots=pool13, w2_slots=pool2)
    assert torch.equal(via_slots, fused_moe(x, w13, w2, topk_weights, topk_ids))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16])
def test_gpu_weights_in_pinned_host_memory_bitwise_equal(seed, num_tokens):
    shape = dict(QWEN3, num_experts=16)
    x, w13, w2, topk_weights, topk_ids = gpu_inputs(shape, num_tokens, torch.bfloat16)
    host13, host2 = store_layout(w13, w2, device="cpu", pin=True)
    on_host = fused_moe(x, host13, host2, topk_weights, topk_ids)
    assert torch.equal(on_host, fused_moe(x, w13, w2, topk_weights, topk_ids))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16])
def test_gpu_weights_in_managed_memory_bitwise_equal(seed, num_tokens):
    from moe_uvm.store import ManagedExpertStore

    shape = dict(QWEN3, num_experts=16)
    x, w13, w2, topk_weights, topk_ids = gpu_inputs(shape, num_tokens, torch.bfloat16)
    params = {"w13": ((2 * 768, 2048), torch.bfloat16), "w2": ((2048, 768), torch.bfloat16)}
    store = ManagedExpertStore(16, params, device="cuda:0")
    try:
        store["w13"].copy_(w13)
        store["w2"].copy_(w2)
        direct = fused_moe(x, w13, w2, topk_weights, topk_ids)
        for advise in (store.advise_offloaded, store.advise_resident):
            advise(range(16))
            on_store = fused_moe(x, store["w13"], store["w2"], topk_weights, topk_ids)
            assert torch.equal(on_store, direct), advise.__name__
    finally:
        store.free()


def test_programmatic_dependent_launch_only_on_cuda_and_can_be_turned_off(monkeypatch):
    pdl = importlib.import_module("moe_uvm.kernels.pdl")
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": False}
    pdl._supported.cache_clear()
    monkeypatch.setenv("MOE_UVM_PDL", "0")
    try:
        assert pdl._supported(0) is False  # decided before any CUDA query
    finally:
        pdl._supported.cache_clear()
