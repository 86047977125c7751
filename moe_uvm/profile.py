"""Routing profiles: per-layer expert counts (and optionally layer-to-next-layer co-occurrence) in a
versioned JSON file. Built from traces or live counts, merged, saved, and loaded with every field
checked, so a damaged or mismatched profile is refused before anything is allocated."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_uvm.trace import RoutingTrace

FORMAT = "moe-uvm-profile"
VERSION = 1
_FIELDS = {"format", "version", "model_id", "num_layers", "num_experts", "top_k", "num_tokens",
           "counts", "cooccurrence"}


class ProfileError(ValueError):
    """A profile is invalid or does not fit the model; the message says what and where."""


def _count_array(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        array = np.array(value)
    except ValueError:
        raise ProfileError(f"{what} is ragged; expected shape {shape}") from None
    if array.size and array.dtype.kind not in "iu":
        raise ProfileError(f"{what} must hold integers, found {array.dtype} values")
    if array.shape != shape:
        raise ProfileError(f"{what} has shape {array.shape}, expected {shape}")
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        where = [int(i) for i in np.unravel_index(int(array.argmin()), array.shape)]
        raise ProfileError(f"{what} must be >= 0, found {array.min()} at index {where}")
    return array


@dataclass(frozen=True)
class Profile:
    """counts[l, e]: tokens routed to expert e at MoE layer l over `num_tokens` tokens.
    cooccurrence[l, a, b] (optional): tokens routed to a at layer l and to b at layer l+1."""

    num_layers: int
    num_experts: int
    top_k: int
    num_tokens: int
    counts: np.ndarray
    cooccurrence: np.ndarray | None = None
    model_id: str | None = None

    def __post_init__(self) -> None:
        for name, low in (("num_layers", 1), ("num_experts", 1), ("top_k", 1), ("num_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ProfileError(f"{name} must be an integer >= {low}, got {value!r}")
        L, E, k, T = self.num_layers, self.num_experts, self.top_k, self.num_tokens
        if k > E:
            raise ProfileError(f"top_k ({k}) exceeds num_experts ({E})")
        if self.model_id is not None and not isinstance(self.model_id, str):
            raise ProfileError(f"model_id must be a string or null, got {self.model_id!r}")
        counts = _count_array(self.counts, (L, E), "counts")
        object.__setattr__(self, "counts", counts)
        # An expert is chosen at most once per token, and a token makes top_k choices per layer
        # (fewer when padded).
        if counts.size and counts.max() > T:
            raise ProfileError(f"counts has a value {counts.max()} above num_tokens={T}")
        sums = counts.sum(axis=1)
        if np.any(sums > T * k):
            layer = int(np.argmax(sums > T * k))
            raise ProfileError(
                f"counts of layer {layer} sum to {sums[layer]}, more than num_tokens x top_k = "
                f"{T * k}"
            )
        if self.cooccurrence is not None:
            co = _count_array(self.cooccurrence, (L - 1, E, E), "cooccurrence")
            bound = np.minimum(counts[:-1, :, None], counts[1:, None, :])
            if np.any(co > bound):
                layer, a, b = (int(i) for i in np.argwhere(co > bound)[0])
                raise ProfileError(
                    f"cooccurrence[{layer}][{a}][{b}] = {co[layer, a, b]} exceeds the counts of "
                    f"expert {a} at layer {layer} or expert {b} at layer {layer + 1}"
                )
            object.__setattr__(self, "cooccurrence", co)

    def check_matches(self, num_layers: int, num_experts: int, top_k: int) -> None:
        """Refuse a profile recorded for a different model shape."""
        if (self.num_layers, self.num_experts, self.top_k) != (num_layers, num_experts, top_k):
            source = f" ({self.model_id})" if self.model_id else ""
            raise ProfileError(
                f"profile{source} is for {self.num_layers} MoE layers x {self.num_experts} "
                f"experts, top-{self.top_k}; the model has {num_layers} x {num_experts}, "
                f"top-{top_k}"
            )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "model_id": self.model_id,
            "num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
            "num_tokens": self.num_tokens, "counts": self.counts.tolist(),
        }
        if self.cooccurrence is not None:
            data["cooccurrence"] = self.cooccurrence.tolist()
        return data

    def save(self, path: str | Path) -> None:
        """Write the JSON file; a crash mid-write leaves any previous file intact."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, separators=(",", ":"))
        os.replace(tmp, path)

    def merge(self, other: Profile) -> Profile:
        """Counts of both profiles added up (co-occurrence kept only if both have it)."""
        other.check_matches(self.num_layers, self.num_experts, self.top_k)
        if self.model_id and other.model_id and self.model_id != other.model_id:
            raise ProfileError(
                f"cannot merge profiles of different models: {self.model_id!r} and "
                f"{other.model_id!r}"
            )
        co = None
        if self.cooccurrence is not None and other.cooccurrence is not None:
            co = self.cooccurrence + other.cooccurrence
        return Profile(
            self.num_layers, self.num_experts, self.top_k, self.num_tokens + other.num_tokens,
            self.counts + other.counts, co, self.model_id or other.model_id,
        )

    @classmethod
    def from_trace(
        cls, trace: RoutingTrace, *, model_id: str | None = None, cooccurrence: bool = False
    ) -> Profile:
        """Count a trace's routing (padding ids -1 are skipped)."""
        L, T, E = trace.num_layers, trace.num_tokens, trace.num_experts
        ids = trace.topk_ids.astype(np.int64)
        valid = ids >= 0
        flat = (np.arange(L)[:, None, None] * E + ids)[valid]
        counts = np.bincount(flat, minlength=L * E).reshape(L, E)
        co = None
        # With one layer there is no next layer to pair with: no co-occurrence.
        if cooccurrence and L > 1:
            a, b = ids[:-1, :, :, None], ids[1:, :, None, :]
            pair = (np.arange(L - 1)[:, None, None, None] * E + a) * E + b
            co = np.bincount(pair[(a >= 0) & (b >= 0)], minlength=(L - 1) * E * E)
            co = co.reshape(L - 1, E, E)
        return cls(L, E, trace.top_k, T, counts, co, model_id)


