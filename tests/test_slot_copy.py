"""Filling GPU expert slots, both ways: copy_experts_to_slots (prefetch) and fused_moe's
fill_slot (fill-on-read), checked bitwise against the experts and the plain-torch references.

Unmarked tests run the Triton kernels (in the interpreter on CPU) on small shapes whose H and I
are not multiples of the tiles, in fp16/fp32, with slot pools of fresh random values so that a
missed or stray write shows. GPU tests use a Qwen3-30B-A3B-shaped layer in bf16, weights in
managed memory advised offloaded, and CUDA-graph capture.
"""

import pytest
import torch

from moe_uvm.kernels import (
    copy_experts_to_slots,
    copy_experts_to_slots_reference,
    fused_moe,
    fused_moe_reference,
)
from moe_uvm.kernels.fused_moe import MoeBlockConfig, fused_moe_triton
from moe_uvm.kernels.slot_copy import CHUNK_BYTES

from helpers import (
    DEVICE,
    SMALL_DECODE,
    TOLERANCE,
    make_inputs,
    make_routing,
    rel_err,
    store_layout,
)

# Grouped path with every edge ragged: N tiles of 16 over I=40 and of 32 over H=80, K steps of
# 32 over H=80, and split-K 3 over I=40 in K steps of 16 ([0, 16), [16, 32), [32, 40)).
RAGGED_SPLIT_K = MoeBlockConfig(gate_up_block_n=16, gate_up_block_k=32, down_block_n=32,
                                down_block_k=16, down_split_k=3)


def random_pool(w13, w2, num_slots: int, strided: bool = True):
    """A slot pool of fresh random values, strided as the store lays experts out or dense."""
    pool13 = torch.randn((num_slots, *w13.shape[1:]), device=w13.device).to(w13.dtype)
    pool2 = torch.randn((num_slots, *w2.shape[1:]), device=w2.device).to(w2.dtype)
    return store_layout(pool13, pool2) if strided else (pool13, pool2)


def slot_map(num_experts: int, entries: dict[int, int], device) -> torch.Tensor:
    out = torch.full((num_experts,), -1, dtype=torch.int32)
    for expert, slot in entries.items():
        out[expert] = slot
    return out.to(device)


def assert_slot_holds(pool13, pool2, slot, w13, w2, expert):
    assert torch.equal(pool13[slot], w13[expert]), (slot, expert)
    assert torch.equal(pool2[slot], w2[expert]), (slot, expert)


def assert_untouched(pool13, pool2, before13, before2, slots):
    for slot in slots:
        assert torch.equal(pool13[slot], before13[slot]), slot
        assert torch.equal(pool2[slot], before2[slot]), slot


@pytest.mark.parametrize(
    "dtype,num_tokens,num_experts,top_k,hidden,intermediate,config",
    [
        pytest.param(torch.float32, 1, 8, 4, 80, 40, None, id="one-token-rule-fp32"),
        pytest.param(torch.float16, 1, 16, 4, 80, 40, SMALL_DECODE,
                     id="one-token-ragged-k-steps-fp16"),
        pytest.param(torch.float16, 1, 16, 4, 80, 40, RAGGED_SPLIT_K,
                     id="one-token-row-blocks-split-k-fp16"),
        pytest.param(torch.float32, 64, 6, 2, 80, 40, RAGGED_SPLIT_K,
                     id="grouped-row-blocks-split-k-fp32"),
        pytest.param(torch.float16, 64, 6, 2, 80, 40, RAGGED_SPLIT_K,
                     id="grouped-row-blocks-split-k-fp16"),
        pytest.param(torch.float16, 19, 8, 2, 64, 32, None, id="grouped-rule-fp16"),
    ],
)
def test_fill_on_read_copies_exactly_the_experts_read_from_weights(
        seed, dtype, num_tokens, num_experts, top_k, hidden, intermediate, config):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, num_experts, top_k, hidden,
                                                     intermediate, dtype)
    idle = num_experts - 1
    topk_ids[topk_ids == idle] = -1  # padding: `idle` is read by nobody, yet has a fill slot
    if config is RAGGED_SPLIT_K and num_tokens > 1:
        assert int(torch.bincount(topk_ids[topk_ids >= 0]).max()) > 16  # several row blocks
    w13, w2 = store_layout(w13, w2)
    pool13, pool2 = random_pool(w13, w2, 5)
    routed = [e for e in topk_ids.unique().tolist() if e >= 0]
    from_slot, filled = routed[0], routed[1:3]
    targets = dict(zip(filled, (2, 4), strict=False))
    pool13[0].copy_(w13[from_slot])
    pool2[0].copy_(w2[from_slot])
    expert_slot = slot_map(num_experts, {from_slot: 0}, w13.device)
    # A slot for an expert read from its slot copy (3) and one for an idle expert (1): unused.
    fill_slot = slot_map(num_experts, {from_slot: 3, idle: 1, **targets},
                         w13.device)
    slots = dict(expert_slot=expert_slot, w13_slots=pool13, w2_slots=pool2)
    before13, before2 = pool13.clone(), pool2.clone()
    plain = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, **slots, config=config)
    out = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, **slots, fill_slot=fill_slot,
                           config=config)
    assert torch.equal(out, plain)
    for expert, slot in targets.items():
        assert_slot_holds(pool13, pool2, slot, w13, w2, expert)
    assert_untouched(pool13, pool2, before13, before2, [0, 1, 3] + [4] * (len(filled) < 2))
    ref13, ref2 = before13.clone(), before2.clone()
    ref = fused_moe_reference(x, w13, w2, topk_weights, topk_ids, expert_slot, ref13, ref2,
                              fill_slot)
    assert torch.equal(ref13, pool13) and torch.equal(ref2, pool2)
    assert rel_err(out, ref) < TOLERANCE[dtype]
    # Commit: the next call reads the filled slots.
    expert_slot.copy_(slot_map(num_experts, {from_slot: 0, **targets}, w13.device))
    assert torch.equal(fused_moe_triton(x, w13, w2, topk_weights, topk_ids, **slots,
                                        config=config), plain)


