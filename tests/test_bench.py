"""The decode-benchmark harness on the CPU path (tiny shapes; timings mean nothing here) and the
`moe-uvm bench` simulation fallback."""

import json
import sys

import numpy as np
import pytest

from moe_uvm import cli
from moe_uvm.tools import bench_sweep
from moe_uvm.tools.bench import METHODS, managed_residency
from moe_uvm.trace import synthetic_trace

from helpers import use_reference_kernels


@pytest.fixture
def small_trace(tmp_path):
    trace = synthetic_trace(num_layers=3, num_experts=8, top_k=2, num_sequences=4,
                            tokens_per_sequence=16, seed=np.random.randint(1 << 30))
    path = tmp_path / "trace.npz"
    trace.save(path)
    return path


def test_harness_runs_every_method_with_identical_outputs(small_trace, tmp_path):
    cfg = bench_sweep.BenchConfig(trace=str(small_trace), resident="0,4,8", batches=(1, 3),
                                  steps=2, warmup_tokens=3, device="cpu", tiny=True,
                                  methods=METHODS)
    result = bench_sweep.sweep(cfg, progress=lambda line: None)
    assert result["note"] == bench_sweep.CPU_NOTE
    recs = result["records"]
    methods = {r["method"] for r in recs}
    assert methods == set(METHODS)
    # device once per batch, every other method at every resident count
    assert len(recs) == 2 * (1 + 3 * (len(METHODS) - 1))
    assert all(r["exact"] for r in recs), [r for r in recs if not r["exact"]]
    for r in recs:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0
        assert (r["warmup_steps"], r["timed_steps"]) == ((3, 2) if r["batch"] == 1 else (1, 2))
        if r["method"] not in ("device", "lru", "freq_lru", "auto") and r["resident"] == 8:
            assert r["offloaded_mb_per_step"] == 0
        if r["method"] in ("uva", "lru", "first_n") and r["resident"] == 0:
            assert r["offloaded_mb_per_step"] > 0
    paths = bench_sweep.write_outputs(result, tmp_path)
    assert json.loads(paths[0].read_text())["records"] == json.loads(json.dumps(recs))
    assert paths[1].stat().st_size > 0
    table = bench_sweep.markdown_table(result)
    assert table.count("\n") == len(recs) + 1


def test_slot_cache_methods_keep_outputs_and_report_prefetch_metrics(small_trace):
    cfg = bench_sweep.BenchConfig(trace=str(small_trace), resident="4", batches=(2,), steps=3,
                                  warmup_tokens=2, device="cpu", tiny=True, methods=("profile",),
                                  slots=(3,),
                                  prefetch=("none", "speculative"))
    recs = bench_sweep.sweep(cfg, progress=lambda line: None)["records"]
    cached = {r["method"]: r for r in recs if "slots" in r}
    assert set(cached) == {"cache3", "speculative3"}
    for rec in cached.values():
        assert rec["exact"] and 0 <= rec["slot_hit_rate"] <= 1
    assert cached["cache3"]["copies_per_step"] == 0
    assert cached["speculative3"]["prefetch_precision"] is not None


def test_floor_counts_distinct_experts_per_layer():
    touched = np.zeros((2, 1, 4), bool)
    touched[0, 0, [0, 1]] = True  # step 0 reads experts 0 and 1
    touched[1, 0, [1, 2, 3]] = True
    resident = np.array([[True, True, False, False]])
    floor, off = bench_sweep._floor(touched, resident, eb=10**9, hbm=1000, pcie=10)
    # step 0: 2 GB at 1000 GB/s = 2 ms; step 1: 1 GB HBM (1 ms) + 2 GB PCIe (200 ms)
    assert floor == pytest.approx(np.median([2.0, 201.0]))
    assert off == pytest.approx(1e9)


def test_managed_policies_pick_the_profiles_experts(small_trace):
    cfg = bench_sweep.BenchConfig(trace=str(small_trace), device="cpu", tiny=True)
    work = bench_sweep.make_workload(cfg)
    counts = work.profile.counts
    sets = managed_residency(work, "profile", 3)
    for layer, ids in enumerate(sets):
        assert sorted(ids) == sorted(np.argsort(-counts[layer], kind="stable")[:3].tolist())
    total = sum(len(s) for s in managed_residency(work, "global", 3))
    assert total == 3 * work.num_layers
    assert managed_residency(work, "first_n", 2) == [[0, 1]] * work.num_layers


def test_bench_without_gpu_simulates_and_says_so(capsys, monkeypatch, tmp_path):
    # The routing counters' torch reference, as on a CPU without the interpreter (what users
    # run): the kernel is tested on its own, and interpreted here it takes minutes.
    use_reference_kernels(monkeypatch)
    monkeypatch.setattr(cli.uvm, "available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "No CUDA GPU here: running the CPU policy simulation" in out
    assert "| first_n |" in out and "| oracle |" in out
    results = tmp_path / "moe-uvm-results"
    assert f"results in {results}: simulation.json" in out
    records = json.loads((results / "simulation.json").read_text())["records"]
    # The defaults: every policy at 0..100% resident, batches 1 and 16.
    assert {(r["resident"], r["batch"]) for r in records} == {
        (n, b) for n in (0, 32, 64, 96, 128) for b in (1, 16)}


def test_bench_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown methods"):
        bench_sweep.BenchConfig(methods=("device", "magic"))


def test_outputs_without_matplotlib_write_the_json_and_say_the_plot_was_skipped(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    result = {"records": [], "device": {"device": "cpu"}}
    paths = bench_sweep.write_outputs(result, tmp_path)
    assert paths == [tmp_path / "decode.json"]
    assert json.loads(paths[0].read_text()) == result
    assert not (tmp_path / "decode.png").exists()
    assert capsys.readouterr().out == ("matplotlib not installed: skipped decode.png "
                                       "(pip install matplotlib)\n")


@pytest.mark.parametrize("kwargs, message", [
    (dict(prefetch=("speculative",)), "needs slots"),
    (dict(slots=(4,), methods=("device", "uva")), "slots run on moe-uvm's managed residency"),
    (dict(device="tpu"), "device must be cuda, cpu or simulate"),
])
def test_bench_config_refuses_settings_it_would_ignore(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_sweep.BenchConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(slots=(200,)), "slots must be at most the trace's 128 experts"),
    (dict(slots=(8,), resident="0,100%"), "resident 0,100% has none"),
    (dict(calibrate_sequences=32), "allowed 1 to 31 of the trace's 32"),
    (dict(layers=9), r"layers must be in \[1, 8\]"),
])
def test_bench_inputs_are_checked_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_sweep.load_inputs(bench_sweep.BenchConfig(**kwargs))
