"""`moe-uvm bench --nproc N` (issue 19): the decode benchmark's MoE layers under expert
parallelism, one process per GPU, against one GPU in the same run.

Every rank builds the same synthetic layers (same seed, same trace), keeps the experts
`ExpertParallel.place` gives it (the calibration profile balanced over the ranks) in its own
managed stores, and runs the same decode steps: each layer's kernel over its experts (other
ranks' are padding), one fp32 all-reduce of the parts, the residual add; on a GPU the whole step
is one CUDA graph, the all-reduces captured (NCCL). Rows, by the fraction of expert bytes
resident in total:

  one-gpu    rank 0 alone, all experts, profile residency at the fraction (the `profile` row
             of `moe-uvm bench`); the other ranks wait
  ep         every rank at the same fraction of its own experts: the same resident bytes in
             total, each GPU holding 1/N of them
  ep-full    every rank resident up to the one-GPU budget on its own (N x the bytes in total)
  ep-ag      as ep, with the tokens sharded over the ranks too (each rank B/N rows and their
             routing, as under data-parallel attention): all-gather of the rows, one
             reduce-scatter of the sums (`TokenExchange`, mode all-gather)
  ep-a2a     the same shards, each (token, expert) pair sent to its expert's rank and its
             output back (all-to-all, fixed capacity); ep-ag and ep-a2a need B divisible by N

with the ceilings measured first: HBM read, and read-through of host-resident managed memory
from rank 0 alone and from every rank at once (their sum is what N links give). Outputs are
compared with the one-GPU row's first timed step (relative error: the per-token sum is split
over the ranks, so not bitwise)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from moe_uvm import ceilings
from moe_uvm.kernels import fused_moe
from moe_uvm.parallel import (
    ExpertParallel,
    ExpertShard,
    TokenExchange,
    all_gather_rows,
    run_ranks,
)
from moe_uvm.simulate import resident_sizes
from moe_uvm.tools.bench import (
    Workload,
    managed_layers,
    managed_residency,
    run_captured,
)
from moe_uvm.tools.bench_sweep import (
    CPU_NOTE,
    BenchConfig,
    _advise,
    _steps,
    load_inputs,
    make_workload,
    workload_layers,
)


def _local_workload(work: Workload, ep: ExpertParallel) -> Workload:
    """The rank's share of `work`: its experts' weights (and FP8 scales) of every layer, the
    profile sliced to them."""
    owned = [torch.as_tensor(ep.owned(layer), device=work.device)
             for layer in range(work.num_layers)]
    quant = [dict(q, w13_scale=q["w13_scale"].index_select(0, o),
                  w2_scale=q["w2_scale"].index_select(0, o))
             for q, o in zip(work.quant, owned, strict=False)]
    return replace(work, num_experts=len(owned[0]),
                   w13=[w.index_select(0, o) for w, o in zip(work.w13, owned, strict=True)],
                   w2=[w.index_select(0, o) for w, o in zip(work.w2, owned, strict=True)],
                   profile=ep.local_profile(work.profile), quant=quant)


def _reduce(part: torch.Tensor) -> torch.Tensor:
    summed = part.float()
    dist.all_reduce(summed)
    return summed.to(part.dtype)


def _sharded_step(exchanges: list[TokenExchange]):
    """decode_step with the tokens sharded: h, ids and weights are this rank's rows."""

    def step(h, ids, weights, layers):
        for layer, (w, exchange) in enumerate(zip(layers, exchanges, strict=True)):
            def kernel(rows, topk_weights, local_ids, w=w):
                return fused_moe(rows, w.w13, w.w2, topk_weights, local_ids,
                                 expert_slot=w.expert_slot, w13_slots=w.w13_slots,
                                 w2_slots=w.w2_slots, **w.quant)
            h = h + exchange(h, weights[layer], ids[layer], kernel).to(h.dtype)
        return h

    return step


def _gather_rows(mine: torch.Tensor, world: int) -> torch.Tensor:
    everyone = mine.new_empty(world * mine.shape[0], *mine.shape[1:])
    all_gather_rows(everyone, mine.contiguous())
    return everyone


