"""Streaming load of a transformers safetensors checkpoint into an offloaded model: parameters are
built on the meta device and matched against the shard headers (missing, unexpected and mismatched
tensors are named before anything is allocated or read), the MoE experts get managed stores
(advised before a byte is written), then each shard is read once: expert tensors go through
FusedMoE's weight_loader into the stores, everything else is materialised on the device.

FP8 checkpoints (`quantization_config` with `quant_method: fp8`, e4m3, `weight_block_size`, as
DeepSeek-V3 and the Qwen3 FP8 releases ship them): expert weights and their `weight_scale_inv`
go into FP8 stores as they are (never widened); other FP8 weights are dequantised into the
model's dtype on their way to the device."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from moe_uvm.autosplit import Split
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.dense import DenseOffloadConfig, DenseOffloader
from moe_uvm.dense_select import select_param_names
from moe_uvm.integrations.hf_blocks import (
    ExpertFormat,
    FusedExperts,
    MoeBlock,
    MoeFamily,
    attach_experts,
    family_of,
    find_moe_blocks,
    next_gate_weights,
    plan_expert_memory,
    shard_blocks,
)
from moe_uvm.kernels import fp8
from moe_uvm.manager import ExpertOffloadManager
from moe_uvm.memory import (
    DENSE_POOL,
    NON_EXPERT_WEIGHTS,
    ROUTING_COUNTERS,
    MemoryPlan,
    target_device,
)
from moe_uvm.offload import finish_hybrid, resolve_config
from moe_uvm.parallel import ExpertParallel

EXPERT_KEY = re.compile(
    r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)"
    r"\.weight$"
)
"""Per-expert checkpoint names, as transformers 5 `save_pretrained` writes them (and the hub has
them): Mixtral's w1/w3/w2 or gate_proj/up_proj/down_proj."""
EXPERT_SCALE_KEY = re.compile(
    r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)"
    r"\.weight_scale_inv$"
)
"""An FP8 checkpoint's block scales of one expert weight, multiplied: weight = fp8 * scale_inv."""
SCALE_SUFFIX = "_scale_inv"
FP8_HEADER_DTYPE = "F8_E4M3"
FUSED_KEY = re.compile(r"^(?P<block>.+)\.experts\.(?P<proj>gate_up_proj|down_proj)$")
"""Fused 3-D expert tensors, as the transformers 5 modules hold them."""
SHARD_OF = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2",
            "down_proj": "w2"}
IGNORED_UNEXPECTED = (r"rotary_emb\.inv_freq$",)
"""Older checkpoints saved rotary inv_freq; it is a computed buffer now (transformers skips it)."""
LISTED = 6
"""Names listed per kind of problem in a CheckpointError (then a count of the rest)."""


class CheckpointError(ValueError):
    """The checkpoint and the model disagree; the message names the tensors."""


