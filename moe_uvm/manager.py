"""ExpertOffloadManager: owns each layer's resident set and carries out a residency plan
(moe_uvm.policies.plan) and the decisions that follow as advice on the layer's ManagedExpertStore
(promote/demote only the difference, one call per run of consecutive experts, all-or-nothing per
layer), plus accounting for logs and benchmarks."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from moe_uvm import uvm
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.policies.plan import ResidencyPlan, plan_residency
from moe_uvm.profile import Profile, load_profile
from moe_uvm.store import ManagedExpertStore, coalesce

if TYPE_CHECKING:
    from moe_uvm.layer import FusedMoE

log = logging.getLogger("moe_uvm")


class ReadviseError(RuntimeError):
    """A re-advise was refused or failed; the layer's previous residency is still in place."""


@dataclass(frozen=True)
class ReadviseResult:
    layer: int
    promoted: tuple[int, ...]
    demoted: tuple[int, ...]
    bytes_moved: int


class ExpertOffloadManager:
    """Residency of every offloaded MoE layer.

    `stores[l]` holds layer l's experts. On construction the plan's initial residency (by
    default the config's plan for these stores) is applied: resident experts
    PreferredLocation=GPU and prefetched there, offloaded experts PreferredLocation=CPU +
    AccessedBy=GPU with their pages on the host. `record` (called by each layer's forward)
    counts routing; when the plan decides (resident_selection "frequency" and/or `adaptive`)
    the counts turn into new resident sets, carried out by a worker thread so the
    host-blocking advice calls stay off the decode path. On the CPU path (stores in CPU memory)
    the same bookkeeping runs and no CUDA call is made.
    """

    def __init__(
        self,
        stores: Sequence[ManagedExpertStore],
        config: ExpertOffloadConfig,
        *,
        top_k: int | None = None,
        profile: Profile | None = None,
        plan: ResidencyPlan | None = None,
    ) -> None:
        if not stores:
            raise ValueError("the manager needs at least one layer store")
        experts = {s.num_experts for s in stores}
        if len(experts) != 1:
            raise ValueError(f"all layers must have the same number of experts, got {experts}")
        self.stores = list(stores)
        self.config = config
        self.num_layers = len(stores)
        self.num_experts = experts.pop()
        self.top_k = top_k
        self.device = stores[0].device
        self.is_managed = stores[0].is_managed
        if config.profile_path and profile is None:
            profile = load_profile(config.profile_path)
        if profile is not None:
            profile.check_matches(self.num_layers, self.num_experts, top_k or profile.top_k)
        self.profile = profile
        self.plan = plan or self._plan()
        if self.plan.resident.shape != (self.num_layers, self.num_experts):
            raise ValueError(
                f"the plan is for {self.plan.resident.shape} (layers, experts), the stores hold "
                f"{(self.num_layers, self.num_experts)}"
            )
        self.slot_cache = None  # a moe_uvm.slots.SlotCache once enable_slot_cache() made one
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device) if self.is_managed else None
        self._resident: list[tuple[int, ...]] = [() for _ in range(self.num_layers)]
        for layer in range(self.num_layers):
            self._apply_all(layer, self.plan.resident_ids(layer))
        self.warmup = self.plan.counter()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-uvm-readvise")
        self._pending: list[Future] = []
        self._failed: list[int] = []
        self.layers: list[FusedMoE] = []  # the modules these stores serve (offload_experts)

    def _plan(self) -> ResidencyPlan:
        """The config's plan for these stores (`offload_experts` makes it before allocating)."""
        store, profile = self.stores[0], self.profile
        return plan_residency(
            self.config, self.num_layers, self.num_experts, store.slot_nbytes,
            store.expert_nbytes,
            counts=None if profile is None else profile.counts,
            counts_tokens=0 if profile is None else profile.num_tokens,
        )

    # --- routing counts and dynamic residency ------------------------------------------------

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Routing hook each offloaded layer calls with its `topk_ids` (HOT PATH in eager mode:
        a device-side count, no host sync except at a decision). A no-op while a CUDA graph is
        being captured or torch.compile is tracing; eager forwards (e.g. prefill) are what the
        warmup counts. Decisions are taken after the last layer and carried out by a worker."""
        if torch.compiler.is_compiling():
            return
        if topk_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        self.warmup.record(layer, topk_ids)
        if not self.plan.decides or layer != self.num_layers - 1:
            return
        with self._lock:
            failed, self._failed = self._failed, []
        for failed_layer in failed:
            self.warmup.set_resident(failed_layer, list(self.resident_ids(failed_layer)))
        if self.warmup.decision_due():
            self.check_routing()  # the decision syncs anyway: report bad routing here
            changes = self.warmup.decide()
            if changes:
                self._pending = [f for f in self._pending if not f.done()]
                self._pending.append(self._worker.submit(self._readvise_many, changes))

    def _readvise_many(self, changes: dict[int, list[int]]) -> None:
        for layer, ids in changes.items():
            try:
                result = self.readvise(layer, ids)
            except ReadviseError as exc:
                log.warning("%s", exc)
                with self._lock:
                    self._failed.append(layer)
            else:
                log.info(
                    "moe-uvm: layer %d re-advised, %d promoted, %d demoted",
                    layer,
                    len(result.promoted),
                    len(result.demoted),
                )

    def wait_idle(self) -> None:
        """Block until scheduled re-advice and its prefetches have finished; then report an
        expert id outside [0, E) that reached a layer (`check_routing`)."""
        for future in self._pending:
            future.result()
        self._pending = []
        self.synchronize()
        self.check_routing()

    def check_routing(self) -> None:
        """Raise moe_uvm.layer.RoutingError for the first layer that was given an expert id
        outside [0, num_experts) other than -1 since the last check (a host sync)."""
        for layer in self.layers:
            layer.check_routing()

    def routing_counts(self) -> np.ndarray:
        """Routing counts [layers, experts] recorded so far (a host sync; bad expert ids, which
        are not counted, raise as in `check_routing`)."""
        self.check_routing()
        return self.warmup.host_counts()

    def save_profile(self, path: str, model_id: str | None = None) -> Profile:
        """Write the live routing counts as a profile (usable with resident_selection=profile)."""
        if self.top_k is None:
            raise ValueError("saving a profile needs the layers' top_k (offload_experts sets it)")
        profile = Profile(
            self.num_layers,
            self.num_experts,
            self.top_k,
            self.warmup.tokens_recorded,
            self.routing_counts(),
            model_id=model_id,
        )
        profile.save(path)
        return profile

    # --- carrying decisions out ---------------------------------------------------------------

    def _validated(self, layer: int, ids: Iterable[int]) -> tuple[int, ...]:
        if not 0 <= layer < self.num_layers:
            raise ReadviseError(f"layer {layer} out of range [0, {self.num_layers})")
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError) as exc:
            raise ReadviseError(f"layer {layer}: resident ids must be integers ({exc})") from None
        bad = [i for i in ids if not 0 <= i < self.num_experts]
        if bad:
            raise ReadviseError(
                f"layer {layer}: expert ids {bad} out of range [0, {self.num_experts})"
            )
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ReadviseError(f"layer {layer}: duplicate expert ids {dupes}")
        return tuple(sorted(ids))

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The side stream prefetches are enqueued on (None on the CPU path)."""
        return self._stream

    def _stream_handle(self) -> int | None:
        return self._stream.cuda_stream if self._stream is not None else None

    def _apply_all(self, layer: int, resident: tuple[int, ...]) -> None:
        store = self.stores[layer]
        offloaded = sorted(set(range(self.num_experts)) - set(resident))
        handle = self._stream_handle()
        store.advise_offloaded(offloaded, handle)
        store.advise_resident(resident, handle)
        self._resident[layer] = resident

    def readvise(self, layer: int, resident_ids: Iterable[int]) -> ReadviseResult:
        """Make `resident_ids` layer `layer`'s resident set, advising only the difference.

        Demotions go first so GPU memory is released before promotions take it. All-or-nothing:
        if a CUDA call fails, the runs already changed are advised back and `ReadviseError`
        reports both the failure and the restored residency.
        """
        new = self._validated(layer, resident_ids)
        with self._lock:
            old = self._resident[layer]
            promote = tuple(sorted(set(new) - set(old)))
            demote = tuple(sorted(set(old) - set(new)))
            store = self.stores[layer]
            steps = [
                (store.advise_offloaded, store.advise_resident, run) for run in coalesce(demote)
            ]
            steps += [
                (store.advise_resident, store.advise_offloaded, run) for run in coalesce(promote)
            ]
            done = []
            handle = self._stream_handle()
            try:
                for forward, backward, (first, count) in steps:
                    forward(range(first, first + count), handle)
                    done.append((backward, first, count))
            except uvm.UVMError as exc:
                restored = "restored"
                for backward, first, count in reversed(done):
                    try:
                        backward(range(first, first + count), handle)
                    except uvm.UVMError as undo_exc:
                        restored = f"NOT fully restored ({undo_exc})"
                raise ReadviseError(
                    f"re-advise of layer {layer} failed: {exc}; previous residency "
                    f"({len(old)} experts) {restored}"
                ) from exc
            self._resident[layer] = new
        if self.slot_cache is not None:
            self.slot_cache.set_layer_resident(layer, new)
        moved = (len(promote) + len(demote)) * self.stores[layer].slot_nbytes
        return ReadviseResult(layer, promote, demote, moved)

    def enable_slot_cache(self, next_gates: Sequence[torch.Tensor] | None = None):
        """Create the per-layer GPU slot caches the config asks for (prefetch_slots > 0), fed by
        the config's prefetch mode; `next_gates[l]` (layer l+1's router weight) for lookahead."""
        cfg = self.config
        if cfg.prefetch_slots == 0:
            return None
        from moe_uvm.slots import SlotCache  # the slot machinery loads only when it is used

        profile = self.profile
        counts = None if profile is None else torch.from_numpy(profile.counts)
        if cfg.prefetch == "frequency" and counts is None:
            raise ValueError("prefetch='frequency' needs routing counts: set profile_path")
        cooc = None
        if profile is not None and profile.cooccurrence is not None:
            cooc = torch.from_numpy(profile.cooccurrence)
        self.slot_cache = SlotCache(
            [(store["w13"], store["w2"]) for store in self.stores],
            [self.resident_ids(layer) for layer in range(self.num_layers)],
            cfg.prefetch_slots, mode=cfg.prefetch,
            num_predicted=cfg.prefetch_experts, top_k=self.top_k,
            counts=counts, cooccurrence=cooc, next_gates=next_gates,
        )
        log.info("moe-uvm: %s", self.slot_cache.summary())
        return self.slot_cache

    def synchronize(self) -> None:
        """Wait until every enqueued prefetch has finished."""
        if self._stream is not None:
            self._stream.synchronize()

    # --- introspection -------------------------------------------------------------------------

    def resident_ids(self, layer: int) -> tuple[int, ...]:
        return self._resident[layer]

    def offloaded_ids(self, layer: int) -> tuple[int, ...]:
        resident = set(self._resident[layer])
        return tuple(e for e in range(self.num_experts) if e not in resident)

    def _layers(self, layer: int | None) -> range:
        return range(self.num_layers) if layer is None else range(layer, layer + 1)

    def resident_bytes(self, layer: int | None = None) -> int:
        """Bytes of expert slots advised to the GPU (one layer, or all)."""
        return sum(len(self._resident[i]) * self.stores[i].slot_nbytes for i in self._layers(layer))

    def offloaded_bytes(self, layer: int | None = None) -> int:
        return sum(
            (self.num_experts - len(self._resident[i])) * self.stores[i].slot_nbytes
            for i in self._layers(layer)
        )

    def summary(self) -> str:
        counts = [len(r) for r in self._resident]
        per_layer = f"{counts[0]}" if len(set(counts)) == 1 else f"{min(counts)}..{max(counts)}"
        where = (
            "managed memory" if self.is_managed else "CPU memory (no CUDA: advice is recorded only)"
        )
        return (
            f"moe-uvm: {self.num_layers} layers x {self.num_experts} experts "
            f"({self.stores[0].slot_nbytes / 2**20:.1f} MiB per expert slot) in {where}; "
            f"resident {per_layer}/{self.num_experts} per layer = "
            f"{self.resident_bytes() / 2**30:.2f} GiB on {self.device}, offloaded "
            f"{self.offloaded_bytes() / 2**30:.2f} GiB; selection={self.config.resident_selection}"
            f", prefetch={self.config.prefetch}"
            + (f"; {self.slot_cache.summary()}" if self.slot_cache is not None else "")
        )

    def __repr__(self) -> str:
        return self.summary()
