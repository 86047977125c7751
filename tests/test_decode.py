"""StaticDecoder (moe_uvm.decode): a static KV cache, chunked prefill and (on CUDA) the decode
step in a CUDA graph. On CPU its greedy tokens equal transformers' own `generate` for every
family, left padding and chunked prefill included; on the GPU the captured steps equal eager
ones bitwise, with experts offloaded behind a slot cache."""

import pytest
import torch

pytest.importorskip("transformers")

from moe_uvm.config import ExpertOffloadConfig  # noqa: E402
from moe_uvm.decode import StaticDecoder  # noqa: E402
from moe_uvm.integrations import hf  # noqa: E402

from helpers import FAMILY_CONFIGS, tiny_model  # noqa: E402

NEW = 8


def prompts(vocab: int, seed: int = 0):
    """Two prompts of 9 and 6 tokens, left-padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_static_decode_equals_transformers_generate(family, seed):
    model = tiny_model(family, seed).eval()
    ids, mask = prompts(model.config.vocab_size, seed)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, eos_token_id=None)[:, 9:]
    seen = []
    for chunk in (512, 4, 1):  # whole prompt, chunks, token by token
        decoder = StaticDecoder(model, max_len=9 + NEW + 3, prefill_chunk=chunk)
        got = decoder.generate(ids, mask, max_new_tokens=NEW, on_token=seen.append)
        assert torch.equal(got, want), (chunk, got, want)
        start, first, end = decoder.times
        assert start <= first <= end
    assert torch.equal(torch.stack(seen[:NEW], 1), want)  # streamed as they came
    again = decoder.generate(ids[:1], mask[:1], max_new_tokens=NEW)  # another batch size
    assert torch.equal(again, want[:1])


def test_bad_arguments_are_refused(seed):
    model = tiny_model("qwen3_moe", seed).eval()
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        StaticDecoder(model, max_len=1)
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        StaticDecoder(model, max_len=8, prefill_chunk=0)
    with pytest.raises(ValueError, match="graphs=True needs the model on a CUDA device"):
        StaticDecoder(model.cpu(), max_len=8, graphs=True)
    decoder = StaticDecoder(model.cpu(), max_len=8)
    with pytest.raises(ValueError, match="need max_len >= 12; this decoder has 8"):
        decoder.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=8)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, tokens >= 1\]"):
        decoder.generate(torch.ones(4, dtype=torch.long), max_new_tokens=2)


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_gpu_captured_decode_equals_eager_with_offloaded_experts(family, seed, tmp_path):
    """bf16 on the GPU, a quarter of the experts resident and a slot cache: CUDA-graph decode
    steps give the same tokens as eager static-cache steps, with and without torch.compile."""
    model = tiny_model(family, seed)
    model.save_pretrained(tmp_path)
    cfg = model.config
    experts = (getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
               or cfg.n_routed_experts)
    config = ExpertOffloadConfig(num_resident=max(experts // 4, 1), prefetch_slots=2)
    loaded = hf.load_offloaded(tmp_path, config, dtype=torch.bfloat16, device="cuda")
    ids, mask = prompts(loaded.model.config.vocab_size, seed)
    for compile in (False, True):  # plain forward, and torch.compile'd (inductor) steps
        eager = StaticDecoder(loaded.model, max_len=32, prefill_chunk=4, graphs=False,
                              compile=compile)
        graph = StaticDecoder(loaded.model, max_len=32, prefill_chunk=4, graphs=True,
                              compile=compile)
        want = eager.generate(ids, mask, max_new_tokens=12)
        for _ in range(2):  # the second call replays the graph captured in the first
            got = graph.generate(ids, mask, max_new_tokens=12)
            assert graph.graphs and graph._batches[2].graph is not None
            assert graph.compile == ("inductor" if compile else None)  # compiled, no fallback
            assert torch.equal(got, want)
    loaded.manager.close()


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_compiled_decode_step_traces_offloaded_experts_as_one_op(family, seed, tmp_path,
                                                                 monkeypatch):
    """torch.compile of the decode step (the aot_eager backend on CPU: dynamo's trace without
    inductor's code generation) takes each offloaded expert module as one opaque op and gives
    the eager decoder's tokens."""
    from helpers import use_reference_kernels

    model = tiny_model(family, seed)
    model.save_pretrained(tmp_path)
    cfg = model.config
    experts = (getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
               or cfg.n_routed_experts)
    loaded = hf.load_offloaded(tmp_path, ExpertOffloadConfig(num_resident=max(experts // 4, 1)),
                               dtype=torch.float32, device="cpu")
    use_reference_kernels(monkeypatch)
    torch._dynamo.reset()
    ids, mask = prompts(loaded.model.config.vocab_size, seed)
    want = StaticDecoder(loaded.model, max_len=24, compile=False).generate(
        ids, mask, max_new_tokens=NEW)
    decoder = StaticDecoder(loaded.model, max_len=24, compile="aot_eager")
    got = decoder.generate(ids, mask, max_new_tokens=NEW)
    assert decoder.compile == "aot_eager"  # no fallback to the plain forward
    assert torch.equal(got, want)
    loaded.manager.close()


def test_compile_argument_is_checked(seed):
    model = tiny_model("qwen3_moe", seed).eval()
    with pytest.raises(ValueError, match="compile must be a bool, None or a torch.compile"):
        StaticDecoder(model, max_len=8, compile=3)
    assert StaticDecoder(model, max_len=8).compile is None  # CPU: no graphs, no compile