def checkpoint_fp8_block(hf_config, where: Path | str = "") -> tuple[int, int] | None:
    """The block shape of an FP8 checkpoint's scales (its `quantization_config`), None for an
    unquantised one. Other quantisation methods and FP8 layouts are refused by name."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    method = qc.get("quant_method")
    if method != "fp8":
        raise CheckpointError(
            f"{where}: quantization_config has quant_method {method!r}; moe-uvm reads 16/32-bit "
            "checkpoints and FP8 ones (quant_method 'fp8', e4m3, weight_block_size)")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{where}: FP8 format {qc['fmt']!r}; only e4m3 is supported")
    block = qc.get("weight_block_size")
    if block is None:
        raise CheckpointError(
            f"{where}: FP8 checkpoint without weight_block_size (per-tensor scales); moe-uvm "
            "reads block-scaled FP8 checkpoints (e.g. weight_block_size [128, 128])")
    try:
        return fp8.check_block_shape(block)
    except ValueError as e:
        raise CheckpointError(f"{where}: quantization_config.weight_block_size: {e}") from None


class LoadedModel(NamedTuple):
    """What load_offloaded returns: the model, its expert offload manager, and the dense
    offloader when one was asked for."""

    model: nn.Module
    manager: ExpertOffloadManager
    dense: DenseOffloader | None


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init work)
    while buffers stay real: non-persistent ones such as rotary inv_freq are computed by the
    constructors and are in no checkpoint.

    torch has no switch for "parameters on meta, buffers real", so registration is patched for
    the duration (as accelerate's init_empty_weights does); not thread-safe."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory (sharded or single file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise CheckpointError(
        f"{path}: no safetensors checkpoint (model.safetensors or model.safetensors.index.json);"
        " moe-uvm streams safetensors only"
    )


class _Safetensors:
    """Tensors of a safetensors checkpoint: headers first (no data read), then one shard at a
    time."""

    def __init__(self, path: Path) -> None:
        self.path, self.files = path, checkpoint_files(path)

    def headers(self) -> Iterator[tuple[Path, list[tuple[str, tuple[int, ...], bool]]]]:
        """Per shard: (key, shape, whether the tensor is FP8 e4m3) of each tensor."""
        for file in self.files:
            with safe_open(file, framework="pt", device="cpu") as f:
                yield file, [(key, tuple(f.get_slice(key).get_shape()),
                              f.get_slice(key).get_dtype() == FP8_HEADER_DTYPE)
                             for key in f.keys()]

    @contextmanager
    def open(self, file: Path) -> Iterator[Callable[[str], torch.Tensor]]:
        with safe_open(file, framework="pt", device="cpu") as f:
            yield f.get_tensor


class _RandomWeights:
    """Seeded random tensors in place of a checkpoint, named and shaped as the model's own state
    dict (routed experts as fused 3-D tensors), built on `device` one tensor at a time: N(0,
    initializer_range) for weights, ones for norm weights, zeros for biases. Each tensor's
    values depend only on the seed and its name."""

    def __init__(self, model: nn.Module, seed: int, device: torch.device, std: float) -> None:
        self.model, self.seed, self.device, self.std = model, seed, device, std
        self.shapes = {key: tuple(t.shape) for key, t in model.state_dict(keep_vars=True).items()}

    def headers(self) -> Iterator[tuple[str, list[tuple[str, tuple[int, ...], bool]]]]:
        yield "random", [(key, shape, False) for key, shape in self.shapes.items()]

    @contextmanager
    def open(self, _name: str) -> Iterator[Callable[[str], torch.Tensor]]:
        yield self.tensor

    def tensor(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        if key.endswith("bias"):
            return torch.zeros(shape, device=self.device)
        parts = key.split(".")
        if len(shape) == 1 and len(parts) > 1 and "norm" in parts[-2]:
            return torch.ones(shape, device=self.device)
        gen = torch.Generator(self.device)
        gen.manual_seed(int.from_bytes(
            hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest(), "little"
        ) >> 1)
        out = torch.empty(shape, device=self.device, dtype=torch.bfloat16
                          if self.device.type == "cuda" else torch.float32)
        return out.normal_(0.0, self.std, generator=gen)


@dataclass
class _Slot:
    """One non-expert tensor of the model and every (module, attribute) name sharing it."""

    names: list[str]
    owners: list[tuple[nn.Module, str]]
    is_param: bool
    like: torch.Tensor
    loaded: bool = False


@dataclass
class _Plan:
    """What each checkpoint tensor loads into, built from the shard headers."""

    model: nn.Module
    family: MoeFamily
    blocks: list[MoeBlock]
    materialize: Callable[[_Slot, torch.Tensor], None]
    fp8_block: tuple[int, int] | None = None
    """An FP8 checkpoint's scale blocks: expert weights and their scales go into FP8 stores,
    other FP8 weights are dequantised with theirs."""
    slots: dict[str, _Slot] = field(default_factory=dict)
    actions: list[tuple[Path | str, list[tuple[str, Callable[[torch.Tensor], None]]]]] = field(
        default_factory=list
    )
    covered: dict[str, torch.Tensor] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    fp8_weights: dict[int, str] = field(default_factory=dict)  # slot id -> key, FP8 non-experts
    scales: dict[int, str] = field(default_factory=dict)  # slot id -> key of its scales
    pending: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    block_at: dict[str, MoeBlock] = field(init=False)
    ignored: list[re.Pattern] = field(init=False)

    def __post_init__(self) -> None:
        by_id: dict[int, _Slot] = {}
        experts = {id(block.module.experts) for block in self.blocks}
        for prefix, module in self.model.named_modules(remove_duplicate=False):
            if id(module) in experts:
                continue  # routed experts are loaded into the managed stores
            tensors = [(a, p, True) for a, p in module._parameters.items() if p is not None]
            tensors += [
                (a, b, False) for a, b in module._buffers.items()
                if b is not None and a not in module._non_persistent_buffers_set
            ]
            for attr, tensor, is_param in tensors:
                slot = by_id.setdefault(id(tensor), _Slot([], [], is_param, tensor))
                name = f"{prefix}.{attr}" if prefix else attr
                slot.names.append(name)
                slot.owners.append((module, attr))
                self.slots[name] = slot
        self.block_at = {block.name: block for block in self.blocks}
        columns = 6 if self.fp8_block else 3  # w1 w3 w2, then their scales
        for block in self.blocks:
            self.covered[block.name] = torch.zeros(block.num_experts, columns, dtype=torch.bool)
        model_ignores = getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or ()
        self.ignored = [re.compile(p) for p in (*IGNORED_UNEXPECTED, *model_ignores)]

    def add_shard(self, name: Path | str,
                  header: list[tuple[str, tuple[int, ...], bool]]) -> None:
        """Plan every tensor of one shard from its header (no tensor data is read)."""
        entries = []
        for key, shape, is_fp8 in header:
            action = self._resolve(key, shape, is_fp8)
            if action is not None:
                entries.append((key, action))
        self.actions.append((name, entries))

    def _resolve(self, key: str, shape: tuple[int, ...], is_fp8: bool = False):
        name = key
        for saved, module_name in self.family.checkpoint_renames:
            name = name.replace(saved, module_name)
        match = EXPERT_KEY.match(name) or EXPERT_SCALE_KEY.match(name) or FUSED_KEY.match(name)
        block = self.block_at.get(match["block"]) if match else None
        if block is not None:
            return self._resolve_expert(key, shape, is_fp8, block, match)
        if self.fp8_block and name.endswith(SCALE_SUFFIX):
            return self._resolve_scale(key, shape, name[:-len(SCALE_SUFFIX)])
        slot = self.slots.get(name)
        if slot is None:
            if not any(p.search(name) for p in self.ignored):
                self.unexpected.append(key)
            return None
        if tuple(slot.like.shape) != shape:
            self.mismatched.append(
                f"{key}: checkpoint {list(shape)}, model {list(slot.like.shape)}"
            )
            return None
        slot.loaded = True
        if is_fp8:
            if not self.fp8_block or slot.like.dim() != 2:
                self.mismatched.append(
                    f"{key}: an FP8 tensor, but " + ("the checkpoint's config has no FP8 "
                    "quantization_config" if not self.fp8_block else "only 2-D weights can be FP8"))
                return None
            self.fp8_weights[id(slot)] = key
            return lambda tensor: self._pair(slot, "weight", tensor)
        return lambda tensor: self.materialize(slot, tensor)

    def _resolve_scale(self, key: str, shape: tuple[int, ...], weight_name: str):
        """A non-expert FP8 weight's block scales: kept until the weight comes (or the weight
        kept until they come), then the weight is dequantised into the model's dtype."""
        slot = self.slots.get(weight_name)
        if slot is None or slot.like.dim() != 2:
            self.unexpected.append(key)
            return None
        expected = fp8.scale_shape(1, *slot.like.shape, self.fp8_block)[1:]
        if shape != expected:
            self.mismatched.append(f"{key}: checkpoint {list(shape)}, expected {list(expected)} "
                                   f"for {list(slot.like.shape)} in {self.fp8_block} blocks")
            return None
        self.scales[id(slot)] = key
        return lambda tensor: self._pair(slot, "scale", tensor)

    def _pair(self, slot: _Slot, part: str, tensor: torch.Tensor) -> None:
        got = self.pending.setdefault(id(slot), {})
        got[part] = tensor
        if len(got) == 2:
            del self.pending[id(slot)]
            weight = fp8.dequantize(got["weight"][None], got["scale"][None].float(),
                                    self.fp8_block)[0]
            self.materialize(slot, weight)

    def _resolve_expert(self, key: str, shape: tuple[int, ...], is_fp8: bool, block: MoeBlock,
                        match):
        """Expert tensors load through the block's FusedExperts, in place by load time."""
        E, H, I = block.shape
        covered = self.covered[block.name]
        if is_fp8 and not self.fp8_block:
            self.mismatched.append(f"{key}: an FP8 expert tensor, but the checkpoint's config "
                                   "has no FP8 quantization_config (quant_method fp8)")
            return None
        if "expert" not in match.groupdict():
            if self.fp8_block:
                self.mismatched.append(f"{key}: fused FP8 expert tensors are not read; FP8 "
                                       "checkpoints hold per-expert weights with weight_scale_inv")
                return None
            fused = match["proj"] == "gate_up_proj"
            expected = (E, 2 * I, H) if fused else (E, H, I)
            if shape != expected:
                self.mismatched.append(f"{key}: checkpoint {list(shape)}, model {list(expected)}")
                return None
            covered[:, [0, 1] if fused else [2]] = True
            return lambda tensor: block.module.experts.load_fused(match["proj"], tensor)
        expert, shard = int(match["expert"]), SHARD_OF[match["proj"]]
        expected = (H, I) if shard == "w2" else (I, H)
        column = ("w1", "w3", "w2").index(shard)
        if key.endswith(SCALE_SUFFIX):
            if not self.fp8_block:
                self.unexpected.append(key)
                return None
            expected = fp8.scale_shape(1, *expected, self.fp8_block)[1:]
            if expert >= E or shape != expected:
                self.mismatched.append(
                    f"{key}: checkpoint expert {expert} scales {list(shape)}, model {E} experts "
                    f"with {list(expected)} scales ({self.fp8_block} blocks)")
                return None
            covered[expert, 3 + column] = True
            return lambda tensor: block.module.experts.load_expert_scale(tensor, expert, shard)
        if self.fp8_block and not is_fp8:
            self.mismatched.append(f"{key}: a 16/32-bit expert weight in an FP8 checkpoint")
            return None
        if expert >= E or shape != expected:
            self.mismatched.append(
                f"{key}: checkpoint expert {expert} {list(shape)}, model {E} experts of "
                f"{list(expected)}"
            )
            return None
        covered[expert, column] = True
        return lambda tensor: block.module.experts.load_expert(tensor, expert, shard)

    def check(self, path: Path) -> None:
        """Raise CheckpointError naming every missing, unexpected and mismatched tensor."""
        missing = []
        seen = set()
        for slot in self.slots.values():
            if not slot.loaded and id(slot) not in seen:
                missing.append(slot.names[0])
            seen.add(id(slot))
        for block_name, covered in self.covered.items():
            for expert, column in (~covered).nonzero().tolist():
                part = ("w1", "w3", "w2", "w1 scales", "w3 scales", "w2 scales")[column]
                missing.append(f"{block_name}.experts.{expert} ({part})")
        for slot_id, key in self.fp8_weights.items():
            if slot_id not in self.scales:
                missing.append(key + SCALE_SUFFIX)
        self.mismatched.extend(
            f"{key}: scales of a weight that is not FP8" for slot_id, key in self.scales.items()
            if slot_id not in self.fp8_weights)
        problems = [
            f"{what} ({len(items)}): {', '.join(items[:LISTED])}"
            + (f", ... {len(items) - LISTED} more" if len(items) > LISTED else "")
            for what, items in (("missing", missing), ("unexpected", self.unexpected),
                                ("mismatched", self.mismatched)) if items
        ]
        if problems:
            raise CheckpointError(
                f"checkpoint {path} does not match {type(self.model).__name__}: "
                + "; ".join(problems)
            )