@pytest.mark.parametrize("num_tokens", [1, 9])
def test_fill_without_a_slot_map_fills_every_routed_expert(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, 6, 2, 48, 24, torch.float16)
    routed = topk_ids.unique().tolist()
    pool13, pool2 = random_pool(w13, w2, len(routed) + 1, strided=False)
    fill_slot = slot_map(6, {e: s for s, e in enumerate(routed)}, w13.device)
    before13, before2 = pool13.clone(), pool2.clone()
    out = fused_moe(x, w13, w2, topk_weights, topk_ids, w13_slots=pool13, w2_slots=pool2,
                    fill_slot=fill_slot)
    assert torch.equal(out, fused_moe(x, w13, w2, topk_weights, topk_ids))
    for slot, expert in enumerate(routed):
        assert_slot_holds(pool13, pool2, slot, w13, w2, expert)
    assert_untouched(pool13, pool2, before13, before2, [len(routed)])


@pytest.mark.parametrize("num_tokens", [1, 6])
def test_fill_compiles_fullgraph_and_passes_opcheck(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, 8, 2, 32, 16, torch.float32)
    pool13, pool2 = random_pool(w13, w2, 3)  # two views of one buffer, both mutated
    expert = int(topk_ids[0, 0])
    fill_slot = slot_map(8, {expert: 2}, w13.device)

    def moe_block(x, topk_weights, topk_ids):
        return x + fused_moe(2 * x, w13, w2, topk_weights, topk_ids, w13_slots=pool13,
                             w2_slots=pool2, fill_slot=fill_slot)

    compiled = torch.compile(moe_block, fullgraph=True, backend="aot_eager")
    out = compiled(x, topk_weights, topk_ids)
    assert_slot_holds(pool13, pool2, 2, w13, w2, expert)  # the compiled graph kept the writes
    assert torch.equal(out, moe_block(x, topk_weights, topk_ids))
    torch.library.opcheck(torch.ops.moe_uvm.fused_moe_fill.default,
                          (x, w13, w2, topk_weights, topk_ids, None, pool13, pool2, fill_slot,
                           None, None, None))


