"""`moe-uvm` on bad or empty input: one line on stderr, exit 2, no traceback, nothing written;
and the CLI behaviours around it: the bench simulation honouring its flags, `--trace sample`,
plan on shipped data, results folder, broken pipes, --version and `python -m moe_uvm`."""

import json
import subprocess
import sys

import numpy as np
import pytest

from moe_uvm import cli
from moe_uvm.simulate import CACHE_POLICIES
from moe_uvm.trace import synthetic_trace


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, message):
    assert code == 2 and out == "", out
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """`moe-uvm bench` takes its CPU simulation path, run from an empty directory."""
    monkeypatch.setattr(cli.uvm, "available", lambda: False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def sample_profile(tmp_path, capsys):
    path = tmp_path / "sample.json"
    assert run(capsys, "calibrate", "--trace", "sample", "--out", path)[0] == 0
    return path


def test_bench_simulation_honours_resident_batch_slots_and_prefetch(no_gpu, capsys):
    code, out, _ = run(capsys, "bench", "--resident", "10%", "--batch", "16", "--slots", "32",
                       "--prefetch", "speculative")
    assert code == 0
    records = json.loads((no_gpu / "moe-uvm-results" / "simulation.json").read_text())["records"]
    assert {(r["resident"], r["batch"]) for r in records} == {(13, 16)}
    cached = [r for r in records if r["slots"]]
    assert [(r["policy"], r["slots"], r["prefetch"]) for r in cached] == [
        ("frequency", 32, "speculative")]
    assert "| frequency | 13 | 16 | 32 | speculative |" in out


def test_bench_simulation_honours_trace_shape_and_calibration_split(no_gpu, capsys):
    synthetic_trace(4, 64, 6, num_sequences=4, tokens_per_sequence=8).save(no_gpu / "t.npz")
    code, out, _ = run(capsys, "bench", "--trace", "t.npz", "--model-shape", "deepseek-v2-lite",
                       "--calibrate-sequences", "1", "--resident", "16", "--batch", "1",
                       "--out", "res")
    assert code == 0
    assert "t.npz: 4 layers x 64 experts, calibrated on sequences 0:1, evaluated on 1:4" in out
    assert "whole deepseek-v2-lite (26 MoE layers" in out
    result = json.loads((no_gpu / "res" / "simulation.json").read_text())
    for r in result["records"]:  # caches warm up on at most half the evaluated steps
        assert r["tokens"] == (12 if r["policy"] in CACHE_POLICIES else 24), r


@pytest.mark.parametrize("flag", [["--steps", "3"], ["--methods", "device"], ["--tiny"],
                                  ["--layers", "2"]])
def test_bench_simulation_refuses_gpu_only_flags(no_gpu, capsys, flag):
    assert_one_line_error(*run(capsys, "bench", *flag), f"{flag[0]}: GPU benchmark only")
    assert not (no_gpu / "moe-uvm-results").exists()


@pytest.mark.parametrize("argv, message", [
    (["--trace", "missing.npz"], "trace missing.npz: no such file"),
    (["--model-shape", "bogus"], "unknown model shape 'bogus'"),
    (["--prefetch", "speculative"], "needs slots"),
    (["--slots", "16", "--resident", "0,100%"], "has none"),
    (["--calibrate-sequences", "32"], "allowed 1 to 31"),
    (["--trace", "sample", "--calibrate-sequences", "8"], "allowed 1 to 7"),
])
def test_bench_checks_arguments_before_any_banner_or_output(no_gpu, capsys, argv, message):
    assert_one_line_error(*run(capsys, "bench", *argv), message)
    assert list(no_gpu.iterdir()) == []


def test_bench_out_that_is_a_file_is_refused_before_the_run(no_gpu, capsys):
    (no_gpu / "results").write_text("")
    assert_one_line_error(*run(capsys, "bench", "--out", "results"),
                          "--out results is a file; give a folder")


def test_sample_trace_is_nameable_from_every_command(sample_profile, capsys):
    assert json.loads(sample_profile.read_text())["num_tokens"] == 1024
    code, out, _ = run(capsys, "simulate", "--trace", "sample", "--resident", "8",
                       "--policies", "first_n")
    assert code == 0 and out.startswith("sample: 1024 tokens in 8 sequences")


def test_plan_works_on_a_profile_of_the_bundled_trace(sample_profile, capsys):
    code, out, _ = run(capsys, "plan", "--profile", sample_profile, "--model-shape",
                       "qwen3-30b-a3b", "--gpu-budget-gb", "4")
    assert code == 0
    assert out.splitlines()[0] == (
        "the profile covers 8 MoE layers and qwen3-30b-a3b has 48: planned for the profile's "
        "8 layers with qwen3-30b-a3b's expert size")
    assert "qwen3-30b-a3b: 4 GB holds 423 of 1024 experts (9.0 MiB each)" in out
    code, out, _ = run(capsys, "plan", "--profile", sample_profile, "--hidden-size", "2048",
                       "--moe-intermediate-size", "768", "--weight-bytes", "1",
                       "--gpu-budget-gb", "4", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["bytes_per_expert"] == 3 * 2048 * 768 and result["note"] is None
    assert len(result["global"]["per_layer"]) == 8


@pytest.mark.parametrize("budget", ["-1", "0", "inf", "nan", "lots"])
def test_plan_refuses_budgets_that_are_not_finite_positive_numbers(sample_profile, capsys,
                                                                   budget):
    assert_one_line_error(
        *run(capsys, "plan", "--profile", sample_profile, "--model-shape", "qwen3-30b-a3b",
             "--gpu-budget-gb", budget),
        f"argument --gpu-budget-gb: must be a finite number of GB > 0, got '{budget}'")


@pytest.mark.parametrize("argv, message", [
    ([], "plan needs the expert size"),
    (["--model-shape", "mixtral-8x7b"], "the model has 32 x 8, top-2"),
    (["--model-shape", "qwen3-30b-a3b", "--hidden-size", "64"], "cannot go with it"),
    (["--hidden-size", "64"], "need both --hidden-size and --moe-intermediate-size"),
])
def test_plan_refuses_missing_or_conflicting_expert_sizes(sample_profile, capsys, argv,
                                                          message):
    assert_one_line_error(
        *run(capsys, "plan", "--profile", sample_profile, "--gpu-budget-gb", "4", *argv),
        message)


def write_arrays(path, ids, num_experts=8, starts=None):
    arrays = {"topk_ids": np.asarray(ids, np.int16), "num_experts": np.int32(num_experts),
              "top_k": np.int32(np.shape(ids)[2])}
    if starts is not None:
        arrays["seq_starts"] = np.asarray(starts, np.int32)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize("command", ["calibrate", "simulate"])
@pytest.mark.parametrize("make, message", [
    (lambda p: write_arrays(p, np.zeros((2, 0, 2))), "a trace needs at least one layer and one "
                                                     "token"),
    (lambda p: p.write_bytes(b""), "empty file, not a numpy .npz archive"),
    (lambda p: p.write_text("layer,token,expert\n"), "not a numpy .npz archive"),
    (lambda p: write_arrays(p, [[[1, 2], [3, 3]]]), "layer 0, token 1: expert 3 appears more "
                                                    "than once"),
    (lambda p: write_arrays(p, np.full((2, 4, 2), -1)), "every expert id is -1"),
])
def test_empty_or_broken_traces_are_refused_at_load(tmp_path, capsys, command, make, message):
    trace = tmp_path / "t.npz"
    make(trace)
    out = tmp_path / "p.json"
    extra = ["--out", out] if command == "calibrate" else ["--resident", "1"]
    code, stdout, err = run(capsys, command, "--trace", trace, *extra)
    assert_one_line_error(code, stdout, err, message)
    assert "allow_pickle" not in err and not out.exists()


@pytest.mark.parametrize("command", ["simulate", "plan"])
def test_profiles_without_tokens_are_refused_at_load(sample_profile, capsys, command):
    data = json.loads(sample_profile.read_text())
    data.update(num_tokens=0, counts=[[0] * 128] * 8)
    sample_profile.write_text(json.dumps(data))
    extra = (["--trace", "sample", "--resident", "8"] if command == "simulate"
             else ["--model-shape", "qwen3-30b-a3b", "--gpu-budget-gb", "4"])
    assert_one_line_error(*run(capsys, command, "--profile", sample_profile, *extra),
                          "records 0 tokens and 0 routed experts")


@pytest.mark.parametrize("argv, message", [
    (["--sequences", "0:100"], "sequences 0:100 go past the trace's 8 sequences"),
    (["--slots", "1000"], "at most the trace's 128 experts per layer, got 1000"),
    (["--model-shape", "qwen3-30b-a3b", "--weight-bytes", "1"], "cannot go with it"),
    ([], "the following arguments are required: --resident"),
])
def test_simulate_refuses_what_it_used_to_clamp_or_ignore(capsys, argv, message):
    extra = [] if not argv else ["--resident", "8"]
    assert_one_line_error(*run(capsys, "simulate", "--trace", "sample", *extra, *argv), message)


def test_calibrate_from_a_model_checks_folder_config_and_prompts_first(tmp_path, capsys):
    pytest.importorskip("transformers")
    folder = tmp_path / "ckpt"
    argv = ["calibrate", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "p.json"]
    assert_one_line_error(*run(capsys, *argv, "--model", folder),
                          f"checkpoint {folder}: no such folder")
    folder.mkdir()
    assert_one_line_error(*run(capsys, *argv, "--model", folder), "no config.json")
    (folder / "config.json").write_text("{}")
    assert_one_line_error(*run(capsys, *argv, "--model", folder),
                          f"prompts file {tmp_path / 'p.txt'}: no such file")


@pytest.mark.parametrize("argv, message", [
    (["--trace", "sample", "--max-tokens", "0"], "go with --model"),
    (["--model", ".", "--prompts", "p.txt", "--sequences", "0:2"], "goes with --trace"),
    (["--trace", "sample", "--out", "{tmp}/no/p.json"], "does not exist"),
    (["--trace", "sample", "--out", "{tmp}"], "is a folder; give a file name"),
])
def test_calibrate_refuses_options_it_would_ignore_or_could_not_write(tmp_path, capsys, argv,
                                                                      message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "p.json")]
    assert_one_line_error(*run(capsys, "calibrate", *argv), message)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("command", ["calibrate", "simulate", "plan", "bench"])
def test_help_points_only_at_files_users_have(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    for private in ("TRACES.md", "ARCHITECTURE.md", "../", "shared/", "seed"):
        assert private not in text


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"moe-uvm {__import__('moe_uvm').__version__}\n"


def test_closed_stdout_ends_quietly_with_status_141():
    """`moe-uvm ... | head -1`, through `python -m moe_uvm`: the reader is gone before the
    first write."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_uvm", "simulate", "--trace", "sample", "--resident", "8",
         "--policies", "first_n"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == cli.BROKEN_PIPE and err == b""