def _fp32_patterns(model: nn.Module, dtype: torch.dtype) -> list[re.Pattern]:
    """Tensors transformers keeps in fp32 at this load dtype (its keep-in-fp32 rules)."""
    patterns = []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        patterns += list(getattr(model, "_keep_in_fp32_modules", None) or ())
    return [re.compile(p) for p in patterns]


def _dense_offload_ids(
    model: nn.Module, config: DenseOffloadConfig, blocks: list[MoeBlock]
) -> tuple[nn.ModuleList, set[int]]:
    """The decoder layers and the parameters (by id) the dense offloader will take: those are
    loaded into host memory, never to the device. Expert weights cannot be among them."""
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layer list (base_model.layers)")
    named = {
        f"{i}.{n}": p
        for i in config.offloaded_layers(len(layers))
        for n, p in layers[i].named_parameters()
    }
    expert_ids = {id(p) for b in blocks for p in b.module.experts.parameters()}
    selected = select_param_names(list(named), config.params)
    experts = [n for n in selected if id(named[n]) in expert_ids]
    if experts:
        raise ValueError(
            f"dense offload params select expert weights {experts[:3]}, which live in managed "
            "memory; restrict DenseOffloadConfig.params (e.g. 'self_attn', 'shared_experts')"
        )
    return layers, {id(named[n]) for n in selected}


