"""ExpertOffloadConfig: how many experts stay resident, how they are chosen, what is prefetched.
Validated once, at construction; `resolve()` checks it against a model's shape before anything
is allocated."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

RESIDENT_SELECTIONS = ("first_n", "manual", "frequency", "profile")
PREFETCH_MODES = ("none", "frequency", "speculative", "lookahead")


def parse_ids(value: Any, what: str = "resident_ids") -> tuple[int, ...]:
    """Expert ids from "1, 2,,3," style strings or int sequences; empty items are skipped,
    anything else that is not a non-negative integer, and any duplicate, is an error."""
    if value is None:
        return ()
    if isinstance(value, str):
        items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise ValueError(
            f"{what} must be a comma-separated string or a list of ints, got {value!r}"
        )
    ids: list[int] = []
    for item in items:
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


def _parse_num_resident(value: Any) -> int | tuple[int, ...]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
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
        int per layer. Ignored when `gpu_budget_gb` is set.
    gpu_budget_gb: alternatively, a GPU byte budget (GB = 1e9 bytes) for resident experts over
        all layers; split by routing counts when the selection has them, evenly otherwise.
    resident_selection: first_n | manual (`resident_ids`) | frequency (first_n until the
        warmup has counted `warmup_tokens`, then the most-used experts) | profile (counts from
        `profile_path`).
    resident_ids: for `manual`: ids for every layer ("1, 2,,3," or a list), or one list per layer.
    prefetch_slots: GPU slots per layer caching offloaded experts across decode steps (0 = no
        slot cache). Slots fill when the kernel reads an expert from host memory, and ahead of
        use by `prefetch`: none (fill-on-read only) | frequency (the next layer's most-used
        experts, needs a profile) | speculative (co-occurrence with the current layer's experts,
        from the profile and learned online) | lookahead (the next layer's router applied to
        the current hidden state; needs the routers, e.g. the Hugging Face integration).
    prefetch_experts: experts prefetched per layer and step (default: top_k), <= prefetch_slots.
    warmup_tokens / min_batch_tokens: the frequency warmup re-advises after this many recorded
        tokens and ignores batches smaller than `min_batch_tokens` (dummy/warm-up batches).
    adaptive: keep re-deciding residency after the warmup (or from the profile): decayed
        counts, a decision every `adaptive_interval_tokens` recorded tokens, hysteresis
        (`adaptive_margin`), and at most `adaptive_readvise_mb` MB re-advised per decision.
        Needs resident_selection frequency or profile.
    allow_oversubscription: allow managed memory beyond the GPU's free memory. Off by default:
        oversubscribed managed memory can hang the GPU for every process on it.
    """

    num_resident: int | tuple[int, ...] = -1
    gpu_budget_gb: float | None = None
    resident_selection: str = "first_n"
    resident_ids: tuple[int, ...] | tuple[tuple[int, ...], ...] = ()
    profile_path: str | None = None
    prefetch: str = "none"
    prefetch_slots: int = 0
    prefetch_experts: int | None = None
    warmup_tokens: int = 4096
    min_batch_tokens: int = 64
    adaptive: bool = False
    adaptive_interval_tokens: int = 16
    adaptive_half_life_tokens: float = 32.0
    adaptive_margin: float = 0.25
    adaptive_readvise_mb: float | None = None
    allow_oversubscription: bool = False

    def __post_init__(self) -> None:
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
        if self.gpu_budget_gb is not None and not self.gpu_budget_gb >= 0:
            raise ValueError(f"gpu_budget_gb must be >= 0, got {self.gpu_budget_gb}")
        if self.gpu_budget_gb is not None and self.resident_selection == "manual":
            raise ValueError("gpu_budget_gb cannot be combined with manual resident_ids")
        if self.warmup_tokens < 1:
            raise ValueError(f"warmup_tokens must be >= 1, got {self.warmup_tokens}")
        if self.min_batch_tokens < 1:
            raise ValueError(f"min_batch_tokens must be >= 1, got {self.min_batch_tokens}")
        if self.prefetch_slots < 0:
            raise ValueError(f"prefetch_slots must be >= 0, got {self.prefetch_slots}")
        if self.prefetch != "none" and self.prefetch_slots == 0:
            raise ValueError(
                f"prefetch={self.prefetch!r} needs prefetch_slots >= 1 (GPU slots to fill)"
            )
        if self.prefetch_experts is not None and not (
            1 <= self.prefetch_experts <= max(self.prefetch_slots, 1)
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
        if self.adaptive_readvise_mb is not None and not self.adaptive_readvise_mb > 0:
            raise ValueError(f"adaptive_readvise_mb must be > 0, got {self.adaptive_readvise_mb}")

    def resident_counts(self, num_layers: int, num_experts: int) -> list[int]:
        """Per-layer resident counts from `num_resident` for a model of this shape."""
        value = self.num_resident
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