def copy_case(dtype, strided: bool, device=DEVICE):
    """Six experts whose w13 (2*72*160) spans several copy chunks, the last one partial."""
    w13 = torch.randn(6, 144, 160, device=device).to(dtype)
    w2 = torch.randn(6, 160, 72, device=device).to(dtype)
    assert w13[0].numel() > CHUNK_BYTES // w13.element_size()
    assert w13[0].numel() % (CHUNK_BYTES // w13.element_size())
    source = store_layout(w13, w2) if strided else (w13, w2)
    return w13, w2, source, random_pool(w13, w2, 5, strided)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("strided", [True, False], ids=["strided", "dense"])
def test_copy_moves_exactly_the_listed_experts(seed, dtype, strided):
    w13, w2, (src13, src2), (pool13, pool2) = copy_case(dtype, strided)
    copy_experts = torch.tensor([3, -1, 0, 5, 1], dtype=torch.int32, device=DEVICE)
    copy_slots = torch.tensor([1, 2, -1, 4, -1], dtype=torch.int32, device=DEVICE)
    before13, before2 = pool13.clone(), pool2.clone()
    copy_experts_to_slots(src13, src2, copy_experts, copy_slots, pool13, pool2)
    assert_slot_holds(pool13, pool2, 1, w13, w2, 3)
    assert_slot_holds(pool13, pool2, 4, w13, w2, 5)
    assert_untouched(pool13, pool2, before13, before2, [0, 2, 3])
    ref13, ref2 = before13.clone(), before2.clone()
    copy_experts_to_slots_reference(src13, src2, copy_experts, copy_slots, ref13, ref2)
    assert torch.equal(ref13, pool13) and torch.equal(ref2, pool2)


def test_copy_of_no_pairs_or_only_skipped_pairs_writes_nothing(seed):
    w13, w2, (src13, src2), (pool13, pool2) = copy_case(torch.float16, strided=True)
    before13, before2 = pool13.clone(), pool2.clone()
    for experts, slots in (([], []), ([-1, 2, -1], [0, -1, -1])):
        experts, slots = (torch.tensor(ids, dtype=torch.int32, device=DEVICE)
                          for ids in (experts, slots))
        copy_experts_to_slots(src13, src2, experts, slots, pool13, pool2)
    assert torch.equal(pool13, before13) and torch.equal(pool2, before2)


def test_copied_slots_serve_fused_moe_bitwise(seed):
    x, w13, w2, topk_weights, topk_ids = make_inputs(1, 8, 4, 80, 40, torch.float16)
    pool13, pool2 = random_pool(w13, w2, 4)
    chosen = topk_ids[0, :3].to(torch.int32)
    slots = torch.arange(3, dtype=torch.int32, device=DEVICE)
    copy_experts_to_slots(w13, w2, chosen, slots, pool13, pool2)
    expert_slot = slot_map(8, {int(e): s for s, e in enumerate(chosen)}, w13.device)
    via_slots = fused_moe(x, w13, w2, topk_weights, topk_ids, expert_slot=expert_slot,
                          w13_slots=pool13, w2_slots=pool2)
    assert torch.equal(via_slots, fused_moe(x, w13, w2, topk_weights, topk_ids))


def test_copy_compiles_fullgraph_and_passes_opcheck(seed):
    w13, w2, (src13, src2), (pool13, pool2) = copy_case(torch.float32, strided=True)
    copy_experts = torch.tensor([4, 1], dtype=torch.int32, device=DEVICE)
    copy_slots = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)

    def prefetch(copy_experts, copy_slots):
        copy_experts_to_slots(src13, src2, copy_experts, copy_slots, pool13, pool2)
        return pool13.sum()

    torch.compile(prefetch, fullgraph=True, backend="aot_eager")(copy_experts, copy_slots)
    assert_slot_holds(pool13, pool2, 0, w13, w2, 4)
    assert_slot_holds(pool13, pool2, 3, w13, w2, 1)
    torch.library.opcheck(torch.ops.moe_uvm.copy_experts_to_slots.default,
                          (src13, src2, copy_experts, copy_slots, pool13, pool2))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(copy_experts=a["copy_experts"].long()), "copy_experts is torch.int64"),
        (lambda a: a.update(copy_slots=a["copy_slots"][:1]), "copy_slots has shape"),
        (lambda a: a.update(w13_slots=a["w13_slots"][:, :, :80]), "w13_slots is"),
        (lambda a: a.update(w2_slots=a["w2_slots"].double()), "w2_slots is torch.float64"),
        (lambda a: a.update(w2_slots=a["w2_slots"][:2]), "w2_slots has 2 slots"),
        (lambda a: a.update(w13=a["w13"].transpose(1, 2).contiguous().transpose(1, 2)),
         "dims 1 and 2 must be contiguous"),
        (lambda a: a.update(w2=a["w2"][:4]), "the same E"),
    ],
)
def test_copy_rejects_bad_inputs(change, message):
    w13, w2, _, (pool13, pool2) = copy_case(torch.float32, strided=False)
    ids = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    args = dict(w13=w13, w2=w2, copy_experts=ids, copy_slots=ids.clone(), w13_slots=pool13,
                w2_slots=pool2)
    change(args)
    with pytest.raises(ValueError, match=message):
        copy_experts_to_slots(**args)