def _load_dtype(slot: _Slot, fp32: list[re.Pattern]) -> torch.dtype:
    """The dtype a non-expert tensor is materialised in: the model's, or fp32 where the
    keep-in-fp32 rules name it."""
    if slot.like.dtype.is_floating_point and any(p.search(n) for p in fp32 for n in slot.names):
        return torch.float32
    return slot.like.dtype


def _plan_memory(
    plan: _Plan,
    config: ExpertOffloadConfig,
    device: torch.device,
    fp32: list[re.Pattern],
    host_ids: set[int],
    dense: tuple[nn.ModuleList, DenseOffloadConfig] | None,
    fmt: ExpertFormat,
) -> MemoryPlan:
    """Everything the load puts on `device`, by part: the experts' share (stores, slot caches,
    counters), every non-expert tensor that is not kept in host memory for the dense offloader
    (checkpoint tensors in their load dtype, computed buffers), and the dense offloader's pool."""
    memory = plan_expert_memory(plan.blocks, config, device, fmt)
    slots = {id(slot): slot for slot in plan.slots.values()}
    weights = sum(
        slot.like.numel() * _load_dtype(slot, fp32).itemsize
        for slot in slots.values() if id(slot.like) not in host_ids
    )
    experts = {id(block.module.experts) for block in plan.blocks}
    buffers = {
        id(b): b for m in plan.model.modules() if id(m) not in experts
        for attr, b in m._buffers.items() if attr in m._non_persistent_buffers_set and b is not None
    }
    weights += sum(b.nbytes for b in buffers.values())
    memory.add(NON_EXPERT_WEIGHTS, weights)
    if dense is not None:
        by_id = {id(slot.like): slot for slot in slots.values()}
        layers, dense_config = dense
        memory.add(DENSE_POOL, DenseOffloader.planned_pool_bytes(
            layers, dense_config,
            lambda p: p.numel() * _load_dtype(by_id[id(p)], fp32).itemsize,
        ))
    return memory


