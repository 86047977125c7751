"""Expert parallelism (issue 19): the placement policy, and two gloo processes on the CPU
against one process, with the tokens replicated (all-reduce) and sharded (TokenExchange:
all-gather + reduce-scatter, all-to-all).

Tolerance against one process: each rank sums its experts' part of a token's output and one
fp32 all-reduce adds the parts, so the per-token sum is split in two: fp32 layers agree to
||out - ref|| / ||ref|| < 1e-5 (rounding only). The two ranks' outputs are bitwise equal."""

import datetime
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_uvm.kernels import fused_moe
from moe_uvm.layer import FusedMoE
from moe_uvm.parallel import (
    EXCHANGES,
    ExpertParallelMoE,
    TokenExchange,
    exit_spawned_rank,
    shard_moe_layers,
)
from moe_uvm.policies.placement import place_experts, rank_loads


def test_every_expert_has_one_owner_and_ranks_hold_equal_shares():
    counts = np.random.default_rng(0).zipf(1.5, size=(3, 10)).astype(float)
    owner = place_experts(10, 4, counts)
    assert owner.shape == (3, 10) and owner.min() == 0 and owner.max() == 3
    for row in owner:
        assert sorted(np.bincount(row, minlength=4)) == [2, 2, 3, 3]


def test_placement_spreads_the_hot_experts():
    rng = np.random.default_rng(1)
    counts = rng.zipf(1.3, size=(6, 64)).astype(float)
    loads = rank_loads(place_experts(64, 2, counts), counts)
    # Greedy over descending counts: the heavier rank leads by at most one expert's count.
    assert np.all(loads.max(1) - loads.min(1) <= counts.max(1) + 1e-9)
    # Round-robin (the default without a profile) is worse on these skewed counts.
    naive = rank_loads(place_experts(64, 2, num_layers=6), counts)
    assert (loads.max(1) <= naive.max(1)).all() and (loads.max(1) < naive.max(1)).any()


def test_placement_is_deterministic_and_refuses_bad_input():
    counts = np.ones((2, 8))
    assert np.array_equal(place_experts(8, 2, counts), place_experts(8, 2, counts))
    assert place_experts(8, 2, counts)[0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]  # ties by id
    with pytest.raises(ValueError, match="at least one expert"):
        place_experts(4, 5, np.ones((1, 4)))
    with pytest.raises(ValueError, match="counts are for 8 experts"):
        place_experts(6, 2, counts)
    with pytest.raises(ValueError, match="needs counts, or num_layers"):
        place_experts(6, 2)


def test_the_wrapper_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        ExpertParallelMoE(FusedMoE(4, 2, 8, 4, dtype=torch.float32, device="cpu"), [0, 1, 0, 1])


def _random_layer(seed: int, dtype=torch.float32) -> FusedMoE:
    torch.manual_seed(seed)
    layer = FusedMoE(8, 2, 32, 16, dtype=dtype, device="cpu")
    with torch.no_grad():
        layer.w13_weight.copy_(torch.randn_like(layer.w13_weight, dtype=torch.float32) * 0.2)
        layer.w2_weight.copy_(torch.randn_like(layer.w2_weight, dtype=torch.float32) * 0.2)
    return layer