# --- GPU: a Qwen3-30B-A3B-shaped layer (H=2048, I=768, top-8) in bf16 ----------------------

QWEN3_64 = dict(num_experts=64, top_k=8, hidden=2048, intermediate=768)
NUM_SLOTS = 8


def gpu_layer(num_tokens: int, num_experts: int = 64):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, num_experts, 8, 2048, 768,
                                                     torch.bfloat16, device="cuda")
    w13, w2 = store_layout(w13, w2)
    return x, w13, w2, topk_weights, topk_ids, random_pool(w13, w2, NUM_SLOTS, strided=False)


def managed_copy(w13, w2):
    """The weights in a managed expert store advised offloaded (read over PCIe)."""
    from moe_uvm.store import ManagedExpertStore

    specs = {"w13": (tuple(w13.shape[1:]), w13.dtype), "w2": (tuple(w2.shape[1:]), w2.dtype)}
    store = ManagedExpertStore(w13.shape[0], specs, device="cuda:0")
    store["w13"].copy_(w13)
    store["w2"].copy_(w2)
    store.advise_offloaded(range(w13.shape[0]))
    torch.cuda.synchronize()
    return store


@pytest.mark.gpu
@pytest.mark.parametrize(
    "num_tokens,config",
    [(1, None), (16, None), (16, MoeBlockConfig(down_block_k=128, down_split_k=3)), (64, None)],
    ids=["one-token", "grouped", "grouped-split-k", "grouped-T64"],
)
def test_gpu_fill_on_read_is_bitwise(seed, num_tokens, config):
    x, w13, w2, topk_weights, topk_ids, (pool13, pool2) = gpu_layer(num_tokens)
    routed = topk_ids.unique().tolist()
    pool13[0].copy_(w13[routed[0]])
    pool2[0].copy_(w2[routed[0]])
    filled = dict(zip(routed[1:NUM_SLOTS], range(1, NUM_SLOTS), strict=False))
    expert_slot = slot_map(64, {routed[0]: 0}, "cuda")
    fill_slot = slot_map(64, {routed[0]: 1, **filled}, "cuda")
    slots = dict(expert_slot=expert_slot, w13_slots=pool13, w2_slots=pool2)
    direct = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, config=config)
    out = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, **slots, fill_slot=fill_slot,
                           config=config)
    assert torch.equal(out, direct)
    assert_slot_holds(pool13, pool2, 0, w13, w2, routed[0])
    for expert, slot in filled.items():
        assert_slot_holds(pool13, pool2, slot, w13, w2, expert)
    expert_slot.copy_(slot_map(64, {routed[0]: 0, **filled}, "cuda"))
    assert torch.equal(fused_moe_triton(x, w13, w2, topk_weights, topk_ids, **slots,
                                        config=config), direct)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16])
