"""numgpt.console: the scripts' streams name themselves when a write fails, then go quiet; counts
agree with their nouns."""

import errno
import io
import os
import sys

import pytest

from numgpt.console import NamedStream, counted, standard_streams


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("name", ["standard output", "standard error"])
def test_a_failed_write_names_the_stream_then_writes_go_to_devnull(name):
    """`> /dev/full`: the error names the stream, in words; the stream's file then becomes
    os.devnull (so the flush at exit succeeds) and no descriptor is left open by the switch."""
    fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else None
    with open("/dev/full", "w") as full:
        stream = NamedStream(full, name)
        stream.write("a story\n")                  # buffered: the failure comes at the flush
        with pytest.raises(OSError) as failed:
            stream.flush()
        assert failed.value.errno == errno.ENOSPC
        assert failed.value.strerror == f"cannot write to the {name}: No space left on device"
        stream.write("more\n")
        stream.flush()                             # now os.devnull: the unwritten text goes there
        assert os.path.samefile(f"/proc/self/fd/{full.fileno()}", os.devnull)
    if fds is not None:
        assert os.listdir("/proc/self/fd") == fds


class FullStream(io.StringIO):
    """A text stream with no file behind it whose every write fails as a full disk's does."""

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_streams_named_once_are_not_named_again(monkeypatch):
    """main() run twice in one process (as the tests do) finds its own NamedStreams installed: it
    names the streams beneath them, so a failed write says which stream once, not twice."""
    monkeypatch.setattr(sys, "stdout", NamedStream(FullStream(), "standard output"))
    monkeypatch.setattr(sys, "stderr", NamedStream(io.StringIO(), "standard error"))
    stdout, stderr = standard_streams()
    assert not isinstance(stdout.stream, NamedStream) and not isinstance(stderr.stream, NamedStream)
    with pytest.raises(OSError) as failed:
        stdout.write("a story")
    assert failed.value.strerror == "cannot write to the standard output: No space left on device"


def test_each_line_reaches_a_file_as_it_ends(monkeypatch):
    """stdout to a file is block-buffered by Python: `python train.py > train.log` would show no
    step for minutes, and a kill would lose them. The scripts' streams write each line at once."""
    written = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(written, encoding="utf-8"))
    stdout, _ = standard_streams()
    stdout.write("step 0: loss 10.8\n")
    assert written.getvalue() == b"step 0: loss 10.8\n"


def test_a_count_agrees_with_its_noun():
    assert [counted(n, "layer") for n in (0, 1, 2)] == ["0 layers", "1 layer", "2 layers"]
    assert counted(50257, "token") == "50,257 tokens"
