"""The library examples a learner copies first run as written: README's "The library" block and the
usage examples in numgpt's and numgpt.data's docstrings."""

import re
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
