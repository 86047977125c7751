"""Generate with a whole Hugging Face MoE model through moe-uvm: `moe-uvm generate` and the same
from Python. The checkpoint is streamed into managed memory (`hf.load_offloaded`, or built in
place from a seed with `random_weights`), the one knob `gpu_budget_gb` is split by the planner,
and greedy decoding runs through transformers' `generate`. The report says what a run cost:
decode tokens/s, time to first token, peak device memory (allocator peak + advised-resident
managed bytes; the driver's figure beside it), hit rate, distinct experts per layer, PCIe bytes
per token and the split used.

Decode runs through `moe_uvm.decode.StaticDecoder` by default (static KV cache, chunked prefill,
the decode step in a CUDA graph per batch size, captured before the timed part), or through
transformers' own eager `generate` loop with `decode="hf"`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.slots import METRICS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DECODES = ("static", "hf")
KV_CACHE = "KV cache"
"""The memory-plan part naming the decoder's KV cache."""


def _until(tokens: list[int], eos: int | list[int] | None) -> list[int]:
    """`tokens` up to and including the first end-of-sequence token."""
    if eos is None:
        return tokens
    stops = {eos} if isinstance(eos, int) else set(eos)
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index + 1]
    return tokens


@dataclass
class GenerateReport:
    """What one `generate` call cost. Rates per token count every sequence of the batch.
    `pcie_gb_per_token`: offloaded expert bytes read over PCIe (distinct experts per layer and
    forward, less slot hits) per decode step and sequence (with decode="hf": the whole call's
    reads, prefill included, per new token); `hbm_gb_per_token` the same for expert reads
    served from HBM (resident experts and slot hits); `prefill_pcie_gb`: what the prompts'
    prefill read over PCIe in all (static decode). `hit_rate`: share of the decode reads
    served from HBM (resident or a slot). `distinct_experts_per_layer`:
    experts used at least once per layer over the call."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    total_s: float
    peak_device_gb: float
    peak_allocator_gb: float
    resident_gb: float
    driver_used_gb: float | None
    hit_rate: float
    distinct_experts_per_layer: float
    pcie_gb_per_token: float
    hbm_gb_per_token: float
    prefill_pcie_gb: float
    split: dict | None
    device: str
    decode: str = ""
    setup_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        driver = ("" if self.driver_used_gb is None
                  else f" (the driver: {self.driver_used_gb:.2f} GB)")
        out = [
            f"{self.new_tokens} new tokens x batch {self.batch} after a {self.prompt_tokens}-token "
            f"prompt on {self.device}: decode {self.decode_tokens_per_s:.2f} tokens/s, time to "
            f"first token {self.time_to_first_token_s * 1e3:.1f} ms, {self.total_s:.2f} s in all "
            f"({self.decode}; {self.setup_s:.2f} s of warm-up and graph capture before)",
            f"peak device memory {self.peak_device_gb:.2f} GB = allocator peak "
            f"{self.peak_allocator_gb:.2f} + advised-resident managed {self.resident_gb:.2f}"
            + driver,
            f"experts: hit rate {self.hit_rate:.3f}, "
            f"{self.distinct_experts_per_layer:.1f} distinct per layer, "
            f"PCIe {self.pcie_gb_per_token * 1e3:.3g} MB per token (prefill "
            f"{self.prefill_pcie_gb * 1e3:.3g} MB)",
        ]
        if self.split is not None:
            s = self.split
            slots = (f" + {s['slots']} slots ({s['eviction']} eviction, prefetch "
                     f"{s['prefetch']})" if s["slots"] else ", no slots")
            out.append(
                f"split (planner): {sum(s['resident']) / len(s['resident']):.1f} resident experts "
                f"per layer{slots}; predicted {s['tokens_per_s']:.1f} tokens/s for the MoE "
                "layers alone")
        out.extend(self.notes)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


class _Clock:
    """A transformers streamer that times the first new token and each step after it, and hands
    each step's new token ids to `on_token`."""

    def __init__(self, on_token: Callable[[torch.Tensor], None] | None) -> None:
        self.on_token, self.start, self.first, self.last, self.steps = on_token, 0.0, None, 0.0, 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands the prompt over first
            self._prompt_seen = True
            return
        if value.device.type == "cuda":
            torch.cuda.synchronize(value.device)
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last, self.steps = now, self.steps + 1
        if self.on_token is not None:
            self.on_token(value.reshape(-1))

    def end(self) -> None:
        pass


