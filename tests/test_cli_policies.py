"""`moe-uvm calibrate | simulate | plan` end to end, and one-line errors on bad input."""

import json
import subprocess
import sys

import pytest

from moe_uvm.cli import main
from moe_uvm.profile import load_profile
from moe_uvm.simulate import POLICIES
from moe_uvm.trace import SAMPLE_TRACE, synthetic_trace


@pytest.fixture(scope="module")
def dsv2_trace(tmp_path_factory):
    """A DeepSeek-V2-Lite-shaped trace (26 MoE layers, 64 experts, top-6)."""
    path = tmp_path_factory.mktemp("traces") / "dsv2.npz"
    synthetic_trace(26, 64, 6, num_sequences=4, tokens_per_sequence=32, seed=1).save(path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_calibrate_then_simulate_on_other_sequences(tmp_path, capsys):
    profile = tmp_path / "p.json"
    code, out, _ = run(capsys, "calibrate", "--trace", SAMPLE_TRACE, "--sequences", "0:4",
                       "--out", profile, "--cooccurrence", "--model-id", "sample")
    assert code == 0 and "512 tokens of 4 sequences" in out
    loaded = load_profile(profile)
    assert (loaded.num_layers, loaded.num_tokens, loaded.model_id) == (8, 512, "sample")
    assert loaded.cooccurrence.shape == (7, 128, 128)

    code, out, _ = run(capsys, "simulate", "--trace", SAMPLE_TRACE, "--sequences", "4:8",
                       "--profile", profile, "--resident", "25%,50%", "--batch", "1,16",
                       "--json")
    assert code == 0
    records = json.loads(out)
    assert len(records) == len(POLICIES) * 2 * 2
    for r in records:
        assert {"policy", "resident", "batch", "hit_rate",
                "offloaded_reads_per_step_per_layer", "readvised_experts_per_token"} <= set(r)
        assert r["resident"] in (32, 64) and r["batch"] in (1, 16)
        assert 0 <= r["hit_rate"] <= 1


def test_simulate_without_profile_prints_a_table_with_the_step_floor(capsys):
    code, out, _ = run(capsys, "simulate", "--trace", SAMPLE_TRACE, "--resident", "64",
                       "--model-shape", "qwen3-30b-a3b", "--pcie-gbps", "25")
    assert code == 0
    lines = out.splitlines()
    assert "1024 tokens in 8 sequences" in lines[0]
    assert "floor overlapped ms" in lines[1]
    policies = [line.split("|")[1].strip() for line in lines[3:]]
    assert policies == ["first_n", "oracle", "adaptive", "lru", "freq_lru", "lfu", "belady"]


def test_simulate_slot_caches_with_prefetch_modes(tmp_path, capsys):
    profile = tmp_path / "p.json"
    assert run(capsys, "calibrate", "--trace", SAMPLE_TRACE, "--sequences", "0:4", "--out",
               profile, "--cooccurrence")[0] == 0
    code, out, _ = run(capsys, "simulate", "--trace", SAMPLE_TRACE, "--sequences", "4:8",
                       "--profile", profile, "--resident", "25%", "--slots", "0,8",
                       "--prefetch", "none,frequency,speculative", "--prefetch-experts", "2",
                       "--model-shape", "qwen3-30b-a3b", "--json")
    assert code == 0
    records = json.loads(out)
    # Default policies with slots: the static ones.
    assert [(r["policy"], r["slots"], r["prefetch"]) for r in records] == [
        (p, s, m) for p in ("first_n", "frequency", "global", "oracle")
        for s, m in ((0, "none"), (8, "none"), (8, "frequency"), (8, "speculative"))]
    for r in records:
        assert {"slot_hit_rate", "prefetch_copies_per_step_per_layer", "prefetch_precision",
                "prefetch_recall", "pcie_bytes_per_token", "step_floor_overlapped_ms"} <= set(r)
    for no_cache, fill_on_read in zip(records[::4], records[1::4], strict=True):
        # Slots only add HBM hits to the same residency.
        assert fill_on_read["hit_rate"] >= no_cache["hit_rate"]
    spec = records[3]
    assert spec["cooccurrence"] == "profile" and spec["prefetch_experts"] == 2
    assert 0 <= spec["prefetch_precision"] <= 1 and 0 <= spec["prefetch_recall"] <= 1
    code, out, _ = run(capsys, "simulate", "--trace", SAMPLE_TRACE, "--resident", "32",
                       "--slots", "16", "--prefetch", "speculative")
    assert code == 0 and "| slots | prefetch |" in out and "speculative" in out


def test_simulate_with_explicit_expert_sizes(capsys):
    code, out, _ = run(capsys, "simulate", "--trace", SAMPLE_TRACE, "--resident", "32",
                       "--policies", "oracle", "--hidden-size", "2048",
                       "--moe-intermediate-size", "768", "--json")
    assert code == 0
    record = json.loads(out)[0]
    assert record["step_floor_serial_ms"] >= record["step_floor_overlapped_ms"] > 0


def test_plan_prints_the_split_and_expectations(dsv2_trace, tmp_path, capsys):
    profile = tmp_path / "p.json"
    assert run(capsys, "calibrate", "--trace", dsv2_trace, "--out", profile)[0] == 0
    code, out, _ = run(capsys, "plan", "--profile", profile, "--model-shape", "deepseek-v2-lite",
                       "--gpu-budget-gb", "10")
    assert code == 0
    assert "10 GB holds 577 of 1664 experts" in out
    assert "global split: expected hit rate" in out and "even split" in out
    code, out, _ = run(capsys, "plan", "--profile", profile, "--model-shape", "deepseek-v2-lite",
                       "--gpu-budget-gb", "10", "--min-per-layer", "8", "--json")
    result = json.loads(out)
    assert sum(result["global"]["per_layer"]) == 577 and min(result["global"]["per_layer"]) >= 8


@pytest.mark.parametrize("command", ["calibrate", "simulate", "plan"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and command in capsys.readouterr().out


def bad_profile(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"format": "moe-uvm-profile", "version": 1, "num_la')
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calibrate", "--trace", "{tmp}/missing.npz", "--out", "{tmp}/p.json"], "no such file"),
        (["calibrate", "--trace", SAMPLE_TRACE, "--sequences", "9:12", "--out", "{tmp}/p.json"],
         "go past the trace's 8 sequences"),
        (["calibrate", "--trace", SAMPLE_TRACE, "--sequences", "3", "--out", "{tmp}/p.json"],
         "FIRST:STOP"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "200"], "outside [0, 128]"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--policies", "fifo"],
         "unknown policies"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--policies", "frequency"],
         "need a profile"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--profile", "{bad}"],
         "not valid JSON"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--profile", "{dsv2}"],
         "the model has 8 x 128"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--batch", "x"], "--batch"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--hidden-size", "64"],
         "--moe-intermediate-size"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--model-shape", "gpt-5"],
         "unknown model shape"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--model-shape", "mixtral-8x7b"],
         "has 8 experts, top-2"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--pcie-gbps", "0"],
         "bandwidths must be > 0"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--slots", "8",
          "--prefetch", "lookahead"], "hidden states"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--prefetch", "speculative"],
         "needs slots > 0"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--slots", "x"], "--slots"),
        (["simulate", "--trace", SAMPLE_TRACE, "--resident", "8", "--slots", "8",
          "--policies", "adaptive"], "static residency"),
        (["plan", "--profile", "{dsv2}", "--model-shape", "qwen3-30b-a3b", "--gpu-budget-gb", "1"],
         "the model has 48 x 128"),
        (["plan", "--profile", "{dsv2}", "--model-shape", "deepseek-v2-lite",
          "--gpu-budget-gb", "-1"], "must be a finite number of GB > 0"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(argv, message, dsv2_trace, tmp_path, capsys):
    dsv2_profile = tmp_path / "dsv2.json"
    assert run(capsys, "calibrate", "--trace", dsv2_trace, "--out", dsv2_profile)[0] == 0
    subs = {"{tmp}": str(tmp_path), "{bad}": str(bad_profile(tmp_path)),
            "{dsv2}": str(dsv2_profile)}
    argv = [str(a) for a in argv]
    for key, value in subs.items():
        argv = [a.replace(key, value) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moe_uvm", "simulate", "--trace", str(tmp_path / "no.npz"),
         "--resident", "8"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
