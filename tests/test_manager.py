import pytest
import torch

from moe_uvm import uvm
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.manager import ExpertOffloadManager, ReadviseError
from moe_uvm.store import ManagedExpertStore

from helpers import feed, routed


def stores(num_layers=3, num_experts=8, device="cpu"):
    specs = {"w13": ((16, 8), torch.float16), "w2": ((8, 8), torch.float16)}
    return [
        ManagedExpertStore(num_experts, specs, device, alignment=4096) for _ in range(num_layers)
    ]


class AdviceLog:
    """Records the advice calls a store would make, and can fail the n-th one."""

    def __init__(self, monkeypatch, store_list, fail_at=None):
        self.calls = []
        self.fail_at = fail_at
        for layer, store in enumerate(store_list):
            for kind in ("resident", "offloaded"):
                monkeypatch.setattr(store, f"advise_{kind}", self._recorder(layer, kind))

    def _recorder(self, layer, kind):
        def advise(ids, stream=None, pace=None):
            ids = tuple(ids)
            if self.fail_at is not None and len(self.calls) == self.fail_at:
                self.calls.append(("FAILED", layer, kind, ids))
                raise uvm.UVMError(
                    "cudaMemAdvise(SetPreferredLocation) failed: cudaErrorInvalidValue"
                )
            self.calls.append((layer, kind, ids))

        return advise


def test_first_n_initial_residency_and_accounting():
    s = stores()
    m = ExpertOffloadManager(s, ExpertOffloadConfig(num_resident=3))
    slot = s[0].slot_nbytes
    for layer in range(3):
        assert m.resident_ids(layer) == (0, 1, 2)
        assert m.offloaded_ids(layer) == (3, 4, 5, 6, 7)
    assert m.resident_bytes() == 9 * slot and m.offloaded_bytes() == 15 * slot
    assert m.resident_bytes(1) == 3 * slot and m.offloaded_bytes(1) == 5 * slot
    assert "3 layers x 8 experts" in m.summary() and "resident 3/8 per layer" in m.summary()


def test_manual_and_per_layer_counts():
    m = ExpertOffloadManager(
        stores(2), ExpertOffloadConfig(resident_selection="manual", resident_ids=[[7, 1], "3"])
    )
    assert m.resident_ids(0) == (1, 7) and m.resident_ids(1) == (3,)
    m = ExpertOffloadManager(stores(2), ExpertOffloadConfig(num_resident=[0, -1]))
    assert m.resident_ids(0) == () and m.resident_ids(1) == tuple(range(8))


def test_gpu_budget_splits_evenly_without_counts():
    s = stores(3)
    budget_gb = 7 * s[0].slot_nbytes / 1e9
    m = ExpertOffloadManager(s, ExpertOffloadConfig(gpu_budget_gb=budget_gb))
    assert [len(m.resident_ids(i)) for i in range(3)] == [3, 2, 2]


def test_explicit_num_resident_overrides_the_budget_split_and_must_fit_it():
    s = stores(3)
    budget_gb = 7 * s[0].slot_nbytes / 1e9
    m = ExpertOffloadManager(s, ExpertOffloadConfig(gpu_budget_gb=budget_gb, num_resident=2))
    assert [len(m.resident_ids(i)) for i in range(3)] == [2, 2, 2]
    cfg = ExpertOffloadConfig(gpu_budget_gb=budget_gb, num_resident=3)
    with pytest.raises(ValueError, match="num_resident=3 needs .* which holds 7 resident experts"):
        ExpertOffloadManager(stores(3), cfg)


def test_prefetch_slots_beyond_the_offloaded_experts_are_refused():
    with pytest.raises(ValueError, match="prefetch_slots=6, .* the maximum is 5"):
        ExpertOffloadManager(stores(2), ExpertOffloadConfig(num_resident=3, prefetch_slots=6))


def test_readvise_advises_only_the_difference_coalesced(monkeypatch):
    s = stores(2)
    m = ExpertOffloadManager(s, ExpertOffloadConfig(num_resident=4))
    log = AdviceLog(monkeypatch, s)
    result = m.readvise(1, [0, 1, 5, 6])
    assert result.promoted == (5, 6) and result.demoted == (2, 3)
    assert result.bytes_moved == 4 * s[1].slot_nbytes
    # demotions first (release GPU memory), one call per run of consecutive experts
    assert log.calls == [(1, "offloaded", (2, 3)), (1, "resident", (5, 6))]
    assert m.resident_ids(1) == (0, 1, 5, 6) and m.resident_ids(0) == (0, 1, 2, 3)


