"""Greedy decoding of a transformers causal LM with a static KV cache: the prompt prefilled in
chunks (so a long prompt reads each offloaded expert once per chunk, not once per token), then
one token per step, the step captured in a CUDA graph per batch size on first use (CUDA only;
eager elsewhere, and with `graphs=False`).

Everything a step changes lives in fixed buffers (input ids, cache position, a [B, max_len]
attention mask, the static cache), and the step updates them itself: the mask gains the new
position, position ids are counted from the mask (as transformers' `generate` does for left
padding), the argmax becomes the next input. A replay is therefore one whole decode step with
no host work but the launch; tokens are read back only when the caller asks for them as they
come."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("moe_uvm")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass
class _Batch:
    """The fixed buffers of one batch size, and its graph once captured."""

    cache: object
    mask: torch.Tensor  # [B, max_len] long: 1 where a position holds a real token
    ids: torch.Tensor  # [B, 1] long: the step's input (the previous step's output)
    pos: torch.Tensor  # [1] long: the step's cache position
    graph: torch.cuda.CUDAGraph | None = None
    eager_steps: int = 0


class StaticDecoder:
    """Greedy decoding of `model` (a transformers causal LM; its MoE blocks may be offloaded by
    moe-uvm) up to `max_len` tokens per sequence (prompt + new). `prefill_chunk`: prompt tokens
    per forward. `graphs`: capture the decode step in a CUDA graph per batch size (default:
    when the model is on CUDA). `compile`: run the decode step's forward through torch.compile
    (True: inductor; a string: that backend; default: with graphs), which fuses the many small
    kernels of attention, norms and routers that otherwise dominate a small-batch step; a
    compile failure falls back to the plain forward with a warning. Captured steps equal the
    eager steps of the same decoder bitwise (tested per family on the GPU); compiled steps and
    transformers' `generate` give the same greedy tokens up to floating-point ties (fusion
    changes rounding)."""

    WARMUP_STEPS = 2
    """Eager steps before a batch size's graph is captured (allocator and cuBLAS warm-up)."""

    def __init__(self, model: nn.Module, *, max_len: int, prefill_chunk: int = 512,
                 graphs: bool | None = None, compile: bool | str | None = None) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (a prompt token and a new one), got {max_len}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.max_len, self.prefill_chunk = model, max_len, prefill_chunk
        self.device = next(p.device for p in model.parameters() if p.device.type != "meta")
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("graphs=True needs the model on a CUDA device")
        if compile is None:
            compile = self.graphs
        if compile is True:
            compile = "inductor"
        if compile is not False and not isinstance(compile, str):
            raise ValueError(f"compile must be a bool, None or a torch.compile backend name, "
                             f"got {compile!r}")
        self.compile = compile or None
        # torch.compile is lazy: nothing is traced before the first decode step.
        self._compiled = (torch.compile(model.forward, backend=self.compile, dynamic=False)
                          if self.compile else None)
        self._batches: dict[int, _Batch] = {}
        self._pool = None
        # transformers renames forward's past_key_values to cache (deprecated from 5.2x).
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.times: tuple[float, float, float] | None = None

    def _batch(self, size: int) -> _Batch:
        state = self._batches.get(size)
        if state is None:
            from transformers import StaticCache

            cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
            zeros = lambda *shape: torch.zeros(shape, dtype=torch.long, device=self.device)  # noqa: E731
            state = _Batch(cache, zeros(size, self.max_len), zeros(size, 1), zeros(1))
            self._batches[size] = state
        return state

    def _forward(self, state: _Batch, ids: torch.Tensor, positions: torch.Tensor,
                 cache_position: torch.Tensor, forward=None) -> torch.Tensor:
        out = (forward or self.model)(
            input_ids=ids, attention_mask=state.mask, position_ids=positions,
            cache_position=cache_position, use_cache=True, logits_to_keep=1,
            **{self._cache_arg: state.cache})
        return out.logits[:, -1]

    def _step(self, state: _Batch) -> None:
        """One decode step on the buffers (what the graph holds). With `compile`, the model's
        forward runs through torch.compile (fewer, fused kernels for attention, norms and
        routers; MoE experts stay one opaque op each): decode steps only, prefill is eager."""
        forward = self._compiled
        state.mask.index_fill_(1, state.pos, 1)
        positions = state.mask.sum(-1, keepdim=True) - 1
        try:
            logits = self._forward(state, state.ids, positions, state.pos, forward)
        except Exception as exc:  # noqa: BLE001 - any compile failure: run eagerly instead
            if forward is None or _capturing():
                raise
            log.warning("moe-uvm: torch.compile of the decode step failed (%s: %s); decoding "
                        "without it", type(exc).__name__, exc)
            self.compile, self._compiled = None, None
            logits = self._forward(state, state.ids, positions, state.pos)
        state.ids.copy_(logits.argmax(-1, keepdim=True))
        state.pos.add_(1)

    @torch.no_grad()
    def prepare(self, batch: int) -> float:
        """Warm up and capture the decode step of batch size `batch` now (CUDA graphs only;
        otherwise nothing), so that no capture falls inside a timed generation. The warm-up
        steps run on zeroed buffers whose cache is reset afterwards; they do run the model,
        so MoE layers see their routing. Returns the seconds it took."""
        start = time.perf_counter()
        state = self._batch(batch)
        if not self.graphs or state.graph is not None:
            return 0.0
        state.cache.reset()
        state.mask.zero_()
        state.ids.zero_()
        state.pos.zero_()
        while self.graphs and state.graph is None:
            self._run_step(state)
        state.cache.reset()
        return self._now() - start

    def _run_step(self, state: _Batch) -> None:
        if not self.graphs:
            self._step(state)
            return
        if state.graph is None and state.eager_steps < self.WARMUP_STEPS:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._step(state)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            state.eager_steps += 1
            return
        if state.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    self._step(state)  # recorded, not run: replays run it
            except RuntimeError as exc:  # something in the model is not capturable
                log.warning("moe-uvm: the decode step could not be captured in a CUDA graph "
                            "(%s); decoding eagerly", exc)
                self.graphs = False
                self._step(state)
                return
            self._pool = graph.pool()
            state.graph = graph
            return  # captured, not run: prepare() calls this until a graph exists
        state.graph.replay()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        on_token: Callable[[torch.Tensor], None] | None = None,
        on_prefilled: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """New tokens [B, max_new_tokens] after left-padded prompts `input_ids` [B, T]
        (`attention_mask` 1 on real tokens; default all ones). Decoding does not stop at
        end-of-sequence tokens. `on_token` gets each step's [B] ids as they come (a host copy
        per step); without it tokens stay on the device until the end. `on_prefilled` is called
        once the prompt is in the cache (after a device sync, before the first decode step).
        `self.times` then holds (start, first token, end) in perf_counter seconds, each taken
        after a device synchronisation."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [batch, tokens >= 1], got "
                             f"{tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if T + max_new_tokens > self.max_len:
            raise ValueError(f"a {T}-token prompt and {max_new_tokens} new tokens need "
                             f"max_len >= {T + max_new_tokens}; this decoder has {self.max_len}")
        self.prepare(B)
        started = self._now()
        ids = input_ids.to(self.device)
        mask = (torch.ones_like(ids) if attention_mask is None
                else attention_mask.to(self.device, torch.long))
        state = self._batch(B)
        state.cache.reset()
        state.mask.zero_()
        state.mask[:, :T] = mask
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        for start in range(0, T, self.prefill_chunk):
            stop = min(T, start + self.prefill_chunk)
            cache_position = torch.arange(start, stop, device=self.device)
            logits = self._forward(state, ids[:, start:stop], positions[:, start:stop],
                                   cache_position)
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=self.device)
        state.ids.copy_(logits.argmax(-1, keepdim=True))
        state.pos.fill_(T)
        first = self._now()
        if on_prefilled is not None:
            on_prefilled()
        for step in range(max_new_tokens):
            out[:, step] = state.ids[:, 0]
            if on_token is not None:
                on_token(out[:, step].cpu())
            if step + 1 < max_new_tokens:
                self._run_step(state)
        self.times = (started, first, self._now())
        return out

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
