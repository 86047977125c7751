"""Routing traces (format: the README's File formats section): load and validate `.npz` files,
select sequences, save, and synthesise traces with skewed, topic-local, cross-layer-correlated
routing."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_TRACE = Path(__file__).parent / "data" / "sample_trace.npz"
"""Bundled slice of a synthetic Qwen3-30B-A3B-shaped trace: 8 layers, 8 sequences x 128 tokens."""
SAMPLE_NAME = "sample"
"""What names SAMPLE_TRACE wherever a trace path is taken (`--trace sample`)."""
LONG_TRACE = Path(__file__).parent / "data" / "long_trace.npz"
LONG_NAME = "long"
"""What names LONG_TRACE (`--trace long`): 8 layers x 16,384 tokens (32 sequences of 512) of the
Qwen3-30B-A3B routing shape (128 experts, top-8), made by `synthetic_trace(8, 128, 8,
num_sequences=32, tokens_per_sequence=512, zipf_exponent=0.9, topic_strength=0.8, seed=2026)`:
the skew (0.63 / 0.81 of routings to the top 25% / 50%) and consecutive-token overlap (0.24) of
the sample traces. Long enough to warm caches and time 256 steps at batch 16 on tokens never
replayed; `moe-uvm bench` uses it by default."""
FLAT_TRACE = Path(__file__).parent / "data" / "flat_trace.npz"
FLAT_NAME = "flat"
"""What names FLAT_TRACE (`--trace flat`): 24 layers x 4,096 tokens (16 sequences of 256) of the
Qwen3-30B-A3B routing shape with near-uniform routing (0.37 / 0.61 of routings to the top 25% /
50% of experts), made by `synthetic_trace(24, 128, 8, num_sequences=16, tokens_per_sequence=256,
zipf_exponent=0.3, topic_strength=0.3, layer_coupling=0.3, seed=2027)`: the worst case for
residency (every expert is needed about as often), e.g. for the CPU/GPU hybrid at 24 layers."""


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
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise TraceError(
                f"topk_ids has shape {ids.shape}: a trace needs at least one layer and one token"
            )
        if ids.min() < -1 or ids.max() >= self.num_experts:
            raise TraceError(
                f"topk_ids must lie in [-1, {self.num_experts}), found [{ids.min()}, {ids.max()}]"
            )
        if ids.max() < 0:
            raise TraceError("every expert id is -1 (padding): the trace routes no token")
        _refuse_repeated_experts(ids)
        starts = self.seq_starts
        num_tokens = ids.shape[1]
        if (
            starts.ndim != 1
            or starts.dtype.kind not in "iu"
            or starts.size == 0
            or starts[0] != 0
            or np.any(np.diff(starts) <= 0)
            or starts[-1] >= num_tokens
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
        """The sequences first..stop-1 (negatives count from the end, None is the end); bounds
        past the trace's sequences and selections of none are errors, not clamped."""
        n = self.num_sequences
        text = f"{first}:{'' if stop is None else stop}"
        if not -n <= first < n or (stop is not None and not -n <= stop <= n):
            raise TraceError(
                f"sequences {text} go past the trace's {n} sequences (allowed: FIRST in "
                f"[{-n}, {n}), STOP in [{-n}, {n}]; negatives count from the end)"
            )
        picked = range(n)[first:stop]
        if len(picked) == 0:
            raise TraceError(f"sequences {text} select nothing; the trace has {n} sequences")
        ends = np.append(self.seq_starts[1:], self.num_tokens)
        lo, hi = int(self.seq_starts[picked[0]]), int(ends[picked[-1]])
        weights = None if self.topk_weights is None else self.topk_weights[:, lo:hi]
        try:
            return RoutingTrace(
                self.topk_ids[:, lo:hi], self.num_experts, self.top_k,
                self.seq_starts[picked.start:picked.stop] - lo, weights,
            )
        except TraceError as exc:
            raise TraceError(f"sequences {text}: {exc}") from None

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


def _refuse_repeated_experts(ids: np.ndarray) -> None:
    """A router picks each expert at most once per token; a repeat would be counted twice."""
    ordered = np.sort(ids, axis=2)
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if repeated.any():
        layer, token, j = (int(i) for i in np.argwhere(repeated)[0])
        raise TraceError(
            f"layer {layer}, token {token}: expert {ordered[layer, token, j]} appears more than "
            f"once in the token's top-{ids.shape[2]} (each expert at most once per token)"
        )


def _array(data: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return data[key]
    except ValueError:
        # Object arrays land here too; numpy's own message would suggest allowing pickles.
        raise TraceError(f"trace {path}: '{key}' is damaged or not a numeric array") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise TraceError(f"trace {path}: '{key}' is damaged ({exc})") from None


def _scalar(data: np.lib.npyio.NpzFile, key: str, path: Path) -> int:
    value = _array(data, key, path)
    if value.shape != () or value.dtype.kind not in "iu":
        raise TraceError(
            f"trace {path}: '{key}' must be an integer scalar, got {value.dtype} {value.shape}"
        )
    return int(value)


def trace_path(name: str | Path) -> Path:
    """The file a trace argument names: SAMPLE_NAME, LONG_NAME and FLAT_NAME are the bundled
    traces."""
    bundled = {SAMPLE_NAME: SAMPLE_TRACE, LONG_NAME: LONG_TRACE, FLAT_NAME: FLAT_TRACE}
    return bundled.get(str(name), Path(name))


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """np.load of an .npz archive, after checking it is one: np.load takes anything else for a
    pickle and answers with advice to allow pickles, which must never be taken for a trace."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except FileNotFoundError:
        raise TraceError(f"trace {path}: no such file (give an .npz file, or a bundled "
                         f"trace: '{SAMPLE_NAME}', '{LONG_NAME}' or '{FLAT_NAME}')") from None
    except IsADirectoryError:
        raise TraceError(f"trace {path}: a folder, not an .npz file") from None
    except OSError as exc:
        raise TraceError(f"trace {path}: cannot read ({exc.strerror or exc})") from None
    if head == b"\x93NUMPY":
        raise TraceError(f"trace {path}: a single array (.npy), not an .npz archive of named "
                         "arrays")
    if not head.startswith(b"PK"):
        empty = "empty file, " if not head else ""
        raise TraceError(f"trace {path}: {empty}not a numpy .npz archive (traces are written by "
                         "numpy.savez; format: the README's File formats section)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise TraceError(f"trace {path}: damaged .npz archive ({exc})") from None


def load_trace(path: str | Path) -> RoutingTrace:
    """Read and validate a trace (a path, or SAMPLE_NAME for the bundled one); every problem
    raises TraceError naming the file and the key."""
    path = trace_path(path)
    with _open_npz(path) as data:
        missing = [key for key in ("topk_ids", "num_experts", "top_k") if key not in data.files]
        if missing:
            raise TraceError(
                f"trace {path}: missing key(s) {missing} (keys: {sorted(data.files)})"
            )
        num_experts = _scalar(data, "num_experts", path)
        top_k = _scalar(data, "top_k", path)
        ids = _array(data, "topk_ids", path)
        has = data.files
        starts = _array(data, "seq_starts", path) if "seq_starts" in has else np.zeros(1, np.int32)
        weights = _array(data, "topk_weights", path) if "topk_weights" in has else None
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
