"""numgpt.console: the scripts' streams name themselves when a write fails, then go quiet; counts
agree with their nouns."""

import errno
import os

import pytest

from numgpt.console import NamedStream, counted


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


def test_a_count_agrees_with_its_noun():
    assert [counted(n, "layer") for n in (0, 1, 2)] == ["0 layers", "1 layer", "2 layers"]
    assert counted(50257, "token") == "50,257 tokens"
