"""Count-based slot eviction (moe_uvm.kernels.slot_evict and .slot_admit, SlotCache eviction):
lfu's admission and llama.cpp's frequency-class LRU against plain-Python models of each cache,
the one-launch lfu planner against the torch reference (interpreter on CPU, compiled on a GPU),
and (GPU) lfu / freq_lru caches inside CUDA-graph replay reading exactly what no cache reads."""

import math

import numpy as np
import pytest
import torch

from moe_uvm.kernels.slot_admit import frequency_key_fused, plan_admit_fused
from moe_uvm.kernels.slot_evict import add_routed, frequency_class_key, plan_admit, prior_scores
from moe_uvm.kernels.slot_plan_reference import commit_fill, count_prefetch, empty_slot_state
from moe_uvm.slots import SlotCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_steps(rng, steps, T, E, k):
    """[steps] int32 [T, k] routings: distinct experts per token, some padding."""
    out = []
    for _ in range(steps):
        ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
        if rng.random() < 0.3:
            ids[0, -1] = -1
        out.append(torch.from_numpy(ids))
    return out


class LfuModel:
    """lfu in plain Python: counts decay and count tokens; of held and needed offloaded
    experts, the S best by (score, held, lower id) stay; newcomers take free slots in order."""

    def __init__(self, E, S, resident, prior, decay):
        self.E, self.S, self.resident, self.prior, self.decay = E, S, resident, prior, decay
        self.usage = [0.0] * E
        self.slot_of = {}  # expert -> slot

    def step(self, ids):
        routed = [0] * self.E
        for e in ids.flatten().tolist():
            if e >= 0:
                routed[e] += 1
        # float32 like the device: decay then add, each rounded
        self.usage = [float(np.float32(np.float32(u) * np.float32(self.decay)) + np.float32(r))
                      for u, r in zip(self.usage, routed, strict=True)]
        needed = {e for e in range(self.E) if routed[e]}
        hits = len({e for e in needed if e in self.slot_of and not self.resident[e]})
        candidates = [e for e in range(self.E) if (e in self.slot_of or e in needed)
                      and not self.resident[e]]
        score = {e: float(np.float32(self.usage[e]) + np.float32(self.prior[e]))
                 for e in candidates}
        ranked = sorted(candidates, key=lambda e: (-score[e], e not in self.slot_of, e))
        keep = set(ranked[: self.S])
        for e in [e for e in self.slot_of if e not in keep]:
            del self.slot_of[e]
        used = set(self.slot_of.values())
        free = [s for s in range(self.S) if s not in used]
        fills = {}
        for e in sorted(keep - set(self.slot_of)):
            fills[e] = free.pop(0)
        self.slot_of.update(fills)
        return fills, hits


@pytest.mark.parametrize("trial", range(4))
def test_lfu_reference_matches_the_plain_python_cache(trial):
    rng = np.random.default_rng(trial)
    E, S, T, k = int(rng.integers(6, 24)), 0, int(rng.integers(1, 4)), 3
    S = int(rng.integers(1, E))
    resident = rng.random(E) < 0.25
    prior = np.round(rng.random(E) * 3, 1).astype(np.float32)
    model = LfuModel(E, S, resident, prior.tolist(), 0.5)
    expert_slot, slot_expert, _ = empty_slot_state(E, S)
    usage = torch.zeros(E)
    counters = torch.zeros(4, dtype=torch.int64)
    res = torch.from_numpy(resident)
    hits = 0
    for ids in random_steps(rng, 40, T, E, k):
        add_routed(usage, ids, 0.5)
        count_prefetch(counters, ids, res, expert_slot)
        fill = plan_admit(ids, res, expert_slot, slot_expert, usage + torch.from_numpy(prior))
        commit_fill(fill, expert_slot)
        fills, step_hits = model.step(ids)
        hits += step_hits
        assert {e: int(s) for e, s in enumerate(fill.tolist()) if s >= 0} == fills
        assert {e: int(s) for e, s in enumerate(expert_slot.tolist()) if s >= 0} == model.slot_of
        assert sorted(e for e in slot_expert.tolist() if e >= 0) == sorted(model.slot_of)
        assert torch.allclose(usage, torch.tensor(model.usage), rtol=0, atol=0)
    assert int(counters[3]) == hits


def test_lfu_admits_a_miss_only_when_it_outranks_the_weakest_held_expert():
    E, S = 6, 2
    expert_slot, slot_expert, _ = empty_slot_state(E, S)
    resident = torch.zeros(E, dtype=torch.bool)
    prior = torch.tensor([5.0, 4.0, 0, 0, 0, 0])
    usage = torch.zeros(E)
    for ids, expect_fill in (([[0, 1]], {0: 0, 1: 1}),   # empty: both admitted
                             ([[2, 3]], {}),              # one token each: below the priors
                             ([[0, 4]], {})):
        ids = torch.tensor(ids, dtype=torch.int32)
        add_routed(usage, ids, 1.0)
        fill = plan_admit(ids, resident, expert_slot, slot_expert, usage + prior)
        commit_fill(fill, expert_slot)
        assert {e: s for e, s in enumerate(fill.tolist()) if s >= 0} == expect_fill
    assert expert_slot[:2].tolist() == [0, 1]


