"""ExpertOffloadConfig: how many experts stay resident, how they are chosen, what is prefetched.
Validated once, at construction; `resolve()` checks it against a model's shape before anything
is allocated."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moe_uvm.policies.residency import ResidentBudget
from moe_uvm.policies.warmup import AdaptiveSettings

RESIDENT_SELECTIONS = ("first_n", "manual", "frequency", "profile")
PREFETCH_MODES = ("none", "frequency", "speculative", "lookahead")
SLOT_EVICTIONS = ("lru", "lfu", "freq_lru")
QUANTIZE_EXPERTS = (None, "fp8")
CPU_EXPERTS_MODES = ("off", "on", "auto")
"""`cpu_experts` settings (moe_uvm.hybrid): off (GPU only; the default), on (always split), auto
(on where the cost model predicts a faster decode step)."""


def split_list(value: Any, what: str, kind: str) -> list[Any]:
    """The items of a "a, b,,c," style string (stripped, empty ones skipped) or of a sequence (as
    given); None has none. Anything else is an error naming `what` and the `kind` of items."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, Sequence):
        return list(value)
    raise ValueError(f"{what} must be a comma-separated string or a list of {kind}, got {value!r}")


def parse_ids(value: Any, what: str = "resident_ids") -> tuple[int, ...]:
    """Expert ids from "1, 2,,3," style strings or int sequences; empty items are skipped,
    anything else that is not a non-negative integer, and any duplicate, is an error."""
    ids: list[int] = []
    for item in split_list(value, what, "ints"):
        try:
            ident = int(item) if isinstance(item, str) else operator.index(item)
        except (TypeError, ValueError):
            raise ValueError(
                f"{what}: {item!r} is not an expert id (non-negative integer)"
            ) from None
        if isinstance(item, bool):
            raise ValueError(f"{what}: {item!r} is not an expert id (non-negative integer)")
        if ident < 0:
            raise ValueError(f"{what}: expert id {ident} is negative")
        ids.append(ident)
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{what}: duplicate expert ids {dupes}")
    return tuple(ids)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.4g}"


def parse_budget_gb(value: Any) -> float:
    """A GPU budget in GB (1e9 bytes) from a number or a CLI string: finite and > 0."""
    try:
        budget = float(value)
    except (TypeError, ValueError):
        budget = math.nan
    if isinstance(value, bool) or not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"gpu_budget_gb must be a finite number of GB > 0, got {value!r}")
    return budget


def _parse_num_resident(value: Any) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = split_list(value, "num_resident", "ints")
        if not parts:
            raise ValueError("num_resident is empty; give an int (-1 = all) or one per layer")
        value = int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]
    if isinstance(value, bool):
        raise ValueError(f"num_resident must be an int or a list of ints, got {value!r}")
    if isinstance(value, int):
        if value < -1:
            raise ValueError(f"num_resident must be >= -1 (-1 = all experts), got {value}")
        return value
    if isinstance(value, Sequence) and value:
        counts = tuple(int(v) for v in value)
        bad = [v for v in counts if v < -1]
        if bad:
            raise ValueError(f"num_resident per layer must be >= -1, got {bad}")
        return counts
    raise ValueError(f"num_resident must be an int (-1 = all) or a per-layer list, got {value!r}")


