"""Routing traces (format: shared TRACES.md): load and validate `.npz` files, select sequences,
save, and synthesise traces with skewed, topic-local, cross-layer-correlated routing."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_TRACE = Path(__file__).parent / "data" / "sample_trace.npz"
"""Bundled slice of a synthetic Qwen3-30B-A3B-shaped trace: 8 layers, 8 sequences x 128 tokens."""


class TraceError(ValueError):
    """A trace file or trace argument is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class RoutingTrace:
    """Expert ids per MoE layer and token. `topk_ids[l, t]` are token t's experts at layer l
    (-1 = padding); `seq_starts` holds the first token of each sequence (starting with 0)."""

    topk_ids: np.ndarray
    num_experts: int
    top_k: int
    seq_starts: np.ndarray
    topk_weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        ids = self.topk_ids
        if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu" or ids.ndim != 3:
            raise TraceError(
                f"topk_ids must be an integer array [layers, tokens, top_k], got "
                f"{getattr(ids, 'dtype', type(ids).__name__)} with shape {np.shape(ids)}"
            )
        if self.num_experts < 1:
            raise TraceError(f"num_experts must be >= 1, got {self.num_experts}")
        if ids.shape[2] != self.top_k or not 1 <= self.top_k <= self.num_experts:
            raise TraceError(
                f"top_k is {self.top_k} but topk_ids has {ids.shape[2]} ids per token "
                f"(and top_k must be in [1, num_experts={self.num_experts}])"
            )
        if ids.size and (ids.min() < -1 or ids.max() >= self.num_experts):
            raise TraceError(
                f"topk_ids must lie in [-1, {self.num_experts}), found [{ids.min()}, {ids.max()}]"
            )
        starts = self.seq_starts
        num_tokens = ids.shape[1]
        if (
            starts.ndim != 1
            or starts.dtype.kind not in "iu"
            or starts.size == 0
            or starts[0] != 0
            or np.any(np.diff(starts) <= 0)
            or starts[-1] >= max(num_tokens, 1)
        ):
            raise TraceError(
                f"seq_starts must be strictly increasing token indices starting at 0 and below "
                f"{num_tokens} tokens, got {starts.tolist()[:8]}{'...' if starts.size > 8 else ''}"
            )
        weights = self.topk_weights
        if weights is not None and (weights.dtype.kind != "f" or weights.shape != ids.shape):
            raise TraceError(
                f"topk_weights must be a float array of topk_ids' shape {ids.shape}, got "
                f"{weights.dtype} {weights.shape}"
            )

    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def num_sequences(self) -> int:
        return len(self.seq_starts)

    def sequences(self, first: int, stop: int | None) -> RoutingTrace:
        """The sequences first..stop-1 (Python slice rules: negatives count from the end, None
        is the end); selecting none is an error."""
        picked = range(self.num_sequences)[first:stop]
        if len(picked) == 0:
            raise TraceError(
                f"sequences {first}:{stop} select nothing; the trace has {self.num_sequences}"
            )
        ends = np.append(self.seq_starts[1:], self.num_tokens)
        lo, hi = int(self.seq_starts[picked[0]]), int(ends[picked[-1]])
        weights = None if self.topk_weights is None else self.topk_weights[:, lo:hi]
        return RoutingTrace(
            self.topk_ids[:, lo:hi], self.num_experts, self.top_k,
            self.seq_starts[picked.start:picked.stop] - lo, weights,
        )

    def save(self, path: str | Path) -> None:
        arrays = {
            "topk_ids": self.topk_ids,
            "num_experts": np.int32(self.num_experts),
            "top_k": np.int32(self.top_k),
            "seq_starts": self.seq_starts.astype(np.int32),
        }
        if self.topk_weights is not None:
            arrays["topk_weights"] = self.topk_weights
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)


def _scalar(data: np.lib.npyio.NpzFile, key: str, path: Path) -> int:
    value = data[key]
    if value.shape != () or value.dtype.kind not in "iu":
        raise TraceError(
            f"trace {path}: '{key}' must be an integer scalar, got {value.dtype} {value.shape}"
        )
    return int(value)


def load_trace(path: str | Path) -> RoutingTrace:
    """Read and validate a trace; every problem raises TraceError naming the key."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise TraceError(f"trace {path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise TraceError(f"trace {path}: not a readable .npz file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise TraceError(f"trace {path}: a single array, not an .npz archive of named arrays")
    with data:
        missing = [key for key in ("topk_ids", "num_experts", "top_k") if key not in data.files]
        if missing:
            raise TraceError(
                f"trace {path}: missing key(s) {missing} (keys: {sorted(data.files)})"
            )
        try:
            num_experts = _scalar(data, "num_experts", path)
            top_k = _scalar(data, "top_k", path)
            ids = data["topk_ids"]
            starts = data["seq_starts"] if "seq_starts" in data.files else np.zeros(1, np.int32)
            weights = data["topk_weights"] if "topk_weights" in data.files else None
        except TraceError:
            raise
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
            raise TraceError(f"trace {path}: damaged or unreadable array ({exc})") from None
    try:
        return RoutingTrace(ids, num_experts, top_k, starts, weights)
    except TraceError as exc:
        raise TraceError(f"trace {path}: {exc}") from None


def parse_range(text: str, what: str = "sequences") -> tuple[int, int | None]:
    """'0:8' -> (0, 8); ':8', '8:' and '-4:' follow Python slices ('8:' -> (8, None))."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        first = int(parts[0]) if parts[0].strip() else 0
        stop = int(parts[1]) if parts[1].strip() else None
    except ValueError:
        raise TraceError(f"{what} must look like FIRST:STOP (e.g. 0:8), got {text!r}") from None
    return first, stop


def synthetic_trace(
    num_layers: int,
    num_experts: int,
    top_k: int,
    *,
    num_sequences: int = 16,
    tokens_per_sequence: int = 256,
    zipf_exponent: float = 1.0,
    topic_strength: float = 1.0,
    layer_coupling: float = 1.0,
    seed: int = 0,
) -> RoutingTrace:
    """A trace of the sample traces' kind: per layer a Zipf popularity over a random permutation
    of the experts, a per-sequence random tilt (topic locality) and a pull toward a fixed random
    image of the token's experts at the previous layer (cross-layer correlation)."""
    rng = np.random.default_rng(seed)
    T = num_sequences * tokens_per_sequence
    ranks = np.argsort(rng.random((num_layers, num_experts)), axis=1) + 1
    popularity = -zipf_exponent * np.log(ranks)
    topic = topic_strength * rng.standard_normal((num_layers, num_sequences, num_experts))
    image = np.argsort(rng.random((num_layers, num_experts)), axis=1)
    seq_of_token = np.repeat(np.arange(num_sequences), tokens_per_sequence)
    ids = np.empty((num_layers, T, top_k), np.int16)
    previous = None
    for layer in range(num_layers):
        logits = popularity[layer] + topic[layer, seq_of_token]
        if previous is not None:
            pulled = np.zeros((T, num_experts), bool)
            pulled[np.arange(T)[:, None], image[layer][previous]] = True
            logits = logits + layer_coupling * pulled
        # Gumbel-top-k draws k distinct experts with softmax(logits) sampling without replacement.
        keys = logits + rng.gumbel(size=logits.shape)
        chosen = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
        order = np.argsort(-np.take_along_axis(keys, chosen, axis=1), axis=1)
        previous = np.take_along_axis(chosen, order, axis=1)
        ids[layer] = previous
    starts = np.arange(num_sequences, dtype=np.int32) * tokens_per_sequence
    return RoutingTrace(ids, num_experts, top_k, starts)
