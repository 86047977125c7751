"""Replay a routing trace on the CPU against residency policies, optionally with a GPU slot cache
per layer (moe_uvm.simulate_slots): GPU hit rate of expert reads, PCIe reads and copies per step
and layer, prefetch precision and recall, re-advice per token, and (given a model shape) the
step-time floor: per layer, bytes read from HBM over HBM bandwidth and bytes read over PCIe over
PCIe bandwidth, overlapped (the larger) or serial (the sum)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from moe_uvm.policies.residency import ResidentBudget, first_n, frequency
from moe_uvm.policies.warmup import AdaptiveSettings, FrequencyWarmup
from moe_uvm.presets import ModelShape
from moe_uvm.profile import Profile
from moe_uvm.simulate_caches import CacheSettings, belady, freq_lru, lru
from moe_uvm.simulate_slots import SlotSettings, cooccurrence_start, replay, step_ids
from moe_uvm.trace import RoutingTrace

POLICIES = ("first_n", "frequency", "global", "oracle", "adaptive", "lru", "freq_lru", "lfu",
            "belady")
PROFILE_POLICIES = ("frequency", "global")
CACHE_POLICIES = ("lru", "freq_lru", "lfu", "belady")
"""Caches filled on read: counted only after CacheSettings.warmup_tokens."""
SLOT_POLICIES = ("first_n", "frequency", "global", "oracle")
"""Static residency: the policies a slot cache is simulated over."""


@dataclass(frozen=True)
class Bandwidths:
    """Bandwidths in GB/s (1e9 bytes). Defaults: measured on an H100 80GB (PCIe Gen5): HBM
    reads, managed read-through of host-resident pages by a kernel, and pinned host-to-device
    copies (what the benchmark's host-copy methods move)."""

    hbm_gbps: float = 3000.0
    pcie_gbps: float = 50.0
    h2d_gbps: float = 55.0

    def __post_init__(self) -> None:
        if not (self.hbm_gbps > 0 and self.pcie_gbps > 0 and self.h2d_gbps > 0):
            raise ValueError(f"bandwidths must be > 0 GB/s, got HBM {self.hbm_gbps}, PCIe "
                             f"{self.pcie_gbps}, H2D {self.h2d_gbps}")


def step_reads(trace: RoutingTrace, batch: int) -> np.ndarray:
    """touched[s, l, e]: expert e of layer l is read in step s (a step = `batch` consecutive
    tokens; the kernel reads each routed expert once per step however many tokens use it)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    L, T, _ = trace.topk_ids.shape
    steps = -(-T // batch)
    ids = trace.topk_ids.astype(np.int64)
    step_of = np.broadcast_to((np.arange(T) // batch)[None, :, None], ids.shape)
    layer_of = np.broadcast_to(np.arange(L)[:, None, None], ids.shape)
    valid = ids >= 0
    touched = np.zeros((steps, L, trace.num_experts), bool)
    touched[step_of[valid], layer_of[valid], ids[valid]] = True
    return touched


@dataclass(frozen=True)
class _Run:
    """What one policy did: per step and layer how many experts read came from HBM (resident or
    slot), of those from a slot, slots filled on read and experts prefetched; experts re-advised
    (in + out) and the experts those re-advices moved in over PCIe; prefetch totals over all
    layers, as the executor's PrefetchStats counts them (predicted, correct, needed offloaded
    as in kernels.slot_plan_reference.METRICS, and copies the kernel then read)."""

    hits: np.ndarray
    readvised: int = 0
    moved_in: int = 0
    slot_hits: np.ndarray | int = 0
    fills: np.ndarray | int = 0
    copies: np.ndarray | int = 0
    prefetch: tuple[int, int, int, int] | None = None


def _static(touched: np.ndarray, mask: np.ndarray) -> _Run:
    return _Run((touched & mask[None]).sum(axis=2))


def _adaptive(
    trace: RoutingTrace,
    touched: np.ndarray,
    batch: int,
    warmup: FrequencyWarmup,
) -> _Run:
    steps, L, _ = touched.shape
    ids = torch.from_numpy(trace.topk_ids.astype(np.int64))
    gpu = np.zeros((steps, L), np.int64)
    readvised = moved_in = 0
    s = 0
    while s < steps:
        if warmup.phase == "warmup":
            tokens = warmup.warmup_tokens - warmup.tokens_recorded
        elif warmup.phase == "adaptive":
            tokens = warmup.adaptive.interval_tokens
        else:
            tokens = trace.num_tokens
        stop = min(steps, s + max(1, -(-tokens // batch)))
        gpu[s:stop] = (touched[s:stop] & warmup.resident[None]).sum(axis=2)
        block = ids[:, s * batch : stop * batch]
        for layer in range(L):
            warmup.record(layer, block[layer])
        if warmup.decision_due():
            old = warmup.resident
            warmup.decide()
            readvised += int((warmup.resident != old).sum())
            moved_in += int((warmup.resident & ~old).sum())
        s = stop
    return _Run(gpu, readvised, moved_in)


def _record(
    job: dict,
    reads: np.ndarray,
    run: _Run,
    num_tokens: int,
    shape: ModelShape | None,
    bandwidths: Bandwidths,
) -> dict:
    steps, L = reads.shape
    total, hits = int(reads.sum()), int(run.hits.sum())
    slot_hits, copies = np.sum(run.slot_hits), np.sum(run.copies)
    offloaded = total - hits + int(slot_hits)
    precision = recall = copies_used = None
    if run.prefetch is not None:
        predicted, correct, needed, used = run.prefetch
        precision = correct / predicted if predicted else None
        recall = correct / needed if needed else None
        copies_used = float(used / copies) if copies else None
    record = {
        **job,
        "tokens": num_tokens,
        "hit_rate": hits / max(total, 1),
        "slot_hit_rate": float(slot_hits / max(offloaded, 1)),
        "offloaded_reads_per_step_per_layer": (total - hits) / (steps * L),
        "prefetch_copies_per_step_per_layer": float(copies / (steps * L)),
        "pcie_experts_per_step_per_layer": float((total - hits + copies) / (steps * L)),
        "slot_fills_per_step_per_layer": float(np.sum(run.fills) / (steps * L)),
        "prefetch_precision": precision,
        "prefetch_recall": recall,
        "prefetch_copies_used": copies_used,
        "readvised_experts_per_token": run.readvised / num_tokens,
        # Per step over all layers: experts read or written in HBM (resident and slot reads,
        # slot writes) and moved over PCIe (offloaded reads, prefetch copies, re-advice).
        "hbm_experts_per_step": float((run.hits + run.fills + run.copies).sum() / steps),
        "pcie_experts_per_step": float(((reads - run.hits + run.copies).sum() + run.moved_in)
                                       / steps),
    }
    if shape is not None:
        size = shape.bytes_per_expert
        # The trace may cover fewer MoE layers than the model: scale its per-layer traffic.
        scale = shape.num_moe_layers / L
        # Slot writes (fills and copies) cost HBM bandwidth like reads.
        hbm_experts = (run.hits + run.fills + run.copies).sum(axis=1)
        hbm_bytes = (hbm_experts + L * shape.num_shared_experts) * size * scale
        # Prefetch copies and experts moved in by re-advice (spread over all steps) use PCIe too.
        pcie_experts = (reads - run.hits + run.copies).sum(axis=1) + run.moved_in / steps
        pcie_bytes = pcie_experts * size * scale
        t_hbm = hbm_bytes / (bandwidths.hbm_gbps * 1e9)
        t_pcie = pcie_bytes / (bandwidths.pcie_gbps * 1e9)
        record.update(
            readvised_bytes_per_token=run.readvised * size * scale / num_tokens,
            pcie_bytes_per_token=float(pcie_bytes.sum() / num_tokens),
            step_floor_overlapped_ms=float(np.maximum(t_hbm, t_pcie).mean() * 1e3),
            step_floor_serial_ms=float((t_hbm + t_pcie).mean() * 1e3),
        )
    return record


def resident_sizes(spec: str, num_experts: int) -> list[int]:
    """'16,32,64' or '25%,50%,75%' (of the experts per layer) -> per-layer resident counts."""
    sizes = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            n = round(float(part[:-1]) / 100 * num_experts) if part.endswith("%") else int(part)
        except ValueError:
            raise ValueError(f"resident count {part!r} is not an int or a percentage") from None
        if not 0 <= n <= num_experts:
            raise ValueError(f"resident count {part} is outside [0, {num_experts}] experts")
        sizes.append(n)
    if not sizes:
        raise ValueError(f"no resident counts in {spec!r}")
    return sizes


# Long (~90 lines): one loop over batches x policies x sizes whose records share every counter;
# split, the counters would travel through several signatures.
def simulate(
    trace: RoutingTrace,
    resident: Sequence[int],
    *,
    batch: int = 1,
    policies: Sequence[str] = POLICIES,
    profile: Profile | None = None,
    shape: ModelShape | None = None,
    bandwidths: Bandwidths = Bandwidths(),
    adaptive: AdaptiveSettings | None = None,
    warmup_tokens: int = 256,
    slots: SlotSettings = SlotSettings(),
    caches: CacheSettings = CacheSettings(),
    progress: bool = False,
) -> list[dict]:
    """One record per (policy, resident count, slot count, prefetch mode) in that order.
    `profile` (counted on other tokens) feeds frequency and global, frequency prefetch and
    speculative co-occurrence, and starts adaptive; without it adaptive first counts
    `warmup_tokens` of the trace with first_n resident. `adaptive` defaults to
    AdaptiveSettings(). Slot caches run over the static policies (SLOT_POLICIES) only. The
    caches filled on read (CACHE_POLICIES; lfu is the GPU slot cache of moe_uvm.slots with
    eviction lfu, starting empty) count only the steps after `caches`' warm-up, and
    their records' `tokens` are the tokens of those steps; the other policies count all."""
    adaptive = adaptive or AdaptiveSettings()
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise ValueError(f"unknown policies {bad}; known: {', '.join(POLICIES)}")
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    if profile is not None:
        profile.check_matches(L, E, k)
    elif any(p in PROFILE_POLICIES for p in policies) or "frequency" in slots.prefetch:
        raise ValueError(f"policies {', '.join(PROFILE_POLICIES)} and frequency prefetch need a "
                         "profile")
    if max(slots.slots) > E:
        raise ValueError(f"slot counts must be at most the trace's {E} experts per layer, got "
                         f"{max(slots.slots)}")
    cached = [p for p in policies if p not in SLOT_POLICIES]
    if max(slots.slots) > 0 and cached:
        raise ValueError(f"slot caches are simulated over static residency "
                         f"({', '.join(SLOT_POLICIES)}), not {', '.join(cached)}")
    if shape is not None and (shape.num_experts, shape.top_k) != (E, k):
        raise ValueError(
            f"model shape {shape.name} has {shape.num_experts} experts, top-{shape.top_k}; the "
            f"trace has {E}, top-{k}"
        )
    touched = step_reads(trace, batch)
    warm = caches.warmup_steps(batch, len(touched)) if set(policies) & set(CACHE_POLICIES) else 0
    reads = touched.sum(axis=2)
    step_counts = touched.sum(axis=0)
    ids = step_ids(trace, batch) if max(slots.slots) > 0 else None
    records = []
    jobs = [(p, n, job) for p in policies for n in resident for job in slots.jobs()]
    for policy, n, (num_slots, mode) in tqdm(jobs, desc="simulate", disable=not progress,
                                             leave=False):
        sizes = np.full(L, n, np.int64)
        mask = None
        if policy == "first_n":
            mask = first_n(E, sizes)
        elif policy == "frequency":
            mask = frequency(profile.counts, sizes)
        elif policy == "global":
            split = ResidentBudget(L, E, total=n * L).layer_counts(profile.counts)
            mask = frequency(profile.counts, split)
        elif policy == "oracle":
            mask = frequency(step_counts, sizes)
        elif policy == "belady":
            hits, moves = belady(touched[warm:], sizes)
            run = _Run(hits, int(moves.sum()))
        elif policy == "lfu":  # the GPU slot cache's decayed-frequency admission
            hits = np.zeros(reads.shape, np.int64)
            if n > 0:
                lfu_ids = step_ids(trace, batch) if ids is None else ids
                r = replay(lfu_ids, hits, np.zeros((L, E), bool), n, "none", 0,
                           None if profile is None else profile.counts, None, False, "lfu", k)
                hits = r.hits
            run = _Run(hits[warm:], int(np.sum(r.fills[warm:])) if n > 0 else 0)
        elif policy in CACHE_POLICIES:
            hits, moves = (lru(touched, sizes) if policy == "lru" else
                           freq_lru(trace, touched, batch, sizes, caches.half_life_tokens))
            # A fill is the miss's own PCIe transfer (copied instead of read through): no
            # extra bytes. Moves count as re-advice, as they always have for lru.
            run = _Run(hits[warm:], int(moves[warm:].sum()))
        else:
            budget = ResidentBudget(L, E, per_layer=tuple(sizes))
            if profile is not None:
                warmup = FrequencyWarmup(
                    budget, warmup_tokens=0, adaptive=adaptive,
                    resident=frequency(profile.counts, sizes),
                    prior=profile.counts, prior_tokens=max(profile.num_tokens, 1),
                )
            else:
                warmup = FrequencyWarmup(budget, warmup_tokens=warmup_tokens, adaptive=adaptive)
            run = _adaptive(trace, touched, batch, warmup)
        job = {"policy": policy, "resident": n, "batch": batch, "slots": num_slots,
               "prefetch": mode, "prefetch_experts": 0, "cooccurrence": None}
        if mask is not None:
            run = _static(touched, mask)
        if num_slots > 0:
            cooc, learn, source = None, False, None
            if mode == "speculative":
                cooc, learn, source = cooccurrence_start(slots, profile, L, E)
            m = slots.predicted(num_slots, k) if mode != "none" else 0
            job.update(prefetch_experts=m, cooccurrence=source)
            job.update(eviction=slots.eviction)
            r = replay(ids, run.hits, mask, num_slots, mode, m,
                       None if profile is None else profile.counts, cooc, learn,
                       slots.eviction, k)
            run = _Run(r.hits, slot_hits=r.slot_hits, fills=r.fills, copies=r.copies,
                       prefetch=r.prefetch)
        skip = warm if policy in CACHE_POLICIES else 0
        records.append(_record(job, reads[skip:], run, trace.num_tokens - skip * batch, shape,
                               bandwidths))
    return records


