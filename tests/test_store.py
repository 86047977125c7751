import pytest
import torch

from moe_uvm.store import EXPERT_ALIGNMENT, ManagedExpertStore, coalesce


def make_store(num_experts=6, device="cpu", **kwargs):
    specs = {
        "w13": ((48, 32), torch.float16),
        "w2": ((32, 24), torch.bfloat16),
        "scale": ((32,), torch.float32),
    }
    return ManagedExpertStore(num_experts, specs, device, **kwargs)


@pytest.mark.parametrize(
    "ids, runs",
    [
        ([], []),
        ([3], [(3, 1)]),
        ([5, 1, 2, 3, 7, 8], [(1, 3), (5, 1), (7, 2)]),
        ([2, 2, 3], [(2, 2)]),
    ],
)
def test_coalesce_merges_consecutive_experts(ids, runs):
    assert coalesce(ids) == runs


def test_slots_are_aligned_and_views_have_slot_stride():
    store = make_store(alignment=4096)
    assert store.slot_nbytes % 4096 == 0
    assert store.nbytes == store.slot_nbytes * 6
    w13, w2, scale = store["w13"], store["w2"], store["scale"]
    assert w13.shape == (6, 48, 32) and w13.dtype == torch.float16
    assert w2.shape == (6, 32, 24) and w2.dtype == torch.bfloat16
    assert scale.shape == (6, 32) and scale.dtype == torch.float32
    assert w13.stride() == (store.slot_nbytes // 2, 32, 1)
    assert w2.stride() == (store.slot_nbytes // 2, 24, 1)
    for e in range(6):
        ptr, nbytes = store.expert_range(e)
        assert ptr % 4096 == store.base_ptr % 4096 and nbytes == store.slot_nbytes
        for view in (w13, w2, scale):
            start = view[e].data_ptr()
            assert ptr <= start and start + view[e].numel() * view.element_size() <= ptr + nbytes


def test_default_alignment_is_2mib():
    store = make_store(num_experts=2)
    assert store.slot_nbytes == EXPERT_ALIGNMENT


def test_writing_one_expert_leaves_neighbours_and_other_tensors_intact():
    store = make_store(alignment=4096)
    values = {name: torch.randn(store[name].shape).to(store[name].dtype) for name in store.names}
    for name, v in values.items():
        store[name].copy_(v)
    store["w13"][2] = torch.randn(48, 32).half()
    store["w2"][2] = torch.randn(32, 24).bfloat16()
    for name, v in values.items():
        for e in (0, 1, 3, 4, 5):
            assert torch.equal(store[name][e], v[e]), (name, e)
    assert torch.equal(store["scale"][2], values["scale"][2])


def test_run_ranges_cover_exactly_the_requested_slots():
    store = make_store(alignment=4096)
    ranges = store.run_ranges([4, 0, 1, 5])
    s = store.slot_nbytes
    assert ranges == [(store.base_ptr, 2 * s), (store.base_ptr + 4 * s, 2 * s)]


def test_bad_ids_and_names_are_refused():
    store = make_store()
    with pytest.raises(ValueError, match=r"expert ids \[6\] out of range \[0, 6\)"):
        store.expert_range(6)
    with pytest.raises(ValueError, match=r"expert ids \[-1\]"):
        store.run_ranges([0, -1])
    with pytest.raises(KeyError, match="store has no tensor 'w1'"):
        store["w1"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=0, specs={"w": ((2,), torch.float16)}), "num_experts must be positive"),
        (dict(num_experts=2, specs={}), "at least one per-expert tensor spec"),
        (dict(num_experts=2, specs={"w": ((0, 3), torch.float16)}), "positive shape"),
        (dict(num_experts=2, specs={"w": ((2,), torch.float16)}, alignment=100), "multiple of 256"),
    ],
)
def test_invalid_store_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ManagedExpertStore(device="cpu", **kwargs)


def test_cpu_store_is_not_managed_and_advice_is_a_no_op():
    store = make_store()
    assert not store.is_managed
    store.advise_resident([0, 1])
    store.advise_offloaded([2])
    assert "on cpu" in repr(store)