class _TwoLayers(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.moe = torch.nn.ModuleList([_random_layer(seed), _random_layer(seed + 1)])
        self.gate = torch.nn.ModuleList([torch.nn.Linear(32, 8) for _ in range(2)])

    def forward(self, h):
        for gate, moe in zip(self.gate, self.moe, strict=True):
            h = h + moe(h, gate(h))
        return h


def _worker(rank: int, world: int, rendezvous: str, seed: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(seed)
        hidden = torch.randn(5, 32)
        logits = torch.randn(5, 8)
        layer = _random_layer(seed)
        ref = layer(hidden, logits)
        counts = np.random.default_rng(seed).zipf(1.5, size=(1, 8)).astype(float)
        wrapper = ExpertParallelMoE(layer, place_experts(8, world, counts)[0])
        out = wrapper(hidden, logits)
        assert len(wrapper.owned) == 4, wrapper
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < 1e-5, err
        gathered = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(gathered, out)
        assert all(torch.equal(gathered[0], g) for g in gathered), "ranks disagree"

        model = _TwoLayers(seed)
        h = torch.randn(3, 32)
        ref = model(h)
        shard_moe_layers(model, place_experts(8, world, num_layers=2))
        assert all(isinstance(m, ExpertParallelMoE) for m in model.moe)
        err = ((model(h) - ref).norm() / ref.norm()).item()
        assert err < 1e-5, err
        dist.barrier()  # neither rank tears down while the other may still be communicating
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()  # past a clean finish only: failures above reach the parent


def test_two_gloo_processes_match_one_process(tmp_path):
    rendezvous = tmp_path / "rendezvous"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, str(rendezvous), 1234), nprocs=2, join=True)


def test_token_exchange_refuses_bad_input_before_needing_a_group():
    with pytest.raises(ValueError, match="mode must be one of"):
        TokenExchange([0, 1], 2, 1, 8, mode="ring", dtype=torch.float32, device="cpu")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed initialised"):
            TokenExchange([0, 1], 2, 1, 8, mode="all-to-all", dtype=torch.float32,
                          device="cpu")


def _exchange_worker(rank: int, world: int, rendezvous: str, seed: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        E, k, H, T = 8, 3, 32, 4  # T rows per rank (the layer: 8 experts, hidden 32)
        layer = _random_layer(seed)
        w13, w2 = layer.w13_weight.data, layer.w2_weight.data
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randn(world * T, H, generator=gen)
        weights = torch.rand(world * T, k, generator=gen) + 0.1
        owner = place_experts(E, world, num_layers=1)[0]
        mine = np.flatnonzero(owner == rank)
        cases = {
            "random": torch.stack([torch.randperm(E, generator=gen)[:k]
                                   for _ in range(world * T)]),
            # every pair of every rank bound to one rank's experts: the full capacity
            "one rank": torch.from_numpy(np.flatnonzero(owner == 1)[:k]).repeat(world * T, 1),
            "padding": torch.stack([torch.randperm(E, generator=gen)[:k]
                                    for _ in range(world * T)]),
        }
        cases["padding"][::2, 1] = -1
        local_w13, local_w2 = w13[torch.from_numpy(mine)], w2[torch.from_numpy(mine)]

        def kernel(x, topk_weights, local_ids):
            return fused_moe(x, local_w13, local_w2, topk_weights, local_ids)

        slice_ = slice(rank * T, (rank + 1) * T)
        for name, ids in cases.items():
            ids = ids.to(torch.int32)
            ref = fused_moe(rows, w13, w2, weights, ids)[slice_]
            for mode in EXCHANGES:
                exchange = TokenExchange(owner, T, k, H, mode=mode, dtype=torch.float32,
                                         device="cpu")
                out = exchange(rows[slice_], weights[slice_], ids[slice_], kernel)
                assert out.dtype == torch.float32 and out.shape == (T, H)
                err = ((out - ref).norm() / ref.norm()).item()
                assert err < 1e-5, (name, mode, err)
        with pytest.raises(ValueError, match=r"rows \[4, 32\] and ids \[4, 3\] expected"):
            exchange(rows, weights, ids, kernel)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()


def test_token_exchange_over_two_gloo_processes_matches_one_process(tmp_path):
    """Each rank's rows through both exchanges equal the one-process layer within fp32
    rounding (< 1e-5), also when every pair goes to one rank (the all-to-all's worst case,
    its whole capacity) and with padding ids."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_exchange_worker, args=(2, str(tmp_path / "rendezvous"), 99), nprocs=2,
             join=True)