def format_table(records: list[dict]) -> str:
    """A markdown table of simulate records (slot-cache columns when any record has slots)."""
    timed = "step_floor_overlapped_ms" in records[0]
    cached = any(r["slots"] > 0 for r in records)
    head = ["policy", "resident", "batch"]
    if cached:
        head += ["slots", "prefetch"]
    head += ["hit rate", "offloaded reads/step/layer"]
    if cached:
        head += ["slot hit rate", "copies/step/layer", "PCIe reads+copies/step/layer",
                 "precision", "recall", "copies used"]
    head.append("re-advised experts/token")
    if timed:
        head += ["PCIe MB/token", "floor overlapped ms", "floor serial ms"]
    ratio = lambda value: "-" if value is None else f"{value:.3f}"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        row = [r["policy"], str(r["resident"]), str(r["batch"])]
        if cached:
            row += [str(r["slots"]), r["prefetch"]]
        row += [f"{r['hit_rate']:.3f}", f"{r['offloaded_reads_per_step_per_layer']:.3f}"]
        if cached:
            row += [f"{r['slot_hit_rate']:.3f}", f"{r['prefetch_copies_per_step_per_layer']:.3f}",
                    f"{r['pcie_experts_per_step_per_layer']:.3f}",
                    ratio(r["prefetch_precision"]), ratio(r["prefetch_recall"]),
                    ratio(r["prefetch_copies_used"])]
        row.append(f"{r['readvised_experts_per_token']:.3f}")
        if timed:
            row += [f"{r['pcie_bytes_per_token'] / 1e6:.1f}",
                    f"{r['step_floor_overlapped_ms']:.3f}", f"{r['step_floor_serial_ms']:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plan(
    profile: Profile, shape: ModelShape, budget_bytes: float, min_per_layer: int = 0
) -> dict:
    """The global budget split of `budget_bytes` over a model's MoE layers by the profile's
    counts, with the hit rate and PCIe bytes per token it implies one token at a time (each
    routing is one expert read), next to an even split of the same number of experts."""
    profile.check_matches(shape.num_moe_layers, shape.num_experts, shape.top_k)
    L, E = profile.num_layers, profile.num_experts
    budget = ResidentBudget.from_bytes(L, E, budget_bytes, shape.bytes_per_expert, min_per_layer)
    routed = max(int(profile.counts.sum()), 1)
    tokens = max(profile.num_tokens, 1)
    result = {"model_shape": shape.name, "budget_bytes": budget_bytes,
              "bytes_per_expert": shape.bytes_per_expert, "resident_experts": budget.total}
    even = ResidentBudget(L, E, total=budget.total).layer_counts()
    for name, sizes in (("global", budget.layer_counts(profile.counts)), ("even", even)):
        covered = (profile.counts * frequency(profile.counts, sizes)).sum(axis=1)
        missed = int(routed - covered.sum())
        result[name] = {
            "per_layer": sizes.tolist(),
            "hit_rate": float(covered.sum() / routed),
            "pcie_bytes_per_token": missed * shape.bytes_per_expert / tokens,
        }
    return result