def test_prior_scores_turn_counts_into_tokens_worth_of_routings():
    counts = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = prior_scores(counts, top_k=2, tokens=8)
    assert torch.equal(got[0], torch.tensor([12.0, 4.0, 0.0, 0.0]))  # 16 routings in 8 tokens
    assert torch.equal(got[1], torch.zeros(4))


@pytest.mark.parametrize("E,S,T", [(16, 5, 1), (40, 17, 3), (130, 64, 16)])
def test_fused_lfu_planner_equals_the_reference_over_many_steps(E, S, T):
    """Interpreter on CPU (compiled on a GPU): counts, counters, plans and pool bitwise equal
    to add_routed + count_prefetch + plan_admit at an exact decay (0.5)."""
    rng = np.random.default_rng(E)
    k = 4
    resident = torch.from_numpy(rng.random(E) < 0.3)
    prior = torch.from_numpy(np.round(rng.random(E) * 4, 1).astype(np.float32))
    a_pool, b_pool = empty_slot_state(E, S, device=DEVICE), empty_slot_state(E, S)
    a_usage, b_usage = torch.zeros(E, device=DEVICE), torch.zeros(E)
    a_count = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    b_count = torch.zeros(4, dtype=torch.int64)
    for ids in random_steps(rng, 8, T, E, k):
        a = plan_admit_fused(ids.to(DEVICE), resident.to(DEVICE), a_pool[0], a_pool[1], a_usage,
                             prior.to(DEVICE), 0.5, a_count)
        commit_fill(a, a_pool[0])
        add_routed(b_usage, ids, 0.5)
        count_prefetch(b_count, ids, resident, b_pool[0])
        b = plan_admit(ids, resident, b_pool[0], b_pool[1], b_usage + prior)
        commit_fill(b, b_pool[0])
        for got, want in ((a, b), (a_pool[0], b_pool[0]), (a_pool[1], b_pool[1]),
                          (a_usage, b_usage), (a_count, b_count)):
            assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("E,S,T", [(16, 5, 1), (130, 64, 16)])
def test_fused_frequency_key_equals_the_reference(E, S, T):
    rng = np.random.default_rng(E + 1)
    expert_slot, slot_expert, stamp = empty_slot_state(E, S)
    held = rng.choice(E, size=S - 1, replace=False)
    slot_expert[: S - 1] = torch.from_numpy(held.astype(np.int32))
    stamp[: S - 1] = torch.from_numpy(rng.integers(0, 9, S - 1))
    a_usage = torch.from_numpy((rng.random(E) * 40).round().astype(np.float32))
    b_usage = a_usage.clone()
    key = torch.empty(S, dtype=torch.int64, device=DEVICE)
    a_usage = a_usage.to(DEVICE)
    for ids in random_steps(rng, 4, T, E, 4):
        frequency_key_fused(ids.to(DEVICE), a_usage, 0.5, slot_expert.to(DEVICE),
                            stamp.to(DEVICE), key)
        add_routed(b_usage, ids, 0.5)
        assert torch.equal(a_usage.cpu(), b_usage)
        assert torch.equal(key.cpu(), frequency_class_key(b_usage, slot_expert, stamp))


