"""The library examples a learner copies first run as written: README's "The library" block, the
usage examples in numgpt's and numgpt.data's docstrings, and DEVELOPERS.md's gradient check of a
layer of one's own."""

import re
import sys
import textwrap
from pathlib import Path

import pytest

import numgpt
import numgpt.data

ROOT = Path(__file__).resolve().parent.parent


def readme_library_block():
    """The python code block under README's '## The library' heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## The library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def docstring_example(module):
    """The first indented block of a module's docstring: its usage example."""
    block = re.search(r"\n\n((?:    .*\n)+)", module.__doc__).group(1)
    return textwrap.dedent(block)


@pytest.mark.parametrize("name, code", [
    ("README", readme_library_block()),
    ("numgpt", docstring_example(numgpt)),
    ("numgpt.data", docstring_example(numgpt.data)),
])
def test_the_documented_library_examples_run_as_written(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # they write my-gpt/ and data_cache/ where they run
    exec(compile(code, f"<{name} example>", "exec"), {})


def test_the_developers_gradient_check_example_passes_and_catches_its_wrong_backward(monkeypatch, capsys):
    """DEVELOPERS.md's example runs from the repository root, as it says, and prints what its comments
    say: no mismatch for layernorm's backward, a mismatch of b for the halved bias gradient."""
    text = (ROOT / "DEVELOPERS.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?layer_mismatches.*?)```", text, re.DOTALL).group(1)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.path", list(sys.path))   # the example puts tests/ on it
    exec(compile(code, "<DEVELOPERS.md example>", "exec"), {})
    right, wrong = capsys.readouterr().out.splitlines()
    assert right == "{}"
    assert wrong.startswith("{'b': ")
