"""Choosing parameters by dotted name for the dense offloader: patterns are runs of whole
dot-separated segments (`mlp.experts` matches `3.mlp.experts.w13_weight`, not
`3.mlp.shared_experts.gate_proj.weight`); a pattern that matches nothing is an error."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from moe_uvm.config import split_list

_SEGMENT = re.compile(r"[A-Za-z0-9_]+")


def parse_param_patterns(value: Any) -> tuple[str, ...]:
    """Patterns from "mlp.experts, self_attn.o_proj" style strings or a list of strings; empty
    items are skipped, duplicates dropped (first kept). `None` or empty means all parameters."""
    patterns: list[str] = []
    for item in split_list(value, "offload_params", "strings"):
        if not isinstance(item, str):
            raise ValueError(f"offload_params: {item!r} is not a string")
        pattern = item.strip()
        if not pattern:
            continue
        segments = pattern.split(".")
        if not all(_SEGMENT.fullmatch(s) for s in segments):
            raise ValueError(
                f"offload_params: {pattern!r} is not a dotted parameter name; allowed: segments "
                "of letters, digits and '_' joined by single dots, e.g. 'mlp.experts'"
            )
        if pattern not in patterns:
            patterns.append(pattern)
    return tuple(patterns)


def name_matches(name: str, pattern: str) -> bool:
    """Whether `pattern`'s segments occur as a contiguous run of whole segments of `name`."""
    have, want = name.split("."), pattern.split(".")
    width = len(want)
    return any(have[i : i + width] == want for i in range(len(have) - width + 1))


def name_shapes(names: Iterable[str]) -> list[str]:
    """The distinct names with numeric segments shown as `*` (how errors list what exists: one
    entry per kind of parameter, not one per layer)."""
    shapes: dict[str, None] = {}
    for name in names:
        shapes.setdefault(".".join("*" if s.isdigit() else s for s in name.split(".")))
    return list(shapes)


def select_param_names(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The names (in order) that match any pattern; every name when `patterns` is empty.

    A pattern that matches none of `names` is an error naming it and listing what exists, so
    a typo (`mlp.expert`) cannot silently offload nothing."""
    if not patterns:
        return list(names)
    unmatched = [p for p in patterns if not any(name_matches(n, p) for n in names)]
    if unmatched:
        raise ValueError(
            f"offload_params {unmatched} match no parameter; the parameters are: "
            f"{', '.join(name_shapes(names)) or '(none)'}"
        )
    return [n for n in names if any(name_matches(n, p) for p in patterns)]