@dataclass(frozen=True)
class ExpertOffloadConfig:
    """How a model's routed experts are placed.

    num_resident: experts kept resident per layer: one int for every layer (-1 = all), or one
        int per layer. Unset: all of them, or as many as `gpu_budget_gb` holds.
    gpu_budget_gb: the one knob: device memory (GB = 1e9 bytes, finite, > 0) for the experts'
        share (resident experts and slots over all layers; the Hugging Face loader also takes
        the non-expert weights and its workspaces out of it first). With num_resident,
        resident_ids and prefetch_slots all unset, the planner (moe_uvm.autosplit.auto_config)
        chooses resident experts per layer, slots, eviction and prefetch by replaying routing
        drawn from the profile (flat counts without one) under the machine's measured costs.
        Set any of them and they decide, and must fit the budget (checked by `resolve`).
    resident_selection: first_n | manual (`resident_ids`) | frequency (first_n until the
        warmup has counted `warmup_tokens`, then the most-used experts) | profile (counts from
        `profile_path`).
    resident_ids: for `manual`: ids for every layer ("1, 2,,3," or a list), or one list per layer.
        They set the resident count; a num_resident given as well must agree.
    prefetch_slots: GPU slots per layer caching offloaded experts across decode steps (0 = no
        slot cache; unset: 0, or the planner's choice under a budget), at most the experts a
        layer offloads. Slots fill when the kernel reads an expert from host memory, and ahead
        of use by `prefetch`: none (fill-on-read only) | frequency (the next layer's most-used
        experts, needs a profile) | speculative (co-occurrence with the current layer's
        experts, from the profile and learned online) | lookahead (the next layer's router
        applied to the current hidden state; needs the routers, e.g. the Hugging Face
        integration).
    prefetch_experts: experts prefetched per layer and step (default: top_k), <= prefetch_slots.
    slot_eviction: what the slots hold (SLOT_EVICTIONS): lru (least recently used leaves) | lfu
        (the most-used by counts decayed with a 64-token half-life, starting from the profile's;
        fill on read only) | freq_lru (llama.cpp's design: least recently used of the lowest
        frequency class, 128-token half-life; fill on read only).
    warmup_tokens / min_batch_tokens: the frequency warmup re-advises after this many recorded
        tokens; batches smaller than `min_batch_tokens` are not counted at all (default 1:
        every batch, decode included; raise it to skip small dummy batches, knowing that
        adaptive residency then does not see decode steps of fewer tokens either).
    adaptive: keep re-deciding residency after the warmup (or from the profile): decayed
        counts, a decision every `adaptive_interval_tokens` recorded tokens, hysteresis
        (`adaptive_margin`), and at most `adaptive_readvise_mb` MB re-advised per decision.
        Needs resident_selection frequency or profile. Counting runs inside CUDA graphs too;
        the worker thread polls those counts every `adaptive_poll_ms` ms once a graph has been
        captured (eager steps hand their counts over themselves).
    readvise_chunk_mb / readvise_pause_ms: how a re-advise (not the initial advice) migrates
        pages. The driver holds kernel launches of every thread while a migration call runs,
        so a decode step launched meanwhile waits. Default (0 MB): one call per run of experts,
        the least stall in all per byte moved but the longest single ones; > 0: calls of at
        most this many MB (2^20 bytes), each waited for, then the pause (shorter single stalls,
        more of them, slower re-advise). benchmarks/readvise_latency.py measures both.
    allow_oversubscription: allow managed memory beyond the GPU's free memory. Off by default:
        oversubscribed managed memory can hang the GPU for every process on it.
    quantize_experts: None (default: experts keep the checkpoint's dtype) | "fp8": the Hugging
        Face loader quantises 16/32-bit experts to e4m3 with 128 x 128 block scales as it
        reads them (half the bytes over PCIe and in HBM; what it costs in accuracy on the
        trained tiny checkpoint is in the README). Opt-in.
    cpu_experts: the CPU/GPU hybrid (moe_uvm.hybrid): off (default) | on | auto. On, the host's
        CPU computes a share of each layer's routed offloaded experts from their managed pages
        while the GPU reads the rest over PCIe; the split follows measured per-expert costs.
        The split runs on the GPU and the CPU is handed its share in stream order, inside each
        layer's opaque op, so decode stays compiled and in CUDA graphs; outputs agree with the
        GPU-only path within bf16 rounding, not bitwise.
        auto: on only where the cost model, fed by the read-through and CPU-kernel rates
        measured at load, predicts a decode step at least 5% faster (never with everything
        resident or with a slot cache). Under a budget alone the planner takes it into account:
        with on it plans the quickest split without slots; with auto, on a GPU, it measures the
        CPU kernel and takes that split where the hybrid on it is predicted at least 5% quicker
        than its best split (moe_uvm.autosplit.choose_hybrid_split). Off keeps every bitwise
        promise.
    cpu_threads: CPU threads of the hybrid (default: every core but one, which drives the GPU).
    """

    num_resident: int | tuple[int, ...] | None = None
    gpu_budget_gb: float | None = None
    resident_selection: str = "first_n"
    resident_ids: tuple[int, ...] | tuple[tuple[int, ...], ...] = ()
    profile_path: str | None = None
    prefetch: str = "none"
    prefetch_slots: int | None = None
    slot_eviction: str = "lru"
    prefetch_experts: int | None = None
    warmup_tokens: int = 4096
    min_batch_tokens: int = 1
    adaptive: bool = False
    adaptive_interval_tokens: int = AdaptiveSettings.interval_tokens
    adaptive_half_life_tokens: float = AdaptiveSettings.half_life_tokens
    adaptive_margin: float = AdaptiveSettings.margin
    adaptive_readvise_mb: float | None = None
    adaptive_poll_ms: float = 5.0
    readvise_chunk_mb: float = 0.0
    readvise_pause_ms: float = 0.0
    allow_oversubscription: bool = False
    quantize_experts: str | None = None
    cpu_experts: str = "off"
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        # Long (~70 lines): every field is validated here, once, one short check each.
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("num_resident", _parse_num_resident(self.num_resident))
        if self.resident_selection not in RESIDENT_SELECTIONS:
            raise ValueError(
                f"resident_selection must be one of {', '.join(RESIDENT_SELECTIONS)}; "
                f"got {self.resident_selection!r}"
            )
        if self.prefetch not in PREFETCH_MODES:
            raise ValueError(
                f"prefetch must be one of {', '.join(PREFETCH_MODES)}; got {self.prefetch!r}"
            )
        ids = self.resident_ids
        if (
            isinstance(ids, Sequence)
            and not isinstance(ids, str)
            and ids
            and all(isinstance(row, (list, tuple, str)) for row in ids)
        ):
            set_(
                "resident_ids",
                tuple(parse_ids(row, f"resident_ids[layer {i}]") for i, row in enumerate(ids)),
            )
        else:
            set_("resident_ids", parse_ids(ids))
        if self.resident_selection == "manual" and not self.resident_ids:
            raise ValueError("resident_selection='manual' needs resident_ids")
        if self.resident_selection != "manual" and self.resident_ids:
            raise ValueError(
                f"resident_ids are only used with resident_selection='manual', "
                f"not {self.resident_selection!r}"
            )
        if self.resident_selection == "profile" and not self.profile_path:
            raise ValueError("resident_selection='profile' needs profile_path")
        if self.gpu_budget_gb is not None:
            set_("gpu_budget_gb", parse_budget_gb(self.gpu_budget_gb))
        if self.resident_ids:
            self._check_ids_agree_with_num_resident(num_experts=None)
        if self.warmup_tokens < 1:
            raise ValueError(f"warmup_tokens must be >= 1, got {self.warmup_tokens}")
        if self.min_batch_tokens < 1:
            raise ValueError(f"min_batch_tokens must be >= 1, got {self.min_batch_tokens}")
        if self.prefetch_slots is not None and self.prefetch_slots < 0:
            raise ValueError(f"prefetch_slots must be >= 0, got {self.prefetch_slots}")
        if self.prefetch != "none" and not self.prefetch_slots:
            raise ValueError(
                f"prefetch={self.prefetch!r} needs prefetch_slots >= 1 (GPU slots to fill)"
            )
        if self.cpu_experts not in CPU_EXPERTS_MODES:
            raise ValueError(f"cpu_experts must be one of {', '.join(CPU_EXPERTS_MODES)}; got "
                             f"{self.cpu_experts!r}")
        if self.cpu_threads is not None and not (isinstance(self.cpu_threads, int)
                                                 and self.cpu_threads >= 1):
            raise ValueError(f"cpu_threads must be an int >= 1 (or unset), got "
                             f"{self.cpu_threads!r}")
        if self.cpu_experts == "on" and self.prefetch_slots:
            raise ValueError("cpu_experts='on' does not combine with a slot cache "
                             f"(prefetch_slots={self.prefetch_slots}): set one of them")
        if self.quantize_experts not in QUANTIZE_EXPERTS:
            raise ValueError(f"quantize_experts must be None or 'fp8'; got "
                             f"{self.quantize_experts!r}")
        if self.slot_eviction not in SLOT_EVICTIONS:
            raise ValueError(f"slot_eviction must be one of {', '.join(SLOT_EVICTIONS)}; got "
                             f"{self.slot_eviction!r}")
        if self.slot_eviction != "lru" and self.prefetch != "none":
            raise ValueError(f"slot_eviction={self.slot_eviction!r} fills slots on read only: "
                             f"prefetch must be 'none', got {self.prefetch!r}")
        if self.prefetch_experts is not None and not (
            1 <= self.prefetch_experts <= max(self.prefetch_slots or 0, 1)
        ):
            raise ValueError(
                f"prefetch_experts must be in [1, prefetch_slots={self.prefetch_slots}], "
                f"got {self.prefetch_experts}"
            )
        if self.adaptive and self.resident_selection not in ("frequency", "profile"):
            raise ValueError(
                "adaptive residency needs resident_selection 'frequency' or 'profile', "
                f"not {self.resident_selection!r}"
            )
        if self.adaptive_interval_tokens < 1:
            raise ValueError(
                f"adaptive_interval_tokens must be >= 1, got {self.adaptive_interval_tokens}"
            )
        if not self.adaptive_half_life_tokens > 0 or not self.adaptive_margin >= 0:
            raise ValueError(
                "need adaptive_half_life_tokens > 0 and adaptive_margin >= 0, got "
                f"{self.adaptive_half_life_tokens} and {self.adaptive_margin}"
            )
        if not (math.isfinite(self.adaptive_poll_ms) and self.adaptive_poll_ms > 0):
            raise ValueError(f"adaptive_poll_ms must be a finite number > 0, got "
                             f"{self.adaptive_poll_ms!r}")
        if not (math.isfinite(self.readvise_chunk_mb) and self.readvise_chunk_mb >= 0):
            raise ValueError(f"readvise_chunk_mb must be a finite number >= 0 (0 = one "
                             f"migration call per run of experts), got {self.readvise_chunk_mb!r}")
        if not (math.isfinite(self.readvise_pause_ms) and self.readvise_pause_ms >= 0):
            raise ValueError(f"readvise_pause_ms must be a finite number >= 0, got "
                             f"{self.readvise_pause_ms!r}")
        if self.adaptive_readvise_mb is not None and not self.adaptive_readvise_mb > 0:
            raise ValueError(f"adaptive_readvise_mb must be > 0, got {self.adaptive_readvise_mb}")

    @property
    def num_slots(self) -> int:
        """Slots per layer: prefetch_slots, 0 when unset."""
        return self.prefetch_slots or 0

    @property
    def wants_auto_split(self) -> bool:
        """True when the planner chooses the split: a budget, and num_resident, resident_ids
        and prefetch_slots all unset."""
        return (self.gpu_budget_gb is not None and self.num_resident is None
                and self.resident_selection != "manual" and self.prefetch_slots is None)

    def resident_counts(self, num_layers: int, num_experts: int) -> list[int]:
        """Per-layer resident counts from `num_resident` (unset: all) for a model of this shape."""
        value = -1 if self.num_resident is None else self.num_resident
        counts = [value] * num_layers if isinstance(value, int) else list(value)
        if len(counts) != num_layers:
            raise ValueError(
                f"num_resident lists {len(counts)} layers but the model has {num_layers}"
            )
        counts = [num_experts if c == -1 else c for c in counts]
        bad = [c for c in counts if c > num_experts]
        if bad:
            raise ValueError(f"num_resident {bad} exceeds the {num_experts} experts per layer")
        return counts

    def manual_ids(self, layer: int, num_layers: int, num_experts: int) -> tuple[int, ...]:
        """The manual resident set of one layer, checked against the model's shape."""
        ids = self.resident_ids
        if ids and isinstance(ids[0], tuple):
            if len(ids) != num_layers:
                raise ValueError(
                    f"resident_ids gives {len(ids)} layers but the model has {num_layers}"
                )
            ids = ids[layer]
        bad = [i for i in ids if i >= num_experts]
        if bad:
            raise ValueError(f"resident_ids {bad} out of range [0, {num_experts})")
        return tuple(ids)

    def _check_ids_agree_with_num_resident(self, num_experts: int | None) -> None:
        """resident_ids set the resident count; a num_resident given too must say the same (its
        -1 = all experts is checked once `num_experts` is known)."""
        counts = self.num_resident
        if counts is None:
            return
        per_layer_ids = isinstance(self.resident_ids[0], tuple)
        sizes = [len(row) for row in self.resident_ids] if per_layer_ids else None
        if isinstance(counts, tuple) and sizes is not None and len(counts) != len(sizes):
            raise ValueError(
                f"num_resident lists {len(counts)} layers but resident_ids {len(sizes)}; "
                "resident_ids alone set the resident count"
            )
        if isinstance(counts, int):
            counts = (counts,) * (len(sizes) if sizes is not None else 1)
        sizes = sizes or [len(self.resident_ids)] * len(counts)
        for count, size in zip(counts, sizes, strict=True):
            expected = num_experts if count == -1 else count
            if expected is not None and expected != size:
                named = f"{size} experts per layer" if len(set(sizes)) == 1 else f"{sizes} experts"
                all_of = f" (all {num_experts} experts)" if count == -1 else ""
                raise ValueError(
                    f"resident_ids name {named} but num_resident={self.num_resident!r}{all_of}: "
                    "resident_ids alone set the resident count; leave num_resident unset or "
                    "make it agree"
                )

    def resolve(
        self, num_layers: int, num_experts: int, resident_nbytes: int, prefetch_nbytes: int
    ) -> ResidentBudget:
        """The resident budget for a model of this shape, with every rule that needs the shape
        checked (call it before allocating anything): counts and ids in range; explicit
        num_resident / resident_ids / prefetch_slots override the budget split and must fit
        `gpu_budget_gb`; no more prefetch slots than experts a layer offloads.
        `resident_nbytes`: GPU bytes of one resident expert; `prefetch_nbytes`: of one slot."""
        L, E, S = num_layers, num_experts, self.num_slots
        per_layer: list[int] | None = None
        if self.resident_selection == "manual":
            self._check_ids_agree_with_num_resident(E)
            per_layer = [len(self.manual_ids(layer, L, E)) for layer in range(L)]
            sizes = per_layer[0] if len(set(per_layer)) == 1 else per_layer
            named = f"resident_ids ({sizes} per layer)"
        elif self.num_resident is not None:
            per_layer = self.resident_counts(L, E)
            named = f"num_resident={self.num_resident!r}"
        slot_bytes = S * L * prefetch_nbytes
        slots_need = (
            f"prefetch_slots={S} needs {_gb(slot_bytes)} GB ({L} layers x {S} slots x "
            f"{prefetch_nbytes} bytes)"
        )
        if self.gpu_budget_gb is None:
            budget = ResidentBudget(L, E, per_layer=[E] * L if per_layer is None else per_layer)
        elif per_layer is not None:
            resident_bytes = sum(per_layer) * resident_nbytes
            free_bytes = self.gpu_budget_gb * 1e9 - slot_bytes
            if resident_bytes > free_bytes:
                needs = (
                    f"{named} needs {_gb(resident_bytes)} GB ({sum(per_layer)} resident experts "
                    f"x {resident_nbytes} bytes)"
                )
                if S:
                    needs += f" and {slots_need}: {_gb(resident_bytes + slot_bytes)} GB in all"
                holds = max(int(free_bytes // resident_nbytes), 0)
                raise ValueError(
                    f"{needs}, more than gpu_budget_gb={self.gpu_budget_gb:g}, which holds "
                    f"{holds} resident experts" + (" besides the slots" if S else "")
                )
            budget = ResidentBudget(L, E, per_layer=per_layer)
        else:
            if slot_bytes > self.gpu_budget_gb * 1e9:
                raise ValueError(f"{slots_need}, more than gpu_budget_gb={self.gpu_budget_gb:g}")
            budget = ResidentBudget.from_bytes(
                L, E, self.gpu_budget_gb * 1e9 - slot_bytes, resident_nbytes
            )
        if budget.per_layer is not None:
            most = E - min(budget.per_layer)
        else:  # a total split by counts: the other layers may hold all of it
            most = min(E, L * E - budget.total)
        if S > most:
            raise ValueError(
                f"prefetch_slots={S}, but a layer offloads at most {most} of its {E} experts "
                f"here and a slot only ever holds an offloaded expert: the maximum is {most}"
            )
        return budget

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ExpertOffloadConfig:
        """Build from CLI-style names (`expert_offload_num_resident=...` or plain field names);
        unknown names are an error that lists the known ones."""
        known = set(cls.__dataclass_fields__)
        fields: dict[str, Any] = {}
        unknown = []
        for key, value in kwargs.items():
            name = key.removeprefix("expert_offload_").replace("-", "_")
            if name in known:
                fields[name] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {sorted(known)}")
        return cls(**fields)
