"""Lookahead prefetch on a trained model (the tiny Qwen3-MoE checkpoint in ../shared/models, CPU,
through load_offloaded): on real routing its predictions beat a random guess by a wide margin,
and prefetching never changes the logits."""

import inspect
import pathlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import DynamicCache  # noqa: E402

from moe_uvm.config import ExpertOffloadConfig  # noqa: E402
from moe_uvm.integrations import hf  # noqa: E402

from helpers import tiny_checkpoint, use_reference_kernels  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = tiny_checkpoint()
pytestmark = pytest.mark.skipif(MODEL is None, reason="the trained tiny checkpoint is not here "
                                "(../shared/models or local/models/tiny-qwen3moe-bytes)")

RESIDENT, SLOTS, TOKENS = 8, 8, 160
"""25% of the 32 experts resident (first_n), 8 slots, 160 bytes (= tokens) of held-out text."""
MARGIN = 2.5
"""Lookahead's precision and recall must be at least this many times a random guess's. Measured
here: ~4.7x (precision ~0.58 vs 0.12) and ~3.9x (recall ~0.65 vs 0.17)."""


def decode(model, ids: bytes) -> torch.Tensor:
    """Teacher-forced decode, one token per step (batch 1): the logits of every step."""
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
    kv, out = DynamicCache(config=model.config), []
    with torch.no_grad():
        for token in ids:
            step = model(input_ids=torch.tensor([[token]]), use_cache=True, **{key: kv})
            out.append(step.logits[0, -1])
    return torch.stack(out)


@pytest.fixture(scope="module")
def runs():
    """(lookahead logits, its slot cache, logits without a slot cache) over the same text."""
    # The CPU runtime's own path: the plain-torch references (tested against the kernels in
    # their own tests). The Triton interpreter, conftest's CPU default, takes minutes per token.
    with pytest.MonkeyPatch.context() as patch:
        use_reference_kernels(patch)
        text = (ROOT / "moe_uvm" / "slots.py").read_bytes()[:TOKENS]
        config = ExpertOffloadConfig(num_resident=RESIDENT, prefetch="lookahead",
                                     prefetch_slots=SLOTS)
        loaded = hf.load_offloaded(MODEL, config, device="cpu")
        use_reference_kernels(patch)  # transformers may have imported a second kernels copy
        with_lookahead = decode(loaded.model, text)
        plain = hf.load_offloaded(MODEL, ExpertOffloadConfig(num_resident=RESIDENT), device="cpu")
        without = decode(plain.model, text)
    yield with_lookahead, loaded.manager.slot_cache, without
    loaded.manager.close()
    plain.manager.close()


def test_lookahead_beats_a_random_guess_on_real_routing(runs):
    _, cache, _ = runs
    L, m = cache.num_layers, cache.num_predicted
    offloaded = cache.num_experts - RESIDENT
    # Layer 0 has no earlier layer to predict it from.
    predicted, correct, needed, _ = cache.stats.counters[1:].sum(0).tolist()
    steps = TOKENS * (L - 1)
    assert predicted == steps * m
    # m of the offloaded experts drawn at random: each needed one is drawn with probability
    # m / offloaded, and each draw is needed with probability (needed per step) / offloaded.
    random_recall = m / offloaded
    random_precision = needed / steps / offloaded
    recall, precision = correct / needed, correct / predicted
    assert recall >= MARGIN * random_recall, (recall, random_recall)
    assert precision >= MARGIN * random_precision, (precision, random_precision)


def test_lookahead_leaves_the_logits_bitwise_unchanged(runs):
    with_lookahead, cache, without = runs
    # The kernel did read prefetched slot copies, so the equality covers that path.
    assert cache.stats.counters[:, 3].sum() > 0 and cache.copies.sum() > 0
    assert torch.equal(with_lookahead, without)
