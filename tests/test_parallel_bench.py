"""`moe-uvm bench --nproc 2` on the CPU (gloo, tiny layers): every row is there, the expert-
parallel steps (replicated tokens with an all-reduce; tokens sharded with all-gather +
reduce-scatter or with all-to-all) equal one process's within fp32 rounding (< 1e-5: the
per-token sum is split over the ranks), and what it cannot run is refused."""

import json

import pytest

from moe_uvm.cli import main


def test_bench_nproc_2_rows_match_one_process(tmp_path, capsys):
    code = main(["bench", "--device", "cpu", "--tiny", "--nproc", "2", "--resident",
                 "0%,50%,100%", "--batch", "1,2", "--steps", "1", "--warmup-tokens", "2",
                 "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "parallel.json").read_text())
    assert result["ranks"] == 2 and result["device"] == "cpu"
    rows = {(r["method"], r["batch"], r["budget_fraction"]): r for r in result["records"]}
    for batch in (1, 2):
        for fraction in (0.0, 0.5, 1.0):
            assert ("one-gpu", batch, fraction) in rows and ("ep", batch, fraction) in rows
        assert ("ep-full", batch, 0.5) in rows  # each rank the one-GPU budget: 2x in total
        assert ("ep-full", batch, 0.0) not in rows and ("ep-full", batch, 1.0) not in rows
        half, full = rows[("ep", batch, 0.5)], rows[("ep-full", batch, 0.5)]
        assert half["resident_per_rank"] * 2 == full["resident_per_rank"]
        assert full["resident_gb"] == pytest.approx(2 * half["resident_gb"])
        assert rows[("ep", batch, 0.5)]["resident_gb"] == pytest.approx(
            rows[("one-gpu", batch, 0.5)]["resident_gb"])
        # tokens sharded too (all-gather + reduce-scatter, all-to-all): batches divisible by 2
        for name in ("ep-ag", "ep-a2a"):
            for fraction in (0.0, 0.5, 1.0):
                assert ((name, batch, fraction) in rows) == (batch % 2 == 0)
    assert rows[("ep-a2a", 2, 0.5)]["tokens_per_rank"] == 1
    errors = [r["rel_err_vs_one_gpu"] for r in result["records"] if r["method"] != "one-gpu"]
    assert errors and max(errors) < 1e-5, errors
    shown = capsys.readouterr().out
    assert "| 1 | 50% | ep-full |" in shown and "timings below mean nothing" in shown


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "2", "--slots", "4"], "drop --slots"),
    (["--nproc", "2", "--device", "simulate"], "--nproc: GPU benchmark only"),
])
def test_bench_nproc_refusals(tmp_path, capsys, argv, message):
    code = main(["bench", "--tiny", "--out", str(tmp_path), "--device", "cpu", *argv])
    assert code != 0
    assert message in capsys.readouterr().err
