"""Caches filled on read, replayed over a trace's step reads for `moe_uvm.simulate`: LRU
(mixtral-offloading style), llama.cpp's frequency-class LRU, and Belady's clairvoyant MIN, the
fewest misses any cache of the same size can have. Each returns per step and layer the hits,
and per step the experts moved in or out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_uvm.policies.residency import first_n
from moe_uvm.trace import RoutingTrace


@dataclass(frozen=True)
class CacheSettings:
    """The caches filled on read (CACHE_POLICIES). lru and freq_lru start holding experts
    0..n-1 and replay the first `warmup_tokens` tokens, rounded up to whole steps (at most half
    the trace), before counting: simulate() gets a profile as counts, which have no order to
    replay a cache over.
    belady counts the same steps, so its row bounds theirs. freq_lru's usage counts lose half
    their weight every `half_life_tokens` tokens."""

    warmup_tokens: int = 256
    half_life_tokens: float = 128.0

    def __post_init__(self) -> None:
        if self.warmup_tokens < 0:
            raise ValueError(f"cache warm-up must be >= 0 tokens, got {self.warmup_tokens}")
        if not self.half_life_tokens > 0:
            raise ValueError(f"freq_lru half-life must be > 0 tokens, got "
                             f"{self.half_life_tokens}")

    def warmup_steps(self, batch: int, steps: int) -> int:
        """Steps of `batch` tokens the caches warm up on: `warmup_tokens` rounded up to whole
        steps, at most half of the trace's `steps` so a short trace still has steps to count."""
        return min(-(-self.warmup_tokens // batch), steps // 2)


def _keep(held: np.ndarray, sizes: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Per row, the sizes[row] held experts that sort first by `keys` (the first key
    primary, smaller first; ties keep the lower id)."""
    over = held.sum(axis=1) > sizes
    if not np.any(over):
        return held
    rows = np.flatnonzero(over)
    ids = np.broadcast_to(np.arange(held.shape[1]), (rows.size, held.shape[1]))
    order = np.lexsort((ids, *(k[rows] for k in reversed(keys)), ~held[rows]), axis=1)
    rank = np.argsort(order, axis=1)
    kept = held.copy()
    kept[rows] &= rank < sizes[rows, None]
    return kept


def lru(touched: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer a cache of sizes[l] experts, filled on miss (copy-on-demand); the least
    recently used expert leaves. Starts holding experts 0..n-1, like first_n (cold). Returns
    per step and layer the hits, and per step the experts moved in or out."""
    steps, L, E = touched.shape
    cached = first_n(E, sizes)
    last_use = np.full((L, E), -1, np.int64)
    hits = np.zeros((steps, L), np.int64)
    moves = np.zeros(steps, np.int64)
    for s in range(steps):
        now = touched[s]
        hits[s] = (now & cached).sum(axis=1)
        last_use[now] = s
        held = _keep(cached | now, sizes, -last_use)
        moves[s] = (held ^ cached).sum()
        cached = held
    return hits, moves


def freq_lru(
    trace: RoutingTrace, touched: np.ndarray, batch: int, sizes: np.ndarray, half_life: float
) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's MoE expert cache: per layer usage counts (tokens routed) that decay by
    0.5**(tokens / half_life); a miss is copied in, and a full cache drops the least recently
    used expert of the lowest frequency class floor(log2(1 + count)) (our bucketing: powers of
    two). Experts read this step stay first. Starts holding experts 0..n-1 with no counts.
    Returns what `lru` does."""
    steps, L, E = touched.shape
    T = trace.num_tokens
    ids = trace.topk_ids.astype(np.int64)
    cached = first_n(E, sizes)
    counts = np.zeros((L, E))
    last_use = np.full((L, E), -1, np.int64)
    hits = np.zeros((steps, L), np.int64)
    moves = np.zeros(steps, np.int64)
    row = np.arange(L)[:, None] * E
    for s in range(steps):
        now = touched[s]
        hits[s] = (now & cached).sum(axis=1)
        block = ids[:, s * batch : (s + 1) * batch].reshape(L, -1)
        flat = (block + row)[block >= 0]
        routed = np.bincount(flat, minlength=L * E).reshape(L, E)
        counts = counts * 0.5 ** (min(batch, T - s * batch) / half_life) + routed
        last_use[now] = s
        # frexp's exponent is floor(log2(x)) + 1 exactly, where np.log2 may round up.
        level = np.frexp(1.0 + counts)[1] - 1
        held = _keep(cached | now, sizes, ~now, -level, -last_use)
        moves[s] = (held ^ cached).sum()
        cached = held
    return hits, moves


def belady(touched: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The clairvoyant bound (Belady's MIN): after each step the cache keeps the sizes[l]
    experts, of those it held or just read, whose next read comes soonest (held ones, then
    lower ids, first on ties), so a miss is copied in unless it is the furthest. It starts
    holding the experts read first, not 0..n-1: MIN from those contents has no more misses
    over these steps than any cache of that size whatever it starts holding and however it
    evicts, including one that never changes (a static set) or skips a fill. Returns what
    `lru` does."""
    steps, L, E = touched.shape
    step, layer, expert = np.nonzero(touched)
    # Per read, the step of the same expert's next read in its layer (`steps`: none).
    order = np.lexsort((step, expert, layer))
    following = np.full(step.size, steps, np.int64)
    same = (np.diff(layer[order]) == 0) & (np.diff(expert[order]) == 0)
    following[order[:-1][same]] = step[order[1:][same]]
    next_use = np.full((L, E), steps, np.int64)
    np.minimum.at(next_use, (layer, expert), step)
    bounds = np.searchsorted(step, np.arange(steps + 1))
    cached = _keep(np.ones((L, E), bool), sizes, next_use)
    hits = np.zeros((steps, L), np.int64)
    moves = np.zeros(steps, np.int64)
    for s in range(steps):
        now = touched[s]
        hits[s] = (now & cached).sum(axis=1)
        reads = slice(bounds[s], bounds[s + 1])
        next_use[layer[reads], expert[reads]] = following[reads]
        held = _keep(cached | now, sizes, next_use, ~cached)
        moves[s] = (held ^ cached).sum()
        cached = held
    return hits, moves