def load_model(
    model: str | Path,
    config: ExpertOffloadConfig | None = None,
    *,
    random_weights: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    kv_tokens: int = 0,
    expert_parallel=None,
):
    """`hf.load_offloaded` for generation: a local checkpoint, or with `random_weights=SEED`
    a folder holding only config.json (weights built in place). `kv_tokens`: KV-cache tokens
    (batch x (prompt + new tokens)) the decoder will hold, taken out of the budget first.
    `expert_parallel`: this rank's share of the experts (moe_uvm.parallel.ExpertParallel)."""
    from moe_uvm.integrations import hf

    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (give a local checkpoint folder)")
    workspace = {}
    if kv_tokens:
        from moe_uvm.integrations.hf_shape import describe

        info = describe(path, dtype)
        workspace[KV_CACHE] = info.kv_bytes_per_token * kv_tokens
    return hf.load_offloaded(path, config, dtype=dtype, device=device,
                             random_weights=random_weights, workspace=workspace,
                             expert_parallel=expert_parallel)


def prompt_ids(
    model_dir: str | Path,
    *,
    prompt: str | None = None,
    prompts_file: str | Path | None = None,
    prompt_tokens: int = 32,
    batch: int = 1,
    vocab_size: int,
    seed: int = 0,
) -> list[list[int]]:
    """Token ids of `batch` prompts: the text prompt (repeated), the lines of a prompts file
    (text needs the checkpoint's tokenizer; JSONL input_ids do not), or `prompt_tokens` seeded
    random ids per sequence (benchmarks on random weights)."""
    from moe_uvm.integrations.hf_calibrate import _tokenizer, read_prompts

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if prompt is not None and prompts_file is not None:
        raise ValueError("give --prompt or --prompts, not both")
    if prompts_file is not None:
        items = [item for _, item in read_prompts(prompts_file)]
        where = Path(prompts_file)
    elif prompt is not None:
        items, where = [prompt] * batch, Path("--prompt")
    else:
        if prompt_tokens < 1:
            raise ValueError(f"prompt tokens must be >= 1, got {prompt_tokens}")
        rng = np.random.default_rng(seed)
        return rng.integers(0, vocab_size, (batch, prompt_tokens)).tolist()
    tokenizer = None
    out = []
    for item in items:
        if isinstance(item, str):
            tokenizer = tokenizer or _tokenizer(Path(model_dir), where, 1)
            item = tokenizer.encode(item)
        if not item:
            raise ValueError(f"{where}: a prompt has no tokens")
        bad = [i for i in item if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"{where}: token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        out.append(list(item))
    return out


def _batches(ids: list[list[int]], batch: int, pad: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Left-padded (input_ids, attention_mask) batches of at most `batch` prompts."""
    out = []
    for start in range(0, len(ids), batch):
        group = ids[start:start + batch]
        width = max(len(p) for p in group)
        tokens = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, p in enumerate(group):
            tokens[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out.append((tokens, mask))
    return out


@contextmanager
def _detached(blocks):
    """Detach trace routing from `blocks` (if any) when the block ends."""
    try:
        yield
    finally:
        if blocks is not None:
            from moe_uvm.integrations.hf_blocks import TraceRouting

            TraceRouting.detach(blocks)


class _ReadCounter:
    """Counts, on the device and without a host sync, the distinct experts each layer reads per
    forward (a decode step, or a whole prefill chunk): from HBM when resident (as advised when
    the count started), else over PCIe, less the slot cache's hits. Wraps each layer's routing
    hook for the duration of a `with` block; per layer and forward it adds one launch
    (kernels.expert_ids.count_distinct_experts) into a preallocated buffer, and the totals are
    formed where the caller asks (a host sync)."""

    def __init__(self, manager) -> None:
        self.manager, self.layers = manager, list(manager.layers)
        L, E = len(self.layers), self.layers[0].num_experts
        device = self.layers[0].w13_weight.device
        self.resident = torch.zeros(L, E, dtype=torch.bool, device=device)
        for layer in range(L):
            self.resident[layer, list(manager.resident_ids(layer))] = True
        self.reads = torch.zeros(L, E, dtype=torch.int64, device=device)  # forwards reading e
        self._saved: list = []

    def _hook(self, layer: int, inner):
        from moe_uvm.kernels.expert_ids import count_distinct_experts

        reads = self.reads[layer]

        def record(topk_ids: torch.Tensor) -> None:
            count_distinct_experts(topk_ids.contiguous(), reads)
            if inner is not None:
                inner(topk_ids)

        return record

    def __enter__(self) -> _ReadCounter:
        self._saved = [m.record_routing for m in self.layers]
        for index, module in enumerate(self.layers):
            module.record_routing = self._hook(index, module.record_routing)
        self.reset()
        return self

    def reset(self) -> None:
        """Start counting from zero (in place: captured graphs keep adding to these buffers)."""
        self.reads.zero_()
        if self.manager.slot_cache is not None:
            self.manager.slot_cache.stats.reset()

    def __exit__(self, *exc) -> None:
        for module, saved in zip(self.layers, self._saved, strict=True):
            module.record_routing = saved

    def snapshot(self) -> torch.Tensor:
        """The counts so far as one flat device tensor (a copy, no host sync): reads per layer
        and expert, then the slot cache's counters summed over layers (if any). Differences of
        snapshots are counts too."""
        parts = [self.reads.reshape(-1)]
        if self.manager.slot_cache is not None:
            parts.append(self.manager.slot_cache.stats.counters.sum(0))
        return torch.cat(parts)

    def totals(self, counts: torch.Tensor | None = None) -> dict[str, float]:
        """hbm / pcie: expert reads over all layers and forwards; distinct: experts used per
        layer (a host sync). `counts`: a snapshot, or a difference of two (default: now)."""
        counts = self.snapshot() if counts is None else counts
        reads = counts[:self.reads.numel()].view(self.reads.shape)
        hbm = int((reads * self.resident).sum())
        offloaded = int((reads * ~self.resident).sum())
        hits = 0
        if self.manager.slot_cache is not None:
            hits = int(counts[self.reads.numel() + METRICS.index("slot_hits")])
        return {"hbm": hbm + hits, "pcie": offloaded - hits,
                "distinct": float((reads > 0).sum(1).float().mean())}

def generate(
    loaded,
    ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    batch: int = 1,
    ignore_eos: bool = False,
    on_token: Callable[[torch.Tensor], None] | None = None,
    free_before: int | None = None,
    decode: str = "static",
    graphs: bool | None = None,
    prefill_chunk: int = 512,
    routing_trace=None,
    warmup: bool = False,
    compile: bool | str | None = None,
) -> tuple[list[list[int]], GenerateReport]:
    """Greedy generation of `max_new_tokens` after each prompt of `ids`, `batch` prompts at a
    time (left-padded), through `loaded` (from `load_model`). Returns the new tokens of every
    prompt and the report of the whole call (times summed over batches). `ignore_eos` keeps
    going past end-of-sequence (benchmarks); `on_token` gets each step's new ids;
    `free_before`: the GPU's free bytes before the load, for the driver's figure.
    `decode`: "static" (moe_uvm.decode.StaticDecoder: static KV cache, the prompt prefilled in
    chunks of `prefill_chunk` tokens, the step in a CUDA graph per batch size on CUDA unless
    `graphs=False`; it stops at end-of-sequence only in what it returns) or "hf" (transformers'
    own `generate` loop, eager, dynamic cache). `routing_trace` (a RoutingTrace of the model's
    experts and top-k): the routers' expert choices are replaced by the trace's
    (hf_blocks.TraceRouting), for speed and expert-read measurements with realistic routing on
    random weights; the tokens are then meaningless. `warmup`: first an untimed pass of two
    new tokens over the first batch (compiles the kernels for these shapes; benchmarks). The
    graphs are captured before timing starts either way; `report.setup_s` says how long
    warm-up and capture took (not counted in the rates or in `total_s`). `compile`: the
    decoder's torch.compile of the decode step (default: with CUDA graphs; the first compile
    of a model shape takes minutes at full depth, later ones hit inductor's cache). The CPU/GPU
    hybrid (`cpu_experts` in the load's config; `manager.hybrid`) runs inside each MoE layer's
    opaque op (`moe_uvm::hf_experts`) and hands the CPU its share in stream order, so the step
    is compiled and captured with it as without it."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    model, manager = loaded.model, loaded.manager
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    extra = {"eos_token_id": None} if ignore_eos else {}
    decoder = None
    groups = _batches([list(p) for p in ids], batch, pad)
    setup = time.perf_counter()
    if decode == "static":
        from moe_uvm.decode import StaticDecoder

        decoder = StaticDecoder(model, max_len=max(len(p) for p in ids) + max_new_tokens,
                                prefill_chunk=prefill_chunk, graphs=graphs, compile=compile)
    blocks = None
    if routing_trace is not None:
        from moe_uvm.integrations.hf_blocks import TraceRouting, find_moe_blocks

        blocks = find_moe_blocks(model)
        TraceRouting(routing_trace, device).attach(blocks)
    # The counter's hooks go in before any capture, so the graphs hold them.
    with _detached(blocks), _ReadCounter(manager) as counter:
        if warmup:
            tokens, mask = groups[0]
            if decoder is not None:
                decoder.generate(tokens, mask, max_new_tokens=min(2, max_new_tokens))
            else:
                with torch.no_grad():
                    model.generate(input_ids=tokens.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=2, do_sample=False, pad_token_id=pad, **extra)
        if decoder is not None:
            for size in sorted({tokens.shape[0] for tokens, _ in groups}):
                decoder.prepare(size)
        if cuda:
            torch.cuda.synchronize(device)
        setup_s = time.perf_counter() - setup
        counter.reset()
        # The prefill forwards' counts (static decode), as device snapshot differences: no
        # host sync between prefill and decode.
        prefill = torch.zeros_like(counter.snapshot())
        outputs, first, decode_s, steps, started = [], 0.0, 0.0, 0, time.perf_counter()
        for tokens, mask in groups:
            if decoder is not None:
                before = counter.snapshot()

                def prefilled(before=before) -> None:
                    prefill.add_(counter.snapshot() - before)

                new = decoder.generate(tokens, mask, max_new_tokens=max_new_tokens,
                                       on_token=on_token, on_prefilled=prefilled).tolist()
                start, first_at, end = decoder.times
                first += first_at - start
                decode_s += end - first_at
                steps += (max_new_tokens - 1) * tokens.shape[0]
                eos = None if ignore_eos else cfg.eos_token_id
                outputs.extend(_until(row, eos) for row in new)
                continue
            clock = _Clock(on_token)
            clock.start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=tokens.to(device),
                                     attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     streamer=clock, pad_token_id=pad, **extra)
            first += (clock.first or clock.start) - clock.start
            decode_s += clock.last - (clock.first or clock.last)
            steps += max(clock.steps - 1, 0) * tokens.shape[0]
            outputs.extend(out[:, tokens.shape[1]:].tolist())
        total = time.perf_counter() - started
    # Tokens computed: the static decoder always runs max_new_tokens steps.
    new_tokens = (max_new_tokens * len(ids) if decoder is not None
                  else sum(len(o) for o in outputs))
    runs = max(1, -(-len(ids) // batch))
    final = counter.snapshot()
    reads = counter.totals(final - prefill)  # decode steps' reads (all of them with "hf")
    reads["distinct"] = counter.totals(final)["distinct"]
    prefill_reads = counter.totals(prefill)
    # per decode step and sequence; transformers' loop: the whole call's per new token
    per_token = max(steps if decoder is not None else new_tokens, 1)
    layer = manager.layers[0]
    nbytes = (layer.w13_weight[0].nbytes + layer.w2_weight[0].nbytes) if manager.layers else 0
    allocator = torch.cuda.max_memory_allocated(device) if cuda else 0
    resident = manager.resident_bytes() if cuda else 0
    driver = None
    if cuda and free_before is not None:
        driver = (free_before - torch.cuda.mem_get_info(device)[0]) / 1e9
    report = GenerateReport(
        batch=batch, prompt_tokens=max(len(p) for p in ids), new_tokens=new_tokens // len(ids),
        time_to_first_token_s=first / runs,
        decode_tokens_per_s=steps / decode_s if decode_s > 0 else float("nan"),
        total_s=total, peak_device_gb=(allocator + resident) / 1e9,
        peak_allocator_gb=allocator / 1e9, resident_gb=resident / 1e9, driver_used_gb=driver,
        hit_rate=reads["hbm"] / max(reads["hbm"] + reads["pcie"], 1),
        distinct_experts_per_layer=reads["distinct"],
        pcie_gb_per_token=reads["pcie"] * nbytes / per_token / 1e9,
        hbm_gb_per_token=reads["hbm"] * nbytes / per_token / 1e9,
        prefill_pcie_gb=prefill_reads["pcie"] * nbytes / 1e9,
        split=None if manager.split is None else manager.split.to_dict(), setup_s=setup_s,
        decode=("transformers generate (eager)" if decoder is None else
                f"static cache, {'CUDA graph' if decoder.graphs else 'eager'} steps"
                + (f", torch.compile ({decoder.compile})" if decoder.compile else ""))
               + (", CPU/GPU hybrid" if manager.hybrid[0] else ""),
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
    )
    if not cuda:
        report.notes.append("CPU: experts stay in host memory; timings are not the GPU's and "
                            "nothing crosses PCIe (the counts are what a GPU run would read)")
    return outputs, report

