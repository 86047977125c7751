"""The runtime-safety benchmark scripts (benchmarks/readvise_latency.py, benchmarks/soak.py) on
the CPU: they import, parse their arguments, refuse bad ones, and refuse to run without CUDA."""

import importlib.util
import pathlib

import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"
SCRIPTS = ["readvise_latency", "soak"]


@pytest.fixture(params=SCRIPTS)
def script(request, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # soak.py imports its sibling, as when run
    spec = importlib.util.spec_from_file_location(request.param, BENCHMARKS / f"{request.param}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_exits_zero(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    assert "--layers" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "10"], "--steps: must be >= 1000, got 10"),
        (["--layers", "0"], "--layers: must be >= 1, got 0"),
        (["--layers", "two"], "expected an integer, got 'two'"),
        (["--resident", "40"], "must fit in 64 experts"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_are_refused_with_exit_code_2(script, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_without_cuda_refuses_in_one_line_with_exit_code_2(script, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        script.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"{script.__name__}.py needs a CUDA GPU"


def test_results_go_to_the_gpus_folder():
    spec = importlib.util.spec_from_file_location("rl", BENCHMARKS / "readvise_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.device_folder("NVIDIA H200") == "h200"
    assert module.device_folder("NVIDIA H100 80GB HBM3") == "h100"