FIXED_PARTS = (NON_EXPERT_WEIGHTS, DENSE_POOL, ROUTING_COUNTERS)
"""What the load puts on the GPU besides the experts' share: taken out of gpu_budget_gb first."""


def _experts_share(
    plan: _Plan, config: ExpertOffloadConfig, device: torch.device, fp32: list[re.Pattern],
    host_ids: set[int], dense: tuple[nn.ModuleList, DenseOffloadConfig] | None,
    workspace: dict[str, int], fmt: ExpertFormat,
) -> tuple[ExpertOffloadConfig, Split | None]:
    """The config the experts get: gpu_budget_gb less the fixed parts (non-expert weights,
    the dense pool, routing counters), then the planner's split of what is left when the
    config asks for one. A budget that does not cover the fixed parts is refused, naming them."""
    if config.gpu_budget_gb is None:
        return config, None
    bare = replace(config, gpu_budget_gb=None, num_resident=0, resident_selection="first_n",
                   resident_ids=(), prefetch="none", prefetch_slots=0, slot_eviction="lru",
                   adaptive=False)
    parts = _plan_memory(plan, bare, device, fp32, host_ids, dense, fmt).parts
    fixed = {name: parts[name] for name in FIXED_PARTS if parts.get(name)}
    fixed.update((name, nbytes) for name, nbytes in workspace.items() if nbytes)
    left = config.gpu_budget_gb * 1e9 - sum(fixed.values())
    if left <= 0:
        named = ", ".join(f"{name} {nbytes / 1e9:.3f} GB" for name, nbytes in fixed.items())
        raise ValueError(
            f"gpu_budget_gb={config.gpu_budget_gb:g} does not cover what the model needs "
            f"besides its experts ({named}: {sum(fixed.values()) / 1e9:.3f} GB); give more than "
            "that, plus what the experts should get")
    share = replace(config, gpu_budget_gb=left / 1e9)
    adapters = [FusedExperts.replacing(block, fmt).moe for block in plan.blocks]
    return resolve_config(adapters, share, device)