def test_gpu_copy_and_fill_from_offloaded_managed_memory(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids, (pool13, pool2) = gpu_layer(num_tokens, num_experts=16)
    store = managed_copy(w13, w2)
    try:
        routed = topk_ids.unique().tolist()
        prefetched, filled = routed[:2], routed[2:NUM_SLOTS]
        copy_experts = torch.tensor([prefetched[0], -1, prefetched[1]], dtype=torch.int32,
                                    device="cuda")
        copy_slots = torch.tensor([0, 5, 1], dtype=torch.int32, device="cuda")
        before13, before2 = pool13.clone(), pool2.clone()
        copy_experts_to_slots(store["w13"], store["w2"], copy_experts, copy_slots, pool13, pool2)
        for slot, expert in enumerate(prefetched):
            assert_slot_holds(pool13, pool2, slot, w13, w2, expert)
        assert_untouched(pool13, pool2, before13, before2, range(2, NUM_SLOTS))
        expert_slot = slot_map(16, dict(zip(prefetched, (0, 1), strict=True)), "cuda")
        fill_slot = slot_map(16, dict(zip(filled, range(2, NUM_SLOTS), strict=False)), "cuda")
        out = fused_moe(x, store["w13"], store["w2"], topk_weights, topk_ids,
                        expert_slot=expert_slot, w13_slots=pool13, w2_slots=pool2,
                        fill_slot=fill_slot)
        assert torch.equal(out, fused_moe(x, w13, w2, topk_weights, topk_ids))
        for slot, expert in enumerate(filled, start=2):
            assert_slot_holds(pool13, pool2, slot, w13, w2, expert)
    finally:
        store.free()


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16])
def test_gpu_graph_replay_of_copy_and_fill_equals_eager(seed, num_tokens):
    """One captured step: prefetch copy, then fused_moe reading the prefetched slots and
    filling others, replayed with new routing and maps; it matches eager bitwise."""
    x, w13, w2, topk_weights, topk_ids, (pool13, pool2) = gpu_layer(num_tokens, num_experts=16)
    store = managed_copy(w13, w2)
    try:
        maps = [torch.full((16,), -1, dtype=torch.int32, device="cuda") for _ in range(2)]
        copy_experts = torch.full((2,), -1, dtype=torch.int32, device="cuda")
        copy_slots = torch.tensor([0, 1], dtype=torch.int32, device="cuda")

        def step():
            copy_experts_to_slots(store["w13"], store["w2"], copy_experts, copy_slots, pool13,
                                  pool2)
            return fused_moe(x, store["w13"], store["w2"], topk_weights, topk_ids,
                             expert_slot=maps[0], w13_slots=pool13, w2_slots=pool2,
                             fill_slot=maps[1])

        def plan():
            """Fresh routing; prefetch two routed experts into slots 0-1 (their expert_slot
            set ahead of the copy, as plan_prefetch does), fill the rest; slots re-randomized."""
            for static, new in zip((x, topk_weights, topk_ids),
                                   make_routing(num_tokens, 16, 8, 2048, torch.bfloat16, "cuda"),
                                   strict=True):
                static.copy_(new)
            routed = topk_ids.unique().tolist()
            copy_experts.copy_(torch.tensor(routed[:2], dtype=torch.int32))
            maps[0].copy_(slot_map(16, dict(zip(routed[:2], (0, 1), strict=True)), "cpu"))
            maps[1].copy_(slot_map(16, dict(zip(routed[2:], range(2, NUM_SLOTS), strict=False)),
                                   "cpu"))
            pool13.normal_()
            pool2.normal_()
            return routed[:NUM_SLOTS]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile both kernels outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for _ in range(2):
            cached = plan()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured, fused_moe(x, w13, w2, topk_weights, topk_ids))
            for slot, expert in enumerate(cached):
                assert_slot_holds(pool13, pool2, slot, w13, w2, expert)
            replayed13, replayed2 = pool13.clone(), pool2.clone()
            pool13.normal_()
            pool2.normal_()
            assert torch.equal(step(), captured)
            assert torch.equal(pool13[:len(cached)], replayed13[:len(cached)])
            assert torch.equal(pool2[:len(cached)], replayed2[:len(cached)])
    finally:
        store.free()


@pytest.mark.gpu
def test_gpu_compile_fullgraph_with_fill_matches_eager(seed):
    x, w13, w2, topk_weights, topk_ids, (pool13, pool2) = gpu_layer(16)
    routed = topk_ids.unique().tolist()[:NUM_SLOTS]
    fill_slot = slot_map(64, {e: s for s, e in enumerate(routed)}, "cuda")

    def moe_block(x, topk_weights, topk_ids):
        return x + fused_moe(x, w13, w2, topk_weights, topk_ids, w13_slots=pool13,
                             w2_slots=pool2, fill_slot=fill_slot)

    out = torch.compile(moe_block, fullgraph=True)(x, topk_weights, topk_ids)
    for slot, expert in enumerate(routed):
        assert_slot_holds(pool13, pool2, slot, w13, w2, expert)
    assert torch.equal(out, moe_block(x, topk_weights, topk_ids))


@pytest.mark.gpu
def test_gpu_cpu_tensors_outside_the_interpreter_fill_and_copy_in_plain_torch(seed):
    x, w13, w2, topk_weights, topk_ids = make_inputs(5, 8, 2, 32, 16, torch.float32, "cpu")
    pool13, pool2 = random_pool(w13, w2, 3)
    routed = topk_ids.unique().tolist()
    fill_slot = slot_map(8, {routed[0]: 0, routed[1]: 2}, "cpu")
    out = fused_moe(x, w13, w2, topk_weights, topk_ids, w13_slots=pool13, w2_slots=pool2,
                    fill_slot=fill_slot)
    assert torch.equal(out, fused_moe_reference(x, w13, w2, topk_weights, topk_ids))
    assert_slot_holds(pool13, pool2, 0, w13, w2, routed[0])
    assert_slot_holds(pool13, pool2, 2, w13, w2, routed[1])
    copy_experts_to_slots(w13, w2, torch.tensor([5], dtype=torch.int32),
                          torch.tensor([1], dtype=torch.int32), pool13, pool2)
    assert_slot_holds(pool13, pool2, 1, w13, w2, 5)
