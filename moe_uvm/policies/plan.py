"""The residency plan: offload settings, a model's shape and routing counts in; out what the
manager carries out: the resident budget, every layer's initial resident set (one bool mask
[layers, experts], checked here once) and the routing counter that keeps deciding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from moe_uvm.policies.residency import ResidentBudget, first_n, manual, select_resident
from moe_uvm.policies.warmup import AdaptiveSettings, FrequencyWarmup


class PlanSettings(Protocol):
    """The fields of moe_uvm.config.ExpertOffloadConfig a plan reads."""

    resident_selection: str
    warmup_tokens: int
    min_batch_tokens: int
    adaptive: bool
    adaptive_interval_tokens: int
    adaptive_half_life_tokens: float
    adaptive_margin: float
    adaptive_readvise_mb: float | None

    def resolve(
        self, num_layers: int, num_experts: int, resident_nbytes: int, prefetch_nbytes: int
    ) -> ResidentBudget: ...

    def manual_ids(self, layer: int, num_layers: int, num_experts: int) -> tuple[int, ...]: ...


@dataclass(frozen=True, eq=False)
class ResidencyPlan:
    """What the manager executes. `resident[l, e]`: expert e of layer l starts resident.
    `decides`: the counter's decisions are to be carried out (frequency selection or adaptive);
    otherwise it only counts (for `routing_counts` and profiles)."""

    budget: ResidentBudget
    resident: np.ndarray
    warmup_tokens: int
    min_batch_tokens: int
    adaptive: AdaptiveSettings | None
    decides: bool
    prior: np.ndarray | None = None
    prior_tokens: int = 0

    def __post_init__(self) -> None:
        shape = (self.budget.num_layers, self.budget.num_experts)
        if self.resident.shape != shape or self.resident.dtype != bool:
            raise ValueError(
                f"resident must be a bool mask of shape {shape}, got {self.resident.dtype} "
                f"{self.resident.shape}"
            )

    def resident_ids(self, layer: int) -> tuple[int, ...]:
        return tuple(np.flatnonzero(self.resident[layer]).tolist())

    def counter(self, device: torch.device | str | None = None) -> FrequencyWarmup:
        """The routing counter that turns recorded counts into new resident sets (its counters
        on `device` from the start, so captured CUDA graphs count too)."""
        return FrequencyWarmup(
            self.budget,
            warmup_tokens=self.warmup_tokens,
            min_batch_tokens=self.min_batch_tokens,
            adaptive=self.adaptive,
            resident=self.resident,
            prior=self.prior,
            prior_tokens=self.prior_tokens,
            device=device,
        )


def adaptive_settings(settings: PlanSettings, slot_nbytes: int) -> AdaptiveSettings | None:
    """The adaptive settings the config asks for (None when not adaptive); a re-advise cap in MB
    becomes a swap cap through the size of one expert slot."""
    if not settings.adaptive:
        return None
    fields = dict(
        interval_tokens=settings.adaptive_interval_tokens,
        half_life_tokens=settings.adaptive_half_life_tokens,
        margin=settings.adaptive_margin,
    )
    if settings.adaptive_readvise_mb is None:
        return AdaptiveSettings(**fields)
    return AdaptiveSettings.from_bytes(
        int(settings.adaptive_readvise_mb * 1e6), slot_nbytes, **fields
    )


def plan_residency(
    settings: PlanSettings,
    num_layers: int,
    num_experts: int,
    slot_nbytes: int,
    expert_nbytes: int,
    counts: np.ndarray | None = None,
    counts_tokens: int = 0,
) -> ResidencyPlan:
    """The plan for a model of `num_layers` x `num_experts` experts, each taking `slot_nbytes`
    when resident (prefetch slots hold `expert_nbytes`), before this run has seen any routing.
    `counts` [layers, experts] over `counts_tokens` tokens (a profile) are needed for the
    profile selection and seed adaptive residency from it."""
    L, E = num_layers, num_experts
    # Prefetch slots are paid from the same GPU budget as resident experts.
    budget = settings.resolve(L, E, slot_nbytes, expert_nbytes)
    selection = settings.resident_selection
    if selection == "manual":
        resident = manual(E, [settings.manual_ids(layer, L, E) for layer in range(L)])
    elif selection == "profile":
        if counts is None:
            raise ValueError("resident_selection='profile' needs routing counts (a profile)")
        resident = select_resident(counts, budget)
    else:
        resident = first_n(E, budget.layer_counts())
    adaptive = adaptive_settings(settings, slot_nbytes)
    from_profile = selection == "profile" and adaptive is not None
    return ResidencyPlan(
        budget,
        resident,
        warmup_tokens=0 if from_profile else settings.warmup_tokens,
        min_batch_tokens=settings.min_batch_tokens,
        adaptive=adaptive,
        decides=selection == "frequency" or settings.adaptive,
        prior=counts if from_profile else None,
        prior_tokens=counts_tokens if from_profile else 0,
    )
