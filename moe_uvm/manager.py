"""ExpertOffloadManager: owns each layer's resident set and carries out a residency plan
(moe_uvm.policies.plan) and the decisions that follow as advice on the layer's ManagedExpertStore
(promote/demote only the difference, one call per run of consecutive experts, all-or-nothing per
layer), plus accounting for logs and benchmarks."""

from __future__ import annotations

import logging
import math
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from moe_uvm import uvm
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.policies.plan import ResidencyPlan, plan_residency
from moe_uvm.profile import Profile, load_profile
from moe_uvm.store import ManagedExpertStore, Pace, coalesce

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


_STOP = object()


def _work(manager_ref: weakref.ref, jobs: queue.SimpleQueue, device: torch.device) -> None:
    """The re-advise worker: runs jobs (count copies to decide on, re-advises, barriers) one at
    a time; while CUDA graphs record routing it also polls the counters every `_poll_s`.
    Holds the manager only while a job runs, so an unreferenced manager is collected (its
    finalizer stops this thread)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        try:
            uvm.relax_capture_mode()
        except uvm.UVMError as exc:
            log.warning("moe-uvm: %s; a re-advise during a graph capture may invalidate it", exc)
    while True:
        manager = manager_ref()
        if manager is None:
            return
        timeout = manager._poll_s if manager._graphs and manager.plan.decides else None
        del manager
        try:
            job = jobs.get(timeout=timeout)
        except queue.Empty:
            job = ("poll",)
        manager = manager_ref()
        if job is _STOP or manager is None:
            return
        manager._run(job)
        del manager


class ExpertOffloadManager:
    """Residency of every offloaded MoE layer.

    `stores[l]` holds layer l's experts. On construction the plan's initial residency (by
    default the config's plan for these stores) is applied: resident experts
    PreferredLocation=GPU and prefetched there, offloaded experts PreferredLocation=CPU with
    their pages on the host (both AccessedBy=GPU, so the GPU never page-faults on them).

    `record` (called by each layer's forward) counts routing on the device, in CUDA graphs
    too. When the plan decides (resident_selection "frequency" and/or `adaptive`), a worker
    thread takes the decisions from asynchronous copies of the counts and carries them out
    (the host-blocking advice calls): the decode thread never syncs for a decision and never
    waits on advice. The worker's CUDA calls go to its own stream in relaxed capture mode, so a
    re-advise in flight does not break a CUDA graph captured meanwhile. A failed re-advise is
    rolled back whole, logged and kept in `failures`; the policy is told the residency that
    stands. `close()` (or `with manager:`) stops the worker and frees the stores. On the CPU
    path (stores in CPU memory) the same bookkeeping runs and no CUDA call is made.
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
        self.split = None  # the planner's Split when it chose the config (offload_experts)
        self.hybrid = (False, "cpu_experts='off'")  # (on, why) of the CPU/GPU hybrid
        # its attachment, deferred until the weights are written (offload.finish_hybrid)
        self.pending_hybrid: Callable[[], tuple[bool, str]] | None = None
        # told (layer, ids) of the experts the GPU computes itself (the hybrid's masks)
        self._gpu_set_listeners: list[Callable[[int, tuple[int, ...]], None]] = []
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
        self.layers: list[FusedMoE] = []  # the modules these stores serve (offload_experts)
        self.failures: list[ReadviseError] = []
        self._stats = dict.fromkeys(
            ("decisions", "readvises", "promoted", "demoted", "bytes_moved", "failures"), 0
        )
        self._stream = torch.cuda.Stream(self.device) if self.is_managed else None
        self._resident: list[tuple[int, ...]] = [() for _ in range(self.num_layers)]
        for layer in range(self.num_layers):
            self._apply_all(layer, self.plan.resident_ids(layer))
        self.warmup = self.plan.counter(device=self.device)
        self._count_lock = threading.Lock()  # the counts' host side: worker vs routing_counts
        self._closed = False
        self._graphs = False  # set once a capture recorded routing: poll the counters then
        self._poll_s = config.adaptive_poll_ms / 1e3
        self._pace = (Pace(int(config.readvise_chunk_mb * 2**20), config.readvise_pause_ms / 1e3)
                      if config.readvise_chunk_mb > 0 else None)
        self._due_in = self.warmup.tokens_until_due() if self.plan.decides else math.inf
        self._since_copy = 0
        self._copy_pending = False
        shape = (self.num_layers, self.num_experts + 1)
        pinned = self.is_managed
        self._copy_host = torch.empty(shape, dtype=torch.int32, pin_memory=pinned)
        self._poll_host = torch.empty(shape, dtype=torch.int32, pin_memory=pinned)
        self._copy_event = torch.cuda.Event() if pinned else None
        self._poll_event = torch.cuda.Event() if pinned else None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_work, args=(weakref.ref(self), self._jobs, self.device),
            name="moe-uvm-readvise", daemon=True,
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._jobs.put, _STOP)

    def _plan(self) -> ResidencyPlan:
        """The config's plan for these stores (`offload_experts` makes it before allocating)."""
        store, profile = self.stores[0], self.profile
        return plan_residency(
            self.config, self.num_layers, self.num_experts, store.slot_nbytes,
            store.expert_nbytes,
            counts=None if profile is None else profile.counts,
            counts_tokens=0 if profile is None else profile.num_tokens,
        )

    # --- routing counts and dynamic residency (decode thread) ----------------------------------

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Routing hook each offloaded layer calls with its `topk_ids`. HOT PATH: device ops
        only, captured into CUDA graphs (replays count too); no lock, no host sync. After the
        last layer of an eager step in which a decision may have come due, it queues an
        asynchronous copy of the counts for the worker to decide on. A no-op while
        torch.compile traces."""
        if torch.compiler.is_compiling() or not self.warmup.record(layer, topk_ids):
            return
        if layer != self.num_layers - 1 or self._closed:
            return
        if topk_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            if not self._graphs:
                self._graphs = True
                self._jobs.put(("wake",))  # the worker starts polling the counters
            return
        self._since_copy += topk_ids.shape[0]
        if self._since_copy >= self._due_in and not self._copy_pending:
            self._since_copy = 0
            self._copy_pending = True
            self._jobs.put(("counts", *self._copy_counts(self._copy_host, self._copy_event)))

    def _copy_counts(self, host: torch.Tensor, event: torch.cuda.Event | None, stream=None):
        """An asynchronous copy of the counters into `host` (ordered after the work queued so
        far on `stream`, default the current one) and the event that marks it done."""
        counts = self.warmup.device_counts
        if counts is None:
            host.zero_()
            return host, None
        if event is None:
            host.copy_(counts)
            return host, None
        with torch.cuda.stream(stream or torch.cuda.current_stream(self.device)):
            host.copy_(counts, non_blocking=True)
            event.record()
        return host, event

    # --- the worker ------------------------------------------------------------------------------

    def _run(self, job: tuple) -> None:
        """One job on the worker thread; nothing escapes it (failures are logged and kept)."""
        kind, *args = job
        try:
            if kind == "counts":
                host, event = args
                try:
                    if event is not None:
                        event.synchronize()
                    self._decide(host)
                finally:
                    self._copy_pending = False  # the decode thread may copy into `host` again
            elif kind == "poll":
                # Unordered with the decode stream: counts only grow, folds take increases.
                host, event = self._copy_counts(self._poll_host, self._poll_event, self._stream)
                if event is not None:
                    event.synchronize()
                self._decide(host)
            elif kind == "barrier":
                host, done = args
                if host is not None:
                    self._decide(host)
                done.set_result(None)
            elif kind == "readvise":
                layer, ids, done = args
                try:
                    done.set_result(self._readvise_now(layer, ids))
                except BaseException as exc:  # handed to the caller
                    done.set_exception(exc)
        except Exception as exc:  # a bug or an unexpected CUDA error: keep the worker alive
            error = ReadviseError(f"moe-uvm re-advise worker: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            self._fail(error)
            if kind == "barrier" and not args[1].done():
                args[1].set_result(None)

    def _decide(self, host: torch.Tensor) -> None:
        with self._count_lock:
            self.warmup.fold(host)
            changes = {}
            if self.plan.decides and self.warmup.decision_due(fresh=False):
                changes = self.warmup.decide(fresh=False)
                self._stats["decisions"] += 1
            self._due_in = self.warmup.tokens_until_due() if self.plan.decides else math.inf
        for layer, ids in changes.items():
            try:
                result = self._readvise_now(layer, self._validated(layer, ids))
            except ReadviseError as exc:
                self._fail(exc)
            else:
                log.info("moe-uvm: layer %d re-advised, %d promoted, %d demoted", layer,
                         len(result.promoted), len(result.demoted))

    def _fail(self, error: ReadviseError) -> None:
        """Log and keep a failure; the policy is told the residency that stands."""
        log.warning("%s", error)
        self.failures.append(error)
        self._stats["failures"] += 1
        with self._count_lock:
            for layer in range(self.num_layers):
                self.warmup.set_resident(layer, list(self._resident[layer]))

    def wait_idle(self) -> None:
        """Take the decision that is due now (from counts copied after all work queued so far),
        wait until the worker has carried out everything scheduled and the prefetches are done;
        then report an expert id outside [0, E) that reached a layer (`check_routing`)."""
        if not self._closed:
            counts = self.warmup.device_counts
            host = None if counts is None else counts.cpu()
            done: Future = Future()
            self._jobs.put(("barrier", host, done))
            done.result()
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
        with self._count_lock:
            return self.warmup.host_counts()

    def save_profile(self, path: str, model_id: str | None = None) -> Profile:
        """Write the live routing counts as a profile (usable with resident_selection=profile)."""
        if self.top_k is None:
            raise ValueError("saving a profile needs the layers' top_k (offload_experts sets it)")
        counts = self.routing_counts()
        with self._count_lock:
            tokens = self.warmup.tokens_recorded
        profile = Profile(
            self.num_layers, self.num_experts, self.top_k, tokens, counts, model_id=model_id
        )
        profile.save(path)
        return profile

    def stats(self) -> dict[str, int]:
        """Counts since construction: decisions taken, re-advises done, experts promoted and
        demoted, bytes moved, failures."""
        return dict(self._stats)

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
    def pace(self) -> Pace | None:
        """How re-advises migrate pages (from readvise_chunk_mb / readvise_pause_ms; None: one
        call per run). Settable, e.g. to re-advise faster while nothing decodes."""
        return self._pace

    @pace.setter
    def pace(self, value: Pace | None) -> None:
        if value is not None and not isinstance(value, Pace):
            raise TypeError(f"pace must be a moe_uvm.store.Pace or None, got {value!r}")
        self._pace = value

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
        """Make `resident_ids` layer `layer`'s resident set, advising only the difference
        (demotions first, so GPU memory is released before promotions take it). Any thread may
        call it; the advice runs on the manager's worker (in order with its decisions) while
        the caller waits, and the policy is told the new set.

        All-or-nothing: bad ids are refused before anything runs; if a call fails, every run
        already changed, and the one that failed, is advised back to what it was, and
        `ReadviseError` reports the failure and whether the old residency was restored."""
        new = self._validated(layer, resident_ids)
        if self._closed:
            raise ReadviseError(f"re-advise of layer {layer}: the manager is closed")
        if threading.current_thread() is self._thread:
            return self._readvise_now(layer, new)
        done: Future = Future()
        self._jobs.put(("readvise", layer, new, done))
        return done.result()

    def _readvise_now(self, layer: int, new: tuple[int, ...]) -> ReadviseResult:
        old = self._resident[layer]
        promote = tuple(sorted(set(new) - set(old)))
        demote = tuple(sorted(set(old) - set(new)))
        store = self.stores[layer]
        steps = [(store.advise_offloaded, store.advise_resident, run) for run in coalesce(demote)]
        steps += [(store.advise_resident, store.advise_offloaded, run) for run in coalesce(promote)]
        handle = self._stream_handle()
        done = []
        # While pages move, the GPU computes both the old and the new resident experts itself
        # (either is correct wherever the pages are; the CPU never reads a GPU-bound page).
        self._tell_gpu_set(layer, tuple(sorted(set(old) | set(new))))
        try:
            for forward, backward, (first, count) in steps:
                # Undoing a half-applied run re-applies its old state whole.
                done.append((backward, first, count))
                forward(range(first, first + count), handle, self._pace)
            if self.slot_cache is not None and steps:
                self.slot_cache.set_layer_resident(layer, new, self._stream)
        except Exception as exc:
            restored = "restored"
            for backward, first, count in reversed(done):
                try:
                    backward(range(first, first + count), handle, self._pace)
                except Exception as undo_exc:
                    restored = f"NOT fully restored ({undo_exc})"
            if self.slot_cache is not None:
                try:
                    self.slot_cache.set_layer_resident(layer, old, self._stream)
                except Exception as undo_exc:
                    restored += f"; slot-cache mask not restored ({undo_exc})"
            self._tell_gpu_set(layer, old)
            raise ReadviseError(
                f"re-advise of layer {layer} failed: {type(exc).__name__}: {exc}; previous "
                f"residency ({len(old)} experts) {restored}"
            ) from exc
        self._resident[layer] = new
        self._tell_gpu_set(layer, new)
        with self._count_lock:
            self.warmup.set_resident(layer, list(new))
        moved = (len(promote) + len(demote)) * store.slot_nbytes
        if steps:
            self._stats["readvises"] += 1
            self._stats["promoted"] += len(promote)
            self._stats["demoted"] += len(demote)
            self._stats["bytes_moved"] += moved
        return ReadviseResult(layer, promote, demote, moved)

    def add_gpu_set_listener(self, listener: Callable[[int, tuple[int, ...]], None]) -> None:
        """Call `listener(layer, ids)` with the experts the GPU must compute itself whenever a
        re-advise changes them: the old and new resident sets together while pages move, then
        the new set (the old one if it failed). The CPU/GPU hybrid keeps its masks with it."""
        self._gpu_set_listeners.append(listener)

    def _tell_gpu_set(self, layer: int, ids: tuple[int, ...]) -> None:
        for listener in self._gpu_set_listeners:
            listener(layer, ids)

    def enable_slot_cache(self, next_gates: Sequence[torch.Tensor] | None = None):
        """Create the per-layer GPU slot caches the config asks for (prefetch_slots > 0), fed by
        the config's prefetch mode; `next_gates[l]` (layer l+1's router weight) for lookahead."""
        cfg = self.config
        if cfg.num_slots == 0:
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
            cfg.num_slots, mode=cfg.prefetch, eviction=cfg.slot_eviction,
            num_predicted=cfg.prefetch_experts, top_k=self.top_k,
            counts=counts, cooccurrence=cooc, next_gates=next_gates,
        )
        log.info("moe-uvm: %s", self.slot_cache.summary())
        return self.slot_cache

    def synchronize(self) -> None:
        """Wait until every enqueued prefetch has finished."""
        if self._stream is not None:
            self._stream.synchronize()

    # --- lifetime ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release everything: stop and join the worker (after the job it is running), free the
        slot caches and the managed stores. The layers keep their shapes but no weights: a
        forward raises until they are offloaded again. Idempotent; also `with manager:`."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._finalizer.detach()
        for module in self.layers:
            module.release_experts("its offload manager was closed")
        self.layers = []
        self.slot_cache = None
        if self.is_managed:
            torch.cuda.synchronize(self.device)  # no kernel may still read what is freed
        for store in self.stores:
            store.free()
        self.warmup.release()
        self._stream = self._copy_event = self._poll_event = None

    def __enter__(self) -> ExpertOffloadManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
            + (f"; {len(self.failures)} failed re-advises" if self.failures else "")
            + ("; closed" if self._closed else "")
        )

    def __repr__(self) -> str:
        return self.summary()