def test_readvise_to_same_set_makes_no_calls(monkeypatch):
    s = stores(1)
    m = ExpertOffloadManager(s, ExpertOffloadConfig(num_resident=4))
    log = AdviceLog(monkeypatch, s)
    result = m.readvise(0, [3, 2, 1, 0])
    assert log.calls == [] and result.promoted == () and result.demoted == ()


@pytest.mark.parametrize(
    "layer, ids, message",
    [
        (0, [0, 8], r"expert ids \[8\] out of range \[0, 8\)"),
        (0, [1, 1], r"duplicate expert ids \[1\]"),
        (0, ["a"], "must be integers"),
        (5, [0], r"layer 5 out of range \[0, 2\)"),
    ],
)
def test_rejected_readvise_leaves_residency_intact(monkeypatch, layer, ids, message):
    s = stores(2)
    m = ExpertOffloadManager(s, ExpertOffloadConfig(num_resident=2))
    log = AdviceLog(monkeypatch, s)
    with pytest.raises(ReadviseError, match=message):
        m.readvise(layer, ids)
    assert log.calls == []
    assert m.resident_ids(0) == (0, 1) and m.resident_ids(1) == (0, 1)


def test_failed_readvise_rolls_back_and_says_so(monkeypatch):
    s = stores(1)
    m = ExpertOffloadManager(s, ExpertOffloadConfig(num_resident=3))
    log = AdviceLog(monkeypatch, s, fail_at=2)  # demote run ok, first promote ok, second fails
    with pytest.raises(ReadviseError, match="cudaErrorInvalidValue.*previous residency.*restored"):
        m.readvise(0, [2, 4, 6])
    assert m.resident_ids(0) == (0, 1, 2)
    done = [c for c in log.calls if c[0] != "FAILED"]
    assert done[:2] == [(0, "offloaded", (0, 1)), (0, "resident", (4,))]
    # the undo advises the changed runs back, newest first, the half-applied one included
    assert done[2:] == [(0, "offloaded", (6,)), (0, "offloaded", (4,)), (0, "resident", (0, 1))]


def test_gpu_set_listeners_hear_both_sets_while_pages_move_then_the_outcome(monkeypatch):
    """The hybrid's masks: during a re-advise the GPU computes old and new resident experts,
    so the CPU never reads a page bound for the GPU; then the new set, or the old on failure."""
    s = stores(2)
    m = ExpertOffloadManager(s, ExpertOffloadConfig(num_resident=3))
    heard = []
    m.add_gpu_set_listener(lambda layer, ids: heard.append((layer, tuple(ids))))
    seen_during = []
    log = AdviceLog(monkeypatch, s)
    inner = s[1].advise_resident
    monkeypatch.setattr(s[1], "advise_resident",
                        lambda ids, *a: (seen_during.append(heard[-1]), inner(ids, *a)))
    m.readvise(1, [0, 5, 6])
    assert heard == [(1, (0, 1, 2, 5, 6)), (1, (0, 5, 6))]
    assert seen_during == [(1, (0, 1, 2, 5, 6))]  # promotions ran under the union
    heard.clear()
    log.fail_at = len(log.calls) + 1  # the demote runs, the promote fails
    with pytest.raises(ReadviseError):
        m.readvise(0, [0, 1, 7])
    assert heard == [(0, (0, 1, 2, 7)), (0, (0, 1, 2))]


def test_layers_must_agree_on_expert_count():
    mixed = stores(1, 8) + stores(1, 4)
    with pytest.raises(ValueError, match="same number of experts"):
        ExpertOffloadManager(mixed, ExpertOffloadConfig())


