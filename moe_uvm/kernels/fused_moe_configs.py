"""Launch configs of the fused-MoE kernels: MoeBlockConfig for the grouped path, MoeDecodeConfig
for the one-token path, the tables tuned per GPU model (data files in configs/ here) and the
rules for GPUs, shapes and token counts they do not cover."""

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton

# An H100 SXM has 132 SMs; the rules below size grids so every SM streams weights.
_SMS = 132
# Enough programs to keep every SM streaming weights with a few in flight.
_TARGET_PROGRAMS = 4 * _SMS


def _check_powers_of_two(config, names: tuple[str, ...], least: int) -> None:
    for name in names:
        value = getattr(config, name)
        if value < least or value & (value - 1):
            raise ValueError(f"{type(config).__name__}.{name}={value}: must be a power of two "
                             f">= {least}")


def _check_warps(config, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if value not in (1, 2, 4, 8, 16):
            raise ValueError(f"{type(config).__name__}.{name}={value}: allowed 1, 2, 4, 8, 16")


@dataclass(frozen=True)
class MoeBlockConfig:
    """Tiles and launch settings of the grouped path for one (shape, token-count bucket).

    `block_m` is both the row tile of both GEMMs and the padding unit of the alignment.
    """

    block_m: int = 16
    gate_up_block_n: int = 32
    gate_up_block_k: int = 128
    gate_up_warps: int = 4
    gate_up_stages: int = 4
    down_block_n: int = 64
    down_block_k: int = 128
    down_split_k: int = 1
    down_warps: int = 4
    down_stages: int = 4

    def __post_init__(self) -> None:
        # tl.dot needs every tile dimension >= 16 and tl.arange needs powers of two.
        _check_powers_of_two(self, ("block_m", "gate_up_block_n", "gate_up_block_k",
                                    "down_block_n", "down_block_k"), 16)
        _check_warps(self, ("gate_up_warps", "down_warps"))
        for name in ("gate_up_stages", "down_stages", "down_split_k"):
            value = getattr(self, name)
            if not 1 <= value <= 16:
                raise ValueError(f"MoeBlockConfig.{name}={value}: allowed 1..16")


@dataclass(frozen=True)
class MoeDecodeConfig:
    """Tiles of the one-token path (GEMV, no tensor cores): the gate/up program computes
    gate_up_block_n activations of one routed expert; the down program computes down_block_n
    outputs over all top-k experts at once, K in steps of down_block_k."""

    gate_up_block_n: int = 16
    gate_up_block_k: int = 256
    gate_up_warps: int = 4
    down_block_n: int = 4
    down_block_k: int = 256
    down_warps: int = 4

    def __post_init__(self) -> None:
        _check_powers_of_two(self, ("gate_up_block_n", "down_block_n"), 2)
        _check_powers_of_two(self, ("gate_up_block_k", "down_block_k"), 16)
        _check_warps(self, ("gate_up_warps", "down_warps"))


ConfigKey = tuple[int, int, int, int, str]
"""(num_experts, hidden, intermediate, top_k, dtype name)"""

CONFIG_DIR = Path(__file__).with_name("configs")
_KEY_FIELDS = ("num_experts", "hidden", "intermediate", "top_k", "dtype")


@dataclass(frozen=True)
class TunedTables:
    """Configs tuned on one GPU model, from its file in moe_uvm/kernels/configs/ (written by
    `python benchmarks/fused_moe.py --tune`). `grouped`: key -> ((largest T, config), ...) in
    ascending T; T above the last entry, keys not listed and entries whose block_m is below
    min_block_m use default_config. `decode`: key -> the one-token config, or None where the
    grouped path measured faster at T=1; keys not listed use default_decode_config."""

    device_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    grouped: Mapping[ConfigKey, tuple[tuple[int, MoeBlockConfig], ...]] = field(
        default_factory=dict)
    decode: Mapping[ConfigKey, MoeDecodeConfig | None] = field(default_factory=dict)


NO_TABLES = TunedTables()
"""The Triton interpreter, and GPUs with no file of their own or of their architecture, use the
rules alone."""


def config_file(device_name: str) -> Path:
    """moe_uvm/kernels/configs/<device name, spaces and other punctuation as '_'>.json"""
    return CONFIG_DIR / (re.sub(r"[^A-Za-z0-9.-]+", "_", device_name).strip("_") + ".json")


def _key(entry: dict, path: Path) -> ConfigKey:
    try:
        *sizes, dtype = (entry[f] for f in _KEY_FIELDS)
    except KeyError as exc:
        raise ValueError(f"{path}: an entry lacks {exc.args[0]!r} (needs {_KEY_FIELDS})") from None
    return (*(int(v) for v in sizes), str(dtype))  # type: ignore[return-value]


def load_tables(path: Path) -> TunedTables:
    """Read and validate a tables file; a bad file is refused naming the file and the field."""
    try:
        data = json.loads(path.read_text())
        grouped = {
            _key(entry, path): tuple((int(b["max_tokens"]), MoeBlockConfig(**b["config"]))
                                     for b in entry["buckets"])
            for entry in data["grouped"]
        }
        decode = {
            _key(entry, path): None if entry["config"] is None
            else MoeDecodeConfig(**entry["config"])
            for entry in data["decode"]
        }
        device_name = str(data["device_name"])
        major, minor = (int(v) for v in data["compute_capability"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"kernel config file {path} is invalid: {exc!r}") from None
    for key, buckets in grouped.items():
        bounds = [t for t, _ in buckets]
        if bounds != sorted(set(bounds)):
            raise ValueError(f"{path}: buckets of {key} must have ascending max_tokens, "
                             f"got {bounds}")
    return TunedTables(device_name, (major, minor), grouped, decode)


def save_tables(tables: TunedTables, path: Path, source: str) -> None:
    """Write tables in the format load_tables reads; `source` says how they were measured."""
    def key_fields(key: ConfigKey) -> dict:
        return dict(zip(_KEY_FIELDS, key, strict=True))

    data = {
        "device_name": tables.device_name,
        "compute_capability": list(tables.compute_capability),
        "source": source,
        "grouped": [dict(**key_fields(key), buckets=[dict(max_tokens=t, config=asdict(c))
                                                     for t, c in buckets])
                    for key, buckets in tables.grouped.items()],
        "decode": [dict(**key_fields(key), config=None if c is None else asdict(c))
                   for key, c in tables.decode.items()],
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


@functools.cache
def tuned_tables(device_name: str | None,
                 compute_capability: tuple[int, int] | None = None) -> TunedTables:
    """The tables of this GPU model; else, with its compute capability, those of another model
    of the same architecture (an H200 uses the H100's: same SMs, same tiles fit), the file
    names sorted; else NO_TABLES (None: the interpreter)."""
    if device_name is None:
        return NO_TABLES
    if config_file(device_name).exists():
        return load_tables(config_file(device_name))
    if compute_capability is not None:
        for path in sorted(CONFIG_DIR.glob("*.json")):
            tables = load_tables(path)
            if tables.compute_capability == tuple(compute_capability):
                return tables
    return NO_TABLES


def config_key(num_experts: int, hidden: int, intermediate: int, top_k: int,
               dtype: torch.dtype) -> ConfigKey:
    # fp16 and bf16 share tiles: same element size, same tensor-core rate.
    name = "bfloat16" if dtype == torch.float16 else str(dtype).removeprefix("torch.")
    return (num_experts, hidden, intermediate, top_k, name)


def min_block_m(num_experts: int, top_k: int, num_tokens: int) -> int:
    """Row tile that holds all rows of an expert in one block: twice the mean rows per expert,
    as a power of two in 16..128.

    Every row block streams its expert's weights in full, and blocks of one host-resident
    expert each cross PCIe: on an H100, Mixtral T=64 offloaded took 1.49x the T=16 time with
    block_m=16, as softmax-top-k routing gives 1.44 blocks per expert there (computed in the
    tests). Twice the mean is >= 4 standard deviations above it for uniform routing at
    T=64..256; experts hotter than that are the ones residency keeps in HBM, where L2 absorbs
    the re-reads."""
    mean_rows = max(1, num_tokens) * top_k / num_experts
    return min(128, max(16, triton.next_power_of_2(math.ceil(2 * mean_rows))))


def default_config(num_experts: int, hidden: int, intermediate: int, top_k: int,
                   num_tokens: int) -> MoeBlockConfig:
    """Rule for shapes without tuned entries: block_m from min_block_m; thin tiles and split-K
    while experts see few rows (memory bound), wide tiles once they see many (compute bound)."""
    block_m = min_block_m(num_experts, top_k, num_tokens)
    if block_m == 128:  # 8 warps: two 128x64 fp32 accumulators fit without spills
        return MoeBlockConfig(block_m=128, gate_up_block_n=64, gate_up_block_k=64,
                              gate_up_warps=8, gate_up_stages=3, down_block_n=128,
                              down_block_k=64, down_warps=8, down_stages=3)
    if block_m == 64:
        return MoeBlockConfig(block_m=64, gate_up_block_n=64, gate_up_block_k=64,
                              down_block_n=128, down_block_k=64)
    active_experts = min(num_experts, max(1, num_tokens * top_k))
    # Narrower N tiles when few experts are active, so the weight stream covers every SM.
    few = _TARGET_PROGRAMS // 2
    gate_up_n = 32 if active_experts * triton.cdiv(intermediate, 32) >= few else 16
    down_n = 64 if active_experts * triton.cdiv(hidden, 64) >= few else 32
    down_programs = active_experts * triton.cdiv(hidden, down_n)
    split_k = 1
    # Keep at least two K iterations of 128 per split so the pipeline has something to overlap.
    while (split_k < 8 and down_programs * split_k * 2 <= _TARGET_PROGRAMS
           and intermediate >= 2 * 128 * split_k * 2):
        split_k *= 2
    return MoeBlockConfig(block_m=block_m, gate_up_block_n=gate_up_n, down_block_n=down_n,
                          down_split_k=split_k)


def select_config(num_experts: int, hidden: int, intermediate: int, top_k: int,
                  dtype: torch.dtype, num_tokens: int,
                  tables: TunedTables = NO_TABLES) -> MoeBlockConfig:
    """Grouped-path config: the tuned entry for the smallest bucket holding num_tokens unless
    its block_m is below min_block_m, else default_config. `dtype` is the weights' (FP8) or
    else the activations'; FP8 shapes without entries use the bf16 ones."""
    key = config_key(num_experts, hidden, intermediate, top_k, dtype)
    entries = tables.grouped.get(key, ())
    if not entries and dtype == torch.float8_e4m3fn:
        # FP8 weights without entries of their own: the 16-bit tiles (same shape, half the
        # bytes per tile; the launcher keeps K steps inside the scale blocks).
        entries = tables.grouped.get(config_key(num_experts, hidden, intermediate, top_k,
                                                torch.bfloat16), ())
    for largest_t, config in entries:
        if num_tokens <= largest_t:
            if config.block_m >= min_block_m(num_experts, top_k, num_tokens):
                return config
            break
    return default_config(num_experts, hidden, intermediate, top_k, num_tokens)


def default_decode_config(num_experts: int, hidden: int, intermediate: int,
                          top_k: int) -> MoeDecodeConfig:
    """Rule for the one-token path. Triton does not pipeline loads that feed no dot, so memory
    latency is hidden by occupancy alone: tiles of 4096 (gate/up, per matrix) or 8192 (down)
    elements, 32-64 per thread of 4 warps (56-96 registers and no spills when compiled for
    sm_90a), and K steps long enough that each whole grid, resident at once, has ~8 MB of
    loads in flight (about what the HBM read-ceiling kernel keeps in flight), with >= 2
    programs per SM."""
    in_flight = 4 << 20  # elements: 8 MB of 16-bit weights

    def k_step(rows: int, depth: int) -> int:
        step = triton.next_power_of_2(triton.cdiv(in_flight, rows))
        return max(16, min(max(256, step), 512, triton.next_power_of_2(depth)))

    gate_up_k = k_step(top_k * 2 * intermediate, hidden)
    gate_up_n = max(2, min(4096 // gate_up_k, triton.next_power_of_2(intermediate)))
    while gate_up_n > 2 and top_k * triton.cdiv(intermediate, gate_up_n) < 2 * _SMS:
        gate_up_n //= 2
    k_pad = triton.next_power_of_2(top_k)
    down_k = k_step(hidden * k_pad, intermediate)
    down_n = max(2, min(8192 // (k_pad * down_k), hidden // (2 * _SMS)))
    down_n = 1 << (down_n.bit_length() - 1)
    return MoeDecodeConfig(gate_up_block_n=gate_up_n, gate_up_block_k=gate_up_k,
                           down_block_n=down_n, down_block_k=down_k)


def select_decode_config(num_experts: int, hidden: int, intermediate: int, top_k: int,
                         dtype: torch.dtype,
                         tables: TunedTables = NO_TABLES) -> MoeDecodeConfig | None:
    """One-token config: the tuned entry (None: use the grouped path), else the rule."""
    key = config_key(num_experts, hidden, intermediate, top_k, dtype)
    if key in tables.decode:
        return tables.decode[key]
    return default_decode_config(num_experts, hidden, intermediate, top_k)