# Long (~60 lines): the streaming load is one ordered sequence (shapes, memory check, stores,
# shards, non-expert weights) whose steps share the open model and stores.
def load_offloaded(
    path: str | Path,
    config: ExpertOffloadConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    dense_config: DenseOffloadConfig | None = None,
    random_weights: int | None = None,
    workspace: dict[str, int] | None = None,
    expert_parallel: ExpertParallel | None = None,
) -> LoadedModel:
    """Build the causal LM of a local transformers checkpoint without materialising its weights,
    put its routed experts in managed memory per `config`, and read the safetensors shards once:
    expert tensors straight into the stores, the rest onto `device` (default: CUDA if usable,
    else CPU), or into host memory for the layers `dense_config` offloads. `dtype` defaults to
    the checkpoint config's dtype (fp32 if it names none). Everything the load puts on the GPU
    (stores, slot caches, counters, non-expert weights, the dense pool) is checked against its
    free memory and reserved before the first allocation, unless the config opts in to
    oversubscription.

    `random_weights=SEED`: the directory needs only config.json; every tensor is built in place
    from the seed instead of read (N(0, initializer_range), norms 1, biases 0), the experts
    straight into their stores, for benchmarks and demos of models too large to download (the
    experts of an FP8 config are quantised as they are built).

    FP8 checkpoints (quantization_config quant_method "fp8" with weight_block_size): the experts
    stay e4m3 with their block scales (`weight_scale_inv`) in FP8 stores; other FP8 weights are
    dequantised into `dtype`. `config.quantize_experts="fp8"` quantises a 16/32-bit
    checkpoint's experts as they load (an FP8 checkpoint keeps its own scales).

    `workspace`: device bytes the caller allocates after the load, by name (the decoder's KV
    cache): taken out of gpu_budget_gb with the fixed parts, and counted in the free-memory
    check.

    `expert_parallel` (moe_uvm.parallel.ExpertParallel, one process per GPU): this rank loads
    only the experts it owns, into its own stores under its own `gpu_budget_gb` (the profile
    sliced to them), and the rest of the model whole; the blocks add the ranks' parts."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a local checkpoint directory")
    config = config or ExpertOffloadConfig()
    source = None if random_weights is not None else _Safetensors(path)
    hf_config = AutoConfig.from_pretrained(path)
    family = family_of(hf_config.model_type)
    fp8_block = checkpoint_fp8_block(hf_config, path)
    fmt = ExpertFormat.choose(config, fp8_block, quantize_loads=random_weights is not None)
    dtype = dtype or getattr(hf_config, "dtype", None) or torch.float32
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    blocks = find_moe_blocks(model)
    layers, host_ids = None, set()
    if dense_config is not None:
        layers, host_ids = _dense_offload_ids(model, dense_config, blocks)
    fp32 = _fp32_patterns(model, dtype)
    device = target_device(device)
    blocks, config = shard_blocks(blocks, expert_parallel, config, device)

    def materialize(slot: _Slot, tensor: torch.Tensor) -> None:
        where = torch.device("cpu") if id(slot.like) in host_ids else device
        value = tensor.to(device=where, dtype=_load_dtype(slot, fp32))
        if slot.is_param:
            value = nn.Parameter(value, requires_grad=False)
        for module, attr in slot.owners:
            (module._parameters if slot.is_param else module._buffers)[attr] = value

    plan = _Plan(model, family, blocks, materialize,
                 fp8_block=None if random_weights is not None else fp8_block)
    if source is None:
        std = float(getattr(hf_config, "initializer_range", 0.02))
        source = _RandomWeights(model, random_weights, device, std)
    for name, header in source.headers():
        plan.add_shard(name, header)
    plan.check(path)
    dense = None if dense_config is None else (layers, dense_config)
    config, split = _experts_share(plan, config, device, fp32, host_ids, dense, workspace or {},
                                   fmt)
    memory = _plan_memory(plan, config, device, fp32, host_ids, dense, fmt)
    for name, nbytes in (workspace or {}).items():
        memory.add(name, nbytes)
    # Stores are allocated (and advised) only for a checkpoint that matches and fits.
    with memory.reserve(allow_oversubscription=config.allow_oversubscription):
        manager = attach_experts(blocks, config, device, fmt)
        manager.split = split
        try:
            # The initial advice prefetches on the manager's stream; let it finish first.
            manager.synchronize()
            for name, entries in plan.actions:
                with source.open(name) as read:
                    for key, action in entries:
                        action(read(key))
            for module in model.modules():
                for attr in module._non_persistent_buffers_set:
                    if module._buffers.get(attr) is not None:
                        module._buffers[attr] = module._buffers[attr].to(device)
            offloader = (
                None if dense_config is None else DenseOffloader(layers, dense_config, device)
            )
            if manager.slot_cache is not None:  # the routers were meta when it was built
                manager.slot_cache.next_gates = next_gate_weights(blocks)
            finish_hybrid(manager)  # the CPU/GPU hybrid measures on the written experts
        except BaseException:
            manager.close()  # the stores are freed now, not when the half-loaded model goes
            raise
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return LoadedModel(model, manager, offloader)