def load_profile(path: str | Path) -> Profile:
    """Read a profile; any problem raises ProfileError naming the file and the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ProfileError(f"profile {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile {path}: cannot read ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(
            f"profile {path}: not valid JSON (truncated or damaged?): {exc.msg} at line "
            f"{exc.lineno} column {exc.colno}"
        ) from None
    try:
        if not isinstance(data, dict):
            raise ProfileError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ProfileError(f"format tag is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION or isinstance(data.get("version"), bool):
            raise ProfileError(
                f"version {data.get('version')!r} is not supported (this moe-uvm reads "
                f"version {VERSION})"
            )
        unknown = sorted(set(data) - _FIELDS)
        missing = sorted(_FIELDS - {"model_id", "cooccurrence"} - set(data))
        if unknown or missing:
            raise ProfileError(f"unknown fields {unknown}, missing fields {missing}")
        profile = Profile(
            data["num_layers"], data["num_experts"], data["top_k"], data["num_tokens"],
            data["counts"], data.get("cooccurrence"), data.get("model_id"),
        )
        # Such a profile would plan and rank experts on nothing; it comes from an empty
        # calibration (no tokens, or tokens whose routing was all padding).
        if profile.num_tokens == 0 or not profile.counts.any():
            raise ProfileError(
                f"records {profile.num_tokens} tokens and {int(profile.counts.sum())} routed "
                "experts: nothing to rank experts by (calibrate on tokens with routing)"
            )
        return profile
    except ProfileError as exc:
        raise ProfileError(f"profile {path}: {exc}") from None
