"""README.md stays true: its ```python examples run (```py ones need a checkpoint and are only
shown), and the quick start names the test command that .ci/run executes."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
EXAMPLES = re.findall(r"^```python\n(.*?)^```", TEXT, flags=re.S | re.M)


def test_readme_has_runnable_examples():
    assert EXAMPLES, "README.md has no ```python example"


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, capsys):
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {})
    assert "moe-uvm:" in capsys.readouterr().out  # the manager's summary line


def test_quick_start_runs_the_ci_test_command():
    marked = re.findall(r"^<!-- test-command: (.*) -->$", TEXT, flags=re.M)
    assert len(marked) == 1
    quick_start = re.search(r"^```bash\n(.*?)^```", TEXT, flags=re.S | re.M).group(1)
    assert marked[0] in quick_start
    assert "moe-uvm bench" in quick_start.splitlines()[0]