def test_frequency_warmup_readvises_once_at_the_threshold():
    s = stores(2)
    cfg = ExpertOffloadConfig(
        num_resident=2, resident_selection="frequency", warmup_tokens=128, min_batch_tokens=64
    )
    m = ExpertOffloadManager(s, cfg)
    assert m.resident_ids(0) == (0, 1)
    feed(m, routed(16, [5, 6]))  # below min_batch_tokens: ignored
    feed(m, routed(64, [5, 6]))
    m.wait_idle()
    assert m.stats()["readvises"] == 0 and m.resident_ids(0) == (0, 1)
    feed(m, routed(64, [5, 6, 7]))  # 128 recorded tokens: the decision
    m.wait_idle()
    assert m.stats()["decisions"] == 1 and m.stats()["readvises"] == 2
    assert m.resident_ids(0) == (5, 6) and m.resident_ids(1) == (5, 6)
    feed(m, routed(256, [1, 2]))  # fixed warmup decides exactly once
    m.wait_idle()
    assert m.stats()["readvises"] == 2 and m.resident_ids(0) == (5, 6)
    m.close()


def test_static_selection_counts_but_never_readvises():
    m = ExpertOffloadManager(stores(1), ExpertOffloadConfig(num_resident=2, warmup_tokens=64))
    feed(m, routed(128, [4, 7]))
    m.wait_idle()
    assert m.resident_ids(0) == (0, 1)
    counts = m.routing_counts()
    assert counts[0, 4] == 128 and counts[0, 7] == 128 and counts.sum() == 256


def test_failed_decision_keeps_old_residency_and_tells_the_warmup(monkeypatch):
    s = stores(1)
    cfg = ExpertOffloadConfig(
        num_resident=2, resident_selection="frequency", warmup_tokens=64, adaptive=True,
        adaptive_interval_tokens=64,
    )
    m = ExpertOffloadManager(s, cfg)
    AdviceLog(monkeypatch, s, fail_at=0)
    feed(m, routed(64, [6, 7]))
    m.wait_idle()
    assert m.resident_ids(0) == (0, 1)
    assert m.warmup.resident[0].nonzero()[0].tolist() == [0, 1]  # the policy agrees
    assert len(m.failures) == 1 and m.stats()["failures"] == 1
    assert "cudaErrorInvalidValue" in str(m.failures[0]) and "restored" in str(m.failures[0])


def test_profile_selection_and_save_profile_round_trip(tmp_path):
    s = stores(2)
    m = ExpertOffloadManager(s, ExpertOffloadConfig(num_resident=2), top_k=2)
    feed(m, routed(64, [3, 5]))
    path = tmp_path / "profile.json"
    m.save_profile(str(path), model_id="tiny")
    cfg = ExpertOffloadConfig(num_resident=2, resident_selection="profile", profile_path=str(path))
    m2 = ExpertOffloadManager(stores(2), cfg, top_k=2)
    assert m2.resident_ids(0) == (3, 5) and m2.resident_ids(1) == (3, 5)


def test_mismatching_profile_is_refused(tmp_path):
    m = ExpertOffloadManager(stores(2), ExpertOffloadConfig(num_resident=2), top_k=2)
    path = tmp_path / "p.json"
    m.save_profile(str(path))
    cfg = ExpertOffloadConfig(num_resident=2, resident_selection="profile", profile_path=str(path))
    with pytest.raises(ValueError, match="profile"):
        ExpertOffloadManager(stores(3), cfg, top_k=2)


def test_gpu_budget_with_profile_splits_by_counts(tmp_path):
    m = ExpertOffloadManager(stores(2), ExpertOffloadConfig(num_resident=2), top_k=2)
    m.record(0, routed(64, [0, 1, 2, 3]))  # layer 0 flat over 4 experts
    m.record(1, routed(64, [6, 7]))  # layer 1 uses two
    path = tmp_path / "p.json"
    m.save_profile(str(path))
    slot = stores(1)[0].slot_nbytes
    cfg = ExpertOffloadConfig(
        gpu_budget_gb=6 * slot / 1e9, resident_selection="profile", profile_path=str(path)
    )
    m2 = ExpertOffloadManager(stores(2), cfg, top_k=2)
    assert m2.resident_ids(0) == (0, 1, 2, 3) and m2.resident_ids(1) == (6, 7)


def test_record_is_a_no_op_while_compiling(monkeypatch):
    m = ExpertOffloadManager(stores(1), ExpertOffloadConfig(min_batch_tokens=1))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    m.record(0, routed(4, [1]))
    monkeypatch.undo()
    assert m.routing_counts().sum() == 0