def test_fused_lfu_planner_refuses_bad_arguments():
    expert_slot, slot_expert, _ = empty_slot_state(8, 4)
    ok = dict(topk_ids=torch.zeros(1, 2, dtype=torch.int32), resident=torch.zeros(8, dtype=bool),
              expert_slot=expert_slot, slot_expert=slot_expert, usage=torch.zeros(8),
              prior=torch.zeros(8), decay=0.5, counters=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="usage is torch.float64"):
        plan_admit_fused(**{**ok, "usage": torch.zeros(8, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
        plan_admit_fused(**{**ok, "decay": 1.5})


class FreqLruModel:
    """llama.cpp's MoE cache in plain Python: counts decay (half-life in tokens) and count
    tokens; every miss is admitted while a slot not needed now is left, taking the slot of the
    lowest class floor(log2(1 + count)), then least recently used, then lowest slot."""

    def __init__(self, E, S, half_life):
        self.E, self.S, self.half_life = E, S, half_life
        self.usage = [0.0] * E
        self.slot_expert = [-1] * S
        self.stamp = [-math.inf] * S

    def step(self, step, ids):
        T = ids.shape[0]
        decay = float(np.float32(0.5 ** (T / self.half_life)))
        routed = [0] * self.E
        for e in ids.flatten().tolist():
            if e >= 0:
                routed[e] += 1
        self.usage = [float(np.float32(np.float32(u) * np.float32(decay)) + np.float32(r))
                      for u, r in zip(self.usage, routed, strict=True)]
        needed = {e for e in range(self.E) if routed[e]}
        held = {e: s for s, e in enumerate(self.slot_expert) if e >= 0}
        level = [math.frexp(1.0 + u)[1] - 1 for u in self.usage]
        victims = sorted((s for s in range(self.S) if self.slot_expert[s] not in needed),
                         key=lambda s: (self.slot_expert[s] >= 0,
                                        level[self.slot_expert[s]] if self.slot_expert[s] >= 0
                                        else 0, self.stamp[s], s))
        for s in held.values():
            if self.slot_expert[s] in needed:
                self.stamp[s] = step
        for e in sorted(needed - set(held)):
            if not victims:
                break
            s = victims.pop(0)
            self.slot_expert[s] = e
            self.stamp[s] = step


def test_freq_lru_slot_cache_matches_llama_cpp_style_model():
    rng = np.random.default_rng(3)
    E, S, k, T = 12, 4, 2, 2
    w13 = torch.randn(E, 8, 4)
    w2 = torch.randn(E, 4, 4)
    cache = SlotCache([(w13, w2)], [[]], S, mode="none", top_k=k, eviction="freq_lru")
    model = FreqLruModel(E, S, cache.half_life_tokens)
    hidden = torch.zeros(T, 4)
    # Skewed routing so frequency classes differ.
    for step, ids in enumerate(random_steps(rng, 60, T, E, k), start=1):
        ids = torch.where(torch.rand(ids.shape) < 0.5, ids % 4, ids).int()
        ids = torch.stack([row if len(set(row.tolist())) == k else torch.tensor([0, 1])
                           for row in ids]).int()
        slots = cache.before_layer(0, ids, hidden)
        cache.after_layer(0, slots["fill_slot"])
        model.step(step, ids)
        assert cache.layers[0].slot_expert.tolist() == model.slot_expert, step


def test_lfu_and_freq_lru_refuse_prefetch_and_bad_half_life():
    w = [(torch.zeros(4, 2, 2), torch.zeros(4, 2, 1))]
    with pytest.raises(ValueError, match="prefetch must be none"):
        SlotCache(w, [[]], 2, mode="speculative", top_k=1, eviction="lfu")
    with pytest.raises(ValueError, match="half_life_tokens must be > 0"):
        SlotCache(w, [[]], 2, mode="none", top_k=1, eviction="lfu", half_life_tokens=0)
    with pytest.raises(ValueError, match="eviction must be one of lru, lfu, freq_lru"):
        SlotCache(w, [[]], 2, mode="none", top_k=1, eviction="mru")


@pytest.mark.gpu
@pytest.mark.parametrize("eviction", ["lfu", "freq_lru"])
@pytest.mark.parametrize("num_tokens", [1, 16])
def test_gpu_graph_replay_with_counted_eviction_reads_what_no_cache_reads(eviction, num_tokens):
    """8 layers of a Qwen3-like shape (E=64, top-8, bf16) behind an lfu / freq_lru cache with
    16 slots and nothing resident, captured once and replayed over 40 steps of skewed routing:
    every step's output bitwise equals the same step with no cache; the cache gets hits."""
    from moe_uvm.kernels import fused_moe

    E, k, H, inter, L, S = 64, 8, 256, 128, 4, 16
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    w13 = [torch.randn(E, 2 * inter, H, device="cuda", generator=gen).bfloat16() * 0.05
           for _ in range(L)]
    w2 = [torch.randn(E, H, inter, device="cuda", generator=gen).bfloat16() * 0.05
          for _ in range(L)]
    counts = torch.rand(L, E, generator=gen, device="cuda")
    cache = SlotCache(list(zip(w13, w2, strict=True)), [[]] * L, S, mode="none", top_k=k,
                      counts=counts, eviction=eviction)
    skew = torch.linspace(2, 0, E, device="cuda")
    ids_all = [[(torch.rand(num_tokens, E, generator=gen, device="cuda") + skew).topk(k).indices
                .int() for _ in range(L)] for _ in range(40)]
    weights = torch.rand(num_tokens, k, generator=gen, device="cuda")
    x = torch.randn(num_tokens, H, generator=gen, device="cuda").bfloat16()
    static_ids = [ids.clone() for ids in ids_all[0]]

    def step():
        h = x
        for layer in range(L):
            slots = cache.before_layer(layer, static_ids[layer], h)
            h = h + fused_moe(h, w13[layer], w2[layer], weights, static_ids[layer], **slots)
            cache.after_layer(layer, slots["fill_slot"])
        return h

    def plain(ids):
        h = x
        for layer in range(L):
            h = h + fused_moe(h, w13[layer], w2[layer], weights, ids[layer])
        return h

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    cache.reset()
    for ids in ids_all:
        for static, new in zip(static_ids, ids, strict=True):
            static.copy_(new)
        graph.replay()
        assert torch.equal(out, plain(ids))
    assert cache.stats.summary()["slot_hits"] > 0