def _concurrent_read_through(cuda: bool) -> dict[str, float]:
    """Read-through GB/s of rank 0 alone, then of every rank at once (summed)."""
    if not cuda:
        return {}
    alone = torch.zeros(1, dtype=torch.float64, device="cuda")
    if dist.get_rank() == 0:
        alone.fill_(ceilings.read_through_gbps())
    dist.barrier()
    both = torch.tensor([ceilings.read_through_gbps()], dtype=torch.float64, device="cuda")
    dist.all_reduce(both)
    dist.broadcast(alone, 0)
    return {"read_through_gbps": alone.item(), "read_through_all_ranks_gbps": both.item(),
            "hbm_read_gbps": ceilings.hbm_read_gbps()}


def _layers_everywhere(cfg: BenchConfig, device: torch.device) -> BenchConfig:
    """cfg with the layer count every rank can hold (each caps it by its free memory)."""
    trace, shape, _ = load_inputs(cfg)
    layers = torch.tensor([workload_layers(cfg, trace, shape)], device=device)
    dist.all_reduce(layers, op=dist.ReduceOp.MIN)
    return replace(cfg, layers=int(layers.item()))


def _rank(rank: int, world: int, device: torch.device, cfg: BenchConfig, out: str) -> None:
    cuda = device.type == "cuda"
    bw = _concurrent_read_through(cuda)
    work = make_workload(_layers_everywhere(cfg, device))
    ep = ExpertParallel.place(work.num_layers, work.num_experts, work.profile)
    E, L = work.num_experts, work.num_layers
    sizes = resident_sizes(cfg.resident, E)
    runs = {}
    for batch in cfg.batches:
        warm, timed = _steps(cfg, work, batch)
        ids, weights = work.routing(batch, warm + timed)
        h0 = torch.randn(batch, work.hidden, generator=torch.Generator().manual_seed(batch))
        runs[batch] = dict(warm=warm, timed=timed, ids=ids, weights=weights,
                           h0=h0.to(work.dtype).to(device))
    records = []

    def record(method, batch, n, ms, out_step, resident_bytes, **extra):
        runs_b = runs[batch]
        rec = dict(method=method, batch=batch, resident=n, budget_fraction=n / E,
                   step_ms=ms, tokens_per_s=batch / ms * 1e3, resident_gb=resident_bytes / 1e9,
                   warmup_steps=runs_b["warm"], timed_steps=runs_b["timed"], **extra)
        ref = runs_b.get(("ref", n))
        if ref is not None:
            rec["rel_err_vs_one_gpu"] = ((out_step.float() - ref.float()).norm()
                                         / ref.float().norm()).item()
        records.append(rec)

    # One GPU: rank 0 with every expert, the others waiting.
    if rank == 0:
        manager, layers = managed_layers(work)
        for batch in cfg.batches:
            r = runs[batch]
            for n in sizes:
                _advise(manager, managed_residency(work, "profile", n))
                ms, first = run_captured(work, layers, r["ids"], r["weights"], r["h0"],
                                         warmup=r["warm"])
                record("one-gpu", batch, n, ms, first, manager.resident_bytes())
                r[("ref", n)] = first
        manager.close()
        del manager, layers
        if cuda:
            torch.cuda.empty_cache()
    dist.barrier()
    local = _local_workload(work, ep)
    shards = [ExpertShard(torch.as_tensor(ep.owned(layer)), E, None, device)
              for layer in range(L)]
    del work
    manager, layers = managed_layers(local)
    local_E = local.num_experts
    for batch in cfg.batches:
        r = runs[batch]
        local_ids = torch.stack([torch.stack([shards[layer].local_ids(step[layer])
                                              for layer in range(L)]) for step in r["ids"]])
        local_ids = local_ids.to(torch.int32)
        for n in sizes:
            for method, n_local in (("ep", -(-n * local_E // E)), ("ep-full", min(n, local_E))):
                if method == "ep-full" and n_local == -(-n * local_E // E):
                    continue  # nothing resident, or everything: the same as ep
                _advise(manager, managed_residency(local, "profile", n_local))
                ms, first = run_captured(local, layers, local_ids, r["weights"], r["h0"],
                                         warmup=r["warm"], reduce=_reduce)
                resident = torch.tensor([manager.resident_bytes()], dtype=torch.float64,
                                        device=device)
                times = torch.tensor([ms], dtype=torch.float64, device=device)
                dist.all_reduce(resident)
                dist.all_reduce(times, op=dist.ReduceOp.MAX)
                if rank == 0:
                    record(method, batch, n, times.item(), first, int(resident.item()),
                           resident_per_rank=n_local, ranks=world)
                if method != "ep" or batch % world:
                    continue
                # the same residency with the tokens sharded too: rows [rank T, (rank+1) T)
                T = batch // world
                rows = slice(rank * T, (rank + 1) * T)
                for mode, name in (("all-gather", "ep-ag"), ("all-to-all", "ep-a2a")):
                    exchanges = [TokenExchange(ep.owner[layer], T, local.top_k, local.hidden,
                                               mode=mode, dtype=local.dtype, device=device)
                                 for layer in range(L)]
                    ms, first = run_captured(local, layers, r["ids"][:, :, rows],
                                             r["weights"][:, :, rows], r["h0"][rows],
                                             warmup=r["warm"], step_fn=_sharded_step(exchanges))
                    first = _gather_rows(first, world)
                    times = torch.tensor([ms], dtype=torch.float64, device=device)
                    dist.all_reduce(times, op=dist.ReduceOp.MAX)
                    if rank == 0:
                        record(name, batch, n, times.item(), first, int(resident.item()),
                               resident_per_rank=n_local, ranks=world, tokens_per_rank=T)
    manager.close()
    if rank == 0:
        Path(out).write_text(json.dumps(dict(
            ranks=world, layers=L, num_experts=E, top_k=local.top_k, ceilings=bw,
            device=torch.cuda.get_device_name(device) if cuda else "cpu",
            owner=ep.owner.tolist(), records=records)))


def parallel_sweep(cfg: BenchConfig, nproc: int, *, cuda: bool) -> dict:
    """Run the ranks (spawned, or this process under torchrun; NCCL on GPUs when `cuda`, else
    gloo) and return rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="moe-uvm-bench-") as folder:
        out = os.path.join(folder, "result.json")
        run_ranks(_rank, nproc, cfg, out, cuda=cuda)
        if not os.path.exists(out):  # under torchrun, only rank 0 writes it
            return {}
        return json.loads(Path(out).read_text())


def summarize(result: dict) -> list[str]:
    """Per (batch, fraction): each expert-parallel row over the one-GPU row, against the
    read-through ceiling's gain from N links."""
    rows = ["| batch | resident | method | tok/s | step ms | resident GB (all GPUs) | "
            "x one GPU | rel. error vs one GPU |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    base = {(r["batch"], r["resident"]): r for r in result["records"]
            if r["method"] == "one-gpu"}
    for r in result["records"]:
        one = base.get((r["batch"], r["resident"]))
        gain = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}" if one else "-"
        err = r.get("rel_err_vs_one_gpu")
        rows.append(f"| {r['batch']} | {r['budget_fraction']:.0%} | {r['method']} | "
                    f"{r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | {r['resident_gb']:.2f} | "
                    f"{gain} | {'-' if err is None else f'{err:.1e}'} |")
    if result["device"] == "cpu":
        rows.append("\n" + CPU_NOTE)
    c = result.get("ceilings") or {}
    if c:
        rows.append(f"\nread-through: {c['read_through_gbps']:.1f} GB/s from one GPU, "
                    f"{c['read_through_all_ranks_gbps']:.1f} from {result['ranks']} at once "
                    f"(x{c['read_through_all_ranks_gbps'] / c['read_through_gbps']:.2f}); "
                    f"HBM {c['hbm_read_gbps']:.0f}")
    return rows

