"""The one-knob planner: a GPU budget in bytes, out the split that minimises the predicted decode
step time: how many experts each layer keeps resident (split across layers by routing counts),
how many GPU slots each layer's cache gets, and which prefetch mode fills them.

Every candidate split is replayed on calibration routing by `moe_uvm.simulate` (the same replay
`moe-uvm simulate` prints) and timed by a cost model of the machine (`Costs`):

    predicted step = L x launch_us + HBM bytes / kernel_hbm_gbps (+ or max) PCIe bytes /
                     read_through_gbps   (summed at batch 1, overlapped above: Costs.step_ms)

HBM bytes are resident and slot reads plus slot writes, PCIe bytes offloaded reads plus prefetch
copies. The floor every result is compared against is the same sum with the measured HBM read
bandwidth and no launch term (README, "Decode, the main job").

It lives in moe_uvm, not moe_uvm/policies/, because it runs the simulator (which itself uses
moe_uvm/policies/).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.policies.residency import ResidentBudget
from moe_uvm.presets import ModelShape
from moe_uvm.profile import Profile
from moe_uvm.simulate import simulate
from moe_uvm.simulate_slots import SlotSettings
from moe_uvm.trace import RoutingTrace

CACHE_KINDS = (("lru", "none"), ("lru", "frequency"), ("lru", "speculative"), ("lfu", "none"))
"""(eviction, prefetch) pairs the planner tries for a slot cache (lookahead prefetch needs a
model's routers; lfu and freq_lru fill on read only, and freq_lru never beat lfu in replays)."""
BUDGET_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Shares of the budget the planner tries giving to slots (the rest to resident experts)."""


@dataclass(frozen=True)
class Costs:
    """What a decode step costs on one machine. hbm_gbps / read_through_gbps: measured ceilings
    (a streaming read of device memory, and of host-resident managed memory); kernel_hbm_gbps:
    the rate the fused MoE kernel reads resident experts at; launch_us: fixed time per MoE layer
    and step (launches, routing, small-batch work). Defaults: the H200 of 2026-11-30
    (nvidia-h200, PCIe Gen5), from `moe-uvm bench` (benchmarks/results/h200/auto_long.json)."""

    hbm_gbps: float = 4100.0
    read_through_gbps: float = 50.7
    kernel_hbm_gbps: float = 3000.0
    launch_us: float = 12.0
    source: str = "defaults (H200, measured 2026-11-30)"
    dense_us_per_layer: float = 58.0
    """Whole-model decode only: fixed time per decoder layer for attention, norms, router and
    the MoE layer's bookkeeping kernels (small kernels; in a CUDA graph), besides reading their
    weights. Fitted on the H200 from a whole Qwen3-30B-A3B-shaped model (48 layers, every
    expert resident, batch 1, torch.compile'd graph decode: 5.17 ms per step, of which 1.78 ms
    experts and 0.60 ms non-expert weight reads; benchmarks/generate.py); the Mixtral-8x7B
    shape of the same run, not fitted on, came out within 1%."""
    kernel_expert_nbytes: float = 9_437_184.0
    """The expert size kernel_hbm_gbps was measured at (Qwen3-30B-A3B's, 9 MiB). The kernel's
    rate below the HBM ceiling is a fixed cost per expert read (ramp-up and tail of short
    streams); `step_ms` charges experts of another size that same cost per expert, so large
    experts (Mixtral's 352 MiB) read at nearly the ceiling."""

    def __post_init__(self) -> None:
        for name in ("hbm_gbps", "read_through_gbps", "kernel_hbm_gbps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Costs.{name} must be a finite number > 0 GB/s, got {value}")
        for name in ("launch_us", "dense_us_per_layer", "kernel_expert_nbytes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Costs.{name} must be >= 0, got {value}")

    def step_ms(self, layers: int, hbm_bytes: float, pcie_bytes: float, batch: int = 1,
                expert_nbytes: float | None = None) -> float:
        """Predicted step time: launches plus the kernels' HBM and PCIe reads, summed at batch 1
        and overlapped (the larger) above it. The one-token kernel streams a layer's experts one
        after another in each program, so its HBM and PCIe reads add up; with more tokens the
        kernel's programs take (expert, tile) blocks independently and the slow PCIe blocks
        overlap the HBM ones (both seen on the H200: benchmarks/results/h200/auto_*.json).
        `expert_nbytes`: the experts' size, when it is not kernel_expert_nbytes (HBM reads then
        stream at hbm_gbps plus the fixed cost per expert read that kernel_hbm_gbps implies)."""
        hbm = self.kernel_hbm_ms(hbm_bytes, expert_nbytes)
        pcie = pcie_bytes / (self.read_through_gbps * 1e6)
        if expert_nbytes is not None:  # the same fixed cost per expert read over PCIe
            pcie += pcie_bytes / expert_nbytes * self.per_expert_ms
        return layers * self.launch_us * 1e-3 + (hbm + pcie if batch == 1 else max(hbm, pcie))

    def kernel_hbm_ms(self, hbm_bytes: float, expert_nbytes: float | None = None) -> float:
        """Time the fused MoE kernel takes to read `hbm_bytes` of resident experts of
        `expert_nbytes` each (default: kernel_expert_nbytes, i.e. at kernel_hbm_gbps)."""
        if expert_nbytes is None or expert_nbytes == self.kernel_expert_nbytes:
            return hbm_bytes / (self.kernel_hbm_gbps * 1e6)
        if expert_nbytes <= 0:
            raise ValueError(f"expert_nbytes must be > 0, got {expert_nbytes}")
        return hbm_bytes / (self.hbm_gbps * 1e6) + hbm_bytes / expert_nbytes * self.per_expert_ms

    @property
    def per_expert_ms(self) -> float:
        """The kernel's fixed cost per expert read: what kernel_hbm_gbps loses against the HBM
        ceiling on one expert of kernel_expert_nbytes."""
        size = self.kernel_expert_nbytes
        return max(size / (self.kernel_hbm_gbps * 1e6) - size / (self.hbm_gbps * 1e6), 0.0)

    def dense_step_ms(self, num_layers: int, read_bytes: float, kv_bytes: float) -> float:
        """Predicted time of everything but the routed experts in one decode step: the
        non-expert weights (attention, shared experts, routers, the output head) and the KV
        cache it reads, at the HBM read bandwidth, and the fixed time per decoder layer."""
        return (num_layers * self.dense_us_per_layer * 1e-3
                + (read_bytes + kv_bytes) / (self.hbm_gbps * 1e6))

    def floor_ms(self, hbm_bytes: float, pcie_bytes: float) -> float:
        """The floor: resident bytes / HBM read + offloaded bytes / read-through."""
        return hbm_bytes / (self.hbm_gbps * 1e6) + pcie_bytes / (self.read_through_gbps * 1e6)


def cache_file() -> Path:
    """Where measured costs are kept: $MOE_UVM_CACHE_DIR, else $XDG_CACHE_HOME/moe-uvm, else
    ~/.cache/moe-uvm; the file is costs.json, one entry per GPU name."""
    root = os.environ.get("MOE_UVM_CACHE_DIR")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "moe-uvm")
    return Path(root) / "costs.json"


def save_costs(device: str, costs: Costs, path: Path | None = None) -> Path:
    """Store `costs` for the GPU named `device` (other devices' entries are kept)."""
    path = path or cache_file()
    entries = _read_cache(path)
    entries[device] = asdict(costs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1) + "\n")
    return path


def _read_cache(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):  # a damaged cache is re-measured, not fatal
        return {}
    return entries if isinstance(entries, dict) else {}


def load_costs(device: str | None, path: Path | None = None) -> Costs:
    """The cached costs of GPU `device`; the documented defaults when there is no GPU, nothing
    cached for it, or the entry is damaged (the source field says which)."""
    if device is None:
        return Costs(source="defaults (no GPU: H200 figures of 2026-11-30)")
    entry = _read_cache(path or cache_file()).get(device)
    if isinstance(entry, dict):
        try:
            return Costs(**entry)
        except (TypeError, ValueError):
            pass
    return Costs(source=f"defaults (nothing measured for {device} yet: run `moe-uvm bench`)")


def fit_kernel_costs(
    layers: int, points: list[tuple[float, float]]
) -> tuple[float, float]:
    """(launch_us, kernel_hbm_gbps) from all-resident step times: points are (HBM bytes per step,
    measured ms) at several batch sizes, fitted by least squares to ms = L x launch + bytes /
    rate. With one point, or a fit without a positive rate and launch term, the default rate
    is kept and only the launch term is fitted."""
    x = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    if len(points) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        if slope > 0 and intercept >= 0:
            return float(intercept / layers * 1e3), float(1e-6 / slope)
    rate = Costs.kernel_hbm_gbps
    launch = max(float(np.min(y - x / (rate * 1e6))), 0.0)
    return launch / layers * 1e3, rate


@dataclass(frozen=True)
class Split:
    """A planned split. resident: experts per layer (split across layers by routing counts);
    slots: GPU slots per layer; prefetch / eviction: the slots' prefetch mode and eviction
    (moe_uvm.slots.EVICTIONS; "none" without slots); *_bytes: device bytes they take;
    predictions per step of `batch` tokens on the calibration routing."""

    resident: tuple[int, ...]
    slots: int
    prefetch: str
    eviction: str
    batch: int
    resident_bytes: int
    slot_bytes: int
    predicted_step_ms: float
    floor_ms: float
    pcie_bytes_per_token: float
    hit_rate: float

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.slot_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.predicted_step_ms * 1e3

    def to_dict(self) -> dict:
        return {**asdict(self), "resident": list(self.resident),
                "device_bytes": self.device_bytes, "tokens_per_s": self.tokens_per_s}


def slot_choices(budget_bytes: float, layers: int, num_experts: int, slot_nbytes: int) -> list[int]:
    """Slot counts per layer the planner tries: BUDGET_SHARES of the budget, at most E."""
    most = budget_bytes / (layers * slot_nbytes)
    return sorted({min(int(share * most), num_experts) for share in BUDGET_SHARES})


def plan_split(
    trace: RoutingTrace,
    budget_bytes: float,
    *,
    resident_nbytes: int,
    slot_nbytes: int,
    packed_nbytes: int | None = None,
    batch: int = 1,
    costs: Costs = Costs(),
    profile: Profile | None = None,
    max_tokens: int = 1024,
    kinds: tuple[tuple[str, str], ...] = CACHE_KINDS,
) -> tuple[Split, list[Split]]:
    """The best split of `budget_bytes` (device bytes for resident experts and slots) and every
    candidate tried. `trace` is calibration routing: the residency profile is counted on its
    first half (unless `profile` is given) and the candidates are replayed on the last
    `max_tokens` tokens after it, so the replay never sees the tokens it was counted on.
    `resident_nbytes`: device bytes of one resident expert (the managed store's aligned slot);
    `slot_nbytes`: of one cache slot (the dense expert); `packed_nbytes`: of one expert when
    every expert is resident (the store is then packed, `offload.store_alignment`), which adds
    that candidate where the budget holds it. `kinds`: the (eviction, prefetch) pairs tried for
    a slot cache."""
    if not (math.isfinite(budget_bytes) and budget_bytes >= 0):
        raise ValueError(f"budget must be a finite number of bytes >= 0, got {budget_bytes}")
    if resident_nbytes < 1 or slot_nbytes < 1 or batch < 1 or max_tokens < 1:
        raise ValueError(f"need resident_nbytes, slot_nbytes, batch and max_tokens >= 1, got "
                         f"{resident_nbytes}, {slot_nbytes}, {batch}, {max_tokens}")
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    if profile is None:
        if trace.num_sequences < 2:
            raise ValueError("planning needs a trace of at least 2 sequences (one to count the "
                             "profile on, one to replay) or a profile")
        half = trace.num_sequences // 2
        profile = Profile.from_trace(trace.sequences(0, half), cooccurrence=True)
        replayed = trace.sequences(half, None)
    else:
        profile.check_matches(L, E, k)
        replayed = trace
    replayed = _last_tokens(replayed, max_tokens)
    candidates = []
    if packed_nbytes is not None and budget_bytes >= L * E * packed_nbytes:
        candidates.append(_replay(replayed, profile, (E,) * L, 0, "none", "none", batch,
                                  L * E * packed_nbytes, slot_nbytes, costs))
    for slots in slot_choices(budget_bytes, L, E, slot_nbytes):
        total = min(int((budget_bytes - slots * L * slot_nbytes) // resident_nbytes), L * E)
        per_layer = total // L
        sizes = ResidentBudget(L, E, total=per_layer * L).layer_counts(profile.counts)
        if slots and int(np.max(sizes)) + slots > E:
            continue  # slots only ever hold offloaded experts: more than those are waste
        for eviction, mode in kinds if slots else (("lru", "none"),):
            candidates.append(_replay(
                replayed, profile, tuple(int(n) for n in sizes), slots, mode,
                eviction if slots else "none", batch, per_layer * L * resident_nbytes,
                slot_nbytes, costs))
    if not candidates:
        raise ValueError(f"a budget of {budget_bytes / 1e9:.3f} GB fits no split")
    best = min(candidates, key=lambda c: (round(c.predicted_step_ms, 9), c.device_bytes))
    return best, candidates


def _replay(replayed: RoutingTrace, profile: Profile, sizes: tuple[int, ...], slots: int,
            mode: str, eviction: str, batch: int, resident_bytes: int, slot_nbytes: int,
            costs: Costs) -> Split:
    """One candidate split replayed on `replayed` (the global policy on `profile`'s counts) and
    timed by `costs`."""
    L = replayed.num_layers
    record = simulate(replayed, [sum(sizes) // L], batch=batch, policies=("global",),
                      profile=profile,
                      slots=SlotSettings((slots,), (mode,), eviction=eviction if slots else "lru"),
                      )[0]
    hbm = record["hbm_experts_per_step"] * slot_nbytes
    pcie = record["pcie_experts_per_step"] * slot_nbytes
    return Split(sizes, slots, mode, eviction, batch, resident_bytes, slots * L * slot_nbytes,
                 costs.step_ms(L, hbm, pcie, batch, slot_nbytes), costs.floor_ms(hbm, pcie),
                 pcie / batch, record["hit_rate"])


def split_at_batch(split: Split, routing: Profile, batch: int, *, slot_nbytes: int,
                   costs: Costs = Costs(), tokens: int = 512) -> Split:
    """`split` (as auto_config chose it, at its own batch) replayed and timed at another decode
    batch, on tokens drawn from `routing`'s counts as auto_config draws them: what the planner
    predicts for the same split when decoding `batch` sequences at a time."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    replayed = trace_from_profile(routing, tokens)
    return _replay(replayed, routing, tuple(split.resident), split.slots, split.prefetch,
                   split.eviction, batch, split.resident_bytes, slot_nbytes, costs)


def _last_tokens(trace: RoutingTrace, tokens: int) -> RoutingTrace:
    """The trace's last `tokens` tokens (whole sequences where they fit, else a cut of the last
    ones), keeping sequence starts."""
    T = trace.num_tokens
    if T <= tokens:
        return trace
    first = T - tokens
    starts = trace.seq_starts if trace.seq_starts is not None else np.zeros(1, np.int32)
    kept = [s - first for s in starts if s >= first]
    if not kept or kept[0] != 0:
        kept = [0, *kept]
    return RoutingTrace(trace.topk_ids[:, first:], trace.num_experts, trace.top_k,
                        np.asarray(kept, np.int32), None)


def shape_for_trace(trace: RoutingTrace, shape: ModelShape) -> ModelShape:
    """`shape`'s expert size with the trace's layers, experts and top-k (for traces of other
    models, e.g. the learned tiny-model traces, timed at a preset's expert size)."""
    return replace(shape, name=f"{shape.name} experts, trace routing", num_layers=trace.num_layers,
                   num_moe_layers=trace.num_layers, num_experts=trace.num_experts,
                   top_k=trace.top_k, num_shared_experts=0)


def expert_nbytes(shape: ModelShape) -> tuple[int, int, int]:
    """(device bytes of one resident expert: the managed store's 2 MiB-aligned slot, of one cache
    slot: the dense expert, of one expert in a packed store) for a model shape."""
    from moe_uvm.store import PACKED_ALIGNMENT, ManagedExpertStore

    dtype = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}[shape.weight_bytes]
    H, inter = shape.hidden_size, shape.moe_intermediate_size
    specs = {"w13": ((2 * inter, H), dtype), "w2": ((H, inter), dtype)}
    return (ManagedExpertStore.planned_nbytes(1, specs), shape.bytes_per_expert,
            ManagedExpertStore.planned_nbytes(1, specs, PACKED_ALIGNMENT))


def trace_from_profile(profile: Profile, tokens: int = 1024, seed: int = 0) -> RoutingTrace:
    """`tokens` tokens drawn independently from a profile's per-layer counts (top-k distinct
    experts per token, probabilities proportional to counts + 1), one sequence: routing with the
    profile's skew and no order, for planning without a trace."""
    rng = np.random.default_rng(seed)
    L, E, k = profile.num_layers, profile.num_experts, profile.top_k
    logits = np.log(profile.counts.astype(np.float64) + 1.0)
    keys = logits[:, None, :] + rng.gumbel(size=(L, tokens, E))
    ids = np.argsort(-keys, axis=2)[:, :, :k].astype(np.int16 if E < 32768 else np.int32)
    return RoutingTrace(ids, E, k, np.zeros(1, np.int32), None)


def planning_routing(profile: Profile | None, num_layers: int, num_experts: int, top_k: int,
                     tokens: int = 512) -> Profile:
    """The routing counts auto_config plans on: the profile, or without one flat counts of
    `tokens` tokens."""
    if profile is not None:
        return profile
    L, E, k = num_layers, num_experts, top_k
    return Profile(L, E, k, tokens, np.full((L, E), tokens * k // E, np.int64))


HYBRID_MARGIN = 0.05
"""auto_config moves to the hybrid's split (no slots) only where the hybrid's predicted step is
at least this much shorter than the best split's: the prediction leaves out each layer's
hand-off to the CPU."""


@dataclass(frozen=True)
class HybridPlan:
    """The CPU/GPU hybrid on a split without slots (it serves offloaded experts only without a
    slot cache): the split, the offloaded experts a layer and the CPU's share of them, and the
    predicted step (the split's, less what the CPU's share saves; the hand-off to the CPU,
    tens of microseconds a layer, is not in it)."""

    split: Split
    offloaded_per_layer: float
    cpu_experts_per_layer: float
    predicted_step_ms: float
    prediction: dict


def quickest_without_slots(candidates: list[Split]) -> Split | None:
    """The quickest of the planner's candidates without slots (the split the hybrid runs on);
    None when the budget fits none."""
    plain = [c for c in candidates if c.slots == 0]
    return min(plain, key=lambda c: (round(c.predicted_step_ms, 9), c.device_bytes)) \
        if plain else None


def hybrid_plan(base: Split, *, cpu_gbps: float, read_through_gbps: float,
                expert_nbytes: int, layers: int, top_k: int, batch: int = 1) -> HybridPlan:
    """The hybrid on `base`, a split without slots (`quickest_without_slots`), the CPU's kernel
    at `cpu_gbps` beside the GPU's read-through at `read_through_gbps`
    (moe_uvm.hybrid.predict_hybrid)."""
    from moe_uvm.hybrid import predict_hybrid

    offloaded = base.pcie_bytes_per_token * batch / expert_nbytes / layers
    tokens = max(1.0, batch * top_k * (1 - base.hit_rate) / max(offloaded, 1.0))
    h = predict_hybrid(offloaded, tokens, expert_nbytes, read_through_gbps, cpu_gbps, layers)
    return HybridPlan(base, offloaded, h["cpu_experts_per_layer"],
                      base.predicted_step_ms - h["saved_step_ms"], h)


def choose_hybrid_split(best: Split, candidates: list[Split], mode: str, *,
                        cpu_gbps: float | Callable[[], float | None] | None,
                        read_through_gbps: float, expert_nbytes: int, layers: int,
                        top_k: int) -> tuple[Split, str]:
    """The split to run with `cpu_experts=mode` and why: `best` with the hybrid off or where
    `best` has no slots; else, with it on, the quickest split without slots (the hybrid and a
    slot cache do not go together), and with auto that split only where the hybrid on it is
    predicted at least HYBRID_MARGIN quicker than `best` (`cpu_gbps`: the CPU kernel's rate, or
    a function measuring it, called only then; None, not measured: `best`)."""
    if mode == "off":
        return best, "cpu_experts='off'"
    if best.slots == 0:
        return best, "the best split has no slots"
    base = quickest_without_slots(candidates)
    if base is None:
        return best, "the budget fits no split without slots"
    if mode == "on":
        return base, "cpu_experts='on': the quickest split without slots"
    if callable(cpu_gbps):
        cpu_gbps = cpu_gbps()
    if cpu_gbps is None:
        return best, "the CPU kernel's rate is not known here"
    plan = hybrid_plan(base, cpu_gbps=cpu_gbps, read_through_gbps=read_through_gbps,
                       expert_nbytes=expert_nbytes, layers=layers, top_k=top_k,
                       batch=best.batch)
    verdict = (f"the hybrid without slots predicted {plan.predicted_step_ms:.2f} ms a step "
               f"against {best.predicted_step_ms:.2f} with slots")
    if plan.predicted_step_ms < best.predicted_step_ms * (1 - HYBRID_MARGIN):
        return base, verdict
    return best, verdict + f": not {HYBRID_MARGIN:.0%} quicker"


def auto_config(
    config: ExpertOffloadConfig,
    num_layers: int,
    num_experts: int,
    top_k: int,
    *,
    resident_nbytes: int,
    slot_nbytes: int,
    packed_nbytes: int | None = None,
    profile: Profile | None = None,
    device: torch.device | None = None,
    tokens: int = 512,
    cpu_gbps: float | Callable[[], float | None] | None = None,
) -> tuple[ExpertOffloadConfig, Split | None]:
    """The config with the planner's split filled in, and that split; (config, None) when the
    planner does not apply. It applies when a budget is given and nothing the split decides is
    set: num_resident, resident_ids (resident_selection 'manual') and prefetch_slots unset. The
    replay runs on `tokens` tokens drawn from the profile's counts; without a profile on flat
    counts, so the split is the byte-cheapest (slots, whose lfu cache then learns the live
    routing). Prefetch modes that need what is missing (counts, co-occurrence) are not tried.
    Costs: the cached measurement for this GPU (`moe-uvm bench` writes it), else the defaults.
    With `config.cpu_experts` on, the split is the quickest without slots (the hybrid serves
    offloaded experts only without a slot cache); with auto, that one where the hybrid on it,
    the CPU's kernel at `cpu_gbps` (a rate, or a function measuring it, called only when the
    choice needs it), is predicted faster (`choose_hybrid_split`)."""
    if not config.wants_auto_split:
        return config, None
    L, E, k = num_layers, num_experts, top_k
    routing = planning_routing(profile, L, E, k, tokens)
    if profile is None:
        kinds = (("lru", "none"), ("lfu", "none"))
    else:
        kinds = tuple(kind for kind in CACHE_KINDS if kind[1] != "speculative"
                      or profile.cooccurrence is not None)
    gpu = None
    if device is not None and device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    split, candidates = plan_split(
        trace_from_profile(routing, tokens), config.gpu_budget_gb * 1e9,
        resident_nbytes=resident_nbytes, slot_nbytes=slot_nbytes, packed_nbytes=packed_nbytes,
        costs=(costs := load_costs(gpu)),
        profile=routing, max_tokens=tokens, kinds=kinds,
    )
    split, _ = choose_hybrid_split(split, candidates, config.cpu_experts, cpu_gbps=cpu_gbps,
                                   read_through_gbps=costs.read_through_gbps,
                                   expert_nbytes=slot_nbytes, layers=L, top_k=k)
    chosen = replace(config, num_resident=split.resident, prefetch_slots=split.slots,
                     prefetch=split.prefetch, slot_eviction=split.eviction if split.slots
                     else "lru")
    return chosen, split
