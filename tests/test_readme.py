"""README.md stays true: its ```python examples run on CPU (except those marked as needing a GPU
or a user's checkpoint), every repository path it names exists, it points at nothing outside the
repository, and its quick start holds the test command that .ci/run executes."""

import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
# A ```python block runs unless the line before it is `<!-- not run: why -->`.
BLOCKS = re.findall(r"^(<!-- not run: .*? -->\n)?```python\n(.*?)^```", TEXT, flags=re.S | re.M)
EXAMPLES = [code for marker, code in BLOCKS if not marker]
TOP_LEVEL = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith(".git"))


def test_readme_has_runnable_examples():
    assert EXAMPLES, "README.md has no runnable ```python example"


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, capsys):
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {})
    assert "moe-uvm:" in capsys.readouterr().out  # the manager's summary line


def test_every_repository_path_the_readme_names_exists():
    tops = "|".join(re.escape(name) for name in TOP_LEVEL)
    named = set(re.findall(rf"(?<![\w./-])((?:{tops})/[\w./-]*[\w/])", TEXT))
    assert named, "expected the README to name repository paths"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_readme_points_at_nothing_outside_the_repository():
    for outside in ("../", "TRACES.md", "ARCHITECTURE.md", "STYLE.md", "the seed"):
        assert outside not in TEXT, f"README.md mentions {outside!r}"


def test_quick_start_runs_the_ci_test_command():
    marked = re.findall(r"^<!-- test-command: (.*) -->$", TEXT, flags=re.M)
    assert len(marked) == 1
    quick_start = re.search(r"^```bash\n(.*?)^```", TEXT, flags=re.S | re.M).group(1)
    assert marked[0] in quick_start
    assert "moe-uvm bench" in quick_start.splitlines()[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "quick_start" in ci and "test-command" in ci  # .ci/run reads both from the README


def test_the_shipped_data_walkthrough_runs(tmp_path, monkeypatch, capsys):
    from moe_uvm import cli

    blocks = re.findall(r"^```bash\n(.*?)^```", TEXT, flags=re.S | re.M)
    walkthrough = [b for b in blocks if "--trace sample" in b]
    assert walkthrough, "the README shows no walkthrough on the bundled trace"
    monkeypatch.chdir(tmp_path)
    for line in walkthrough[0].strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "moe-uvm"
        assert cli.main(argv[1:]) == 0, f"README line failed: {line}\n{capsys.readouterr().err}"
