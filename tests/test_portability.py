"""What numgpt does on macOS and Windows, as far as Linux can show it: text files read and written
in UTF-8 whatever the locale (Windows' is cp1252), commands printed for the user's own shell."""

import ast
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted((ROOT / "numgpt").rglob("*.py")) + [ROOT / "train.py", ROOT / "sample.py"]
TEXT_CALLS = ("open", "read_text", "write_text")


def text_opened_in_the_locales_encoding(path):
    """The lines of `path` that open a file as text without naming its encoding: open() in a text
    mode, Path.read_text or Path.write_text without encoding=. (os.open makes a descriptor, not text.)"""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name not in TEXT_CALLS or any(k.arg == "encoding" for k in node.keywords):
            continue
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "os":
            continue
        if name == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                  None)
            if isinstance(mode, ast.Constant) and "b" in mode.value:
                continue
        yield node.lineno


def test_every_text_file_is_opened_with_its_encoding():
    """Without encoding=, Python reads and writes text in the locale's encoding: cp1252 on an
    English Windows, where UTF-8 text turns into mojibake or a UnicodeDecodeError (numgpt.kernels
    read its CUDA source that way at import, so one non-ASCII character in a .cu comment would have
    broken `import numgpt` there). `python -X warn_default_encoding` shows the same at run time."""
    found = [f"{path.relative_to(ROOT)}:{line}"
             for path in PRODUCT for line in text_opened_in_the_locales_encoding(path)]
    assert found == []


@pytest.mark.parametrize("os_name, out_dir, word", [
    ("posix", "runs/my run", "'runs/my run'"),
    ("posix", "out", "out"),
    ("nt", r"C:\Users\Jo Doe\runs\a", r'"C:\Users\Jo Doe\runs\a"'),
    ("nt", r"runs\a", r"runs\a"),
])
def test_the_resume_command_is_quoted_for_the_shell_of_the_system(monkeypatch, os_name, out_dir, word):
    """The command a stopped run prints, to be pasted back: cmd.exe takes 'C:\\...' with its single
    quotes as part of the path (and shlex.quote quoted every path with a backslash)."""
    trainer = SimpleNamespace(checkpoint_step=5, cfg=SimpleNamespace(max_iters=10, out_dir=out_dir),
                              comm=SimpleNamespace(size=1))
    with monkeypatch.context() as system:   # undone before pytest reports: its pathlib reads os.name
        system.setattr(os, "name", os_name)
        hint = train.resume_hint(trainer)
    assert hint == f" Continue with: python train.py --resume --out-dir {word}"


def test_the_ram_of_a_windows_machine_is_read_through_kernel32(monkeypatch):
    """Windows has no os.sysconf, so the check of a run's settings against the machine's RAM used
    to be skipped there: GlobalMemoryStatusEx, through ctypes, tells it instead."""
    import ctypes

    import numpy as np

    from numgpt.backend import memory_size

    def global_memory_status_ex(status):
        assert status._obj.dwLength == ctypes.sizeof(status._obj) == 64   # as the call requires
        status._obj.ullTotalPhys = 16 * 2**30
        return 1

    windll = SimpleNamespace(kernel32=SimpleNamespace(GlobalMemoryStatusEx=global_memory_status_ex))
    monkeypatch.setattr(ctypes, "windll", windll, raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delattr(os, "sysconf")
    assert memory_size(np) == 16 * 2**30
    windll.kernel32.GlobalMemoryStatusEx = lambda status: 0   # the call failed: no size, no check
    assert memory_size(np) is None
