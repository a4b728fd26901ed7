"""The scripts' standard output and error: present, tolerant of what a terminal cannot show, and
named in their errors."""

import io
import os
import shlex
import subprocess
import sys


def counted(n, noun):
    """"1 layer", "12 layers", "50,257 tokens": a count and its (regular) noun, agreeing."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def shell_quote(arg):
    """`arg` as the user's shell reads it back as one word, for a command numgpt prints to be
    copied: a POSIX shell's quoting ('my run'); on Windows, double quotes ("my run"), which cmd.exe
    and PowerShell both read (cmd.exe keeps single quotes as part of the word, and shlex quotes
    every path with a backslash in it)."""
    if os.name == "nt":
        return subprocess.list2cmdline([arg])
    return shlex.quote(arg)


class NamedStream:
    """A text stream whose write errors say which stream failed: "No space left on device" alone
    could as well be a checkpoint's. Everything else is the stream's own."""

    def __init__(self, stream, name):
        self.stream, self.name = stream, name

    def __getattr__(self, attr):   # isatty, fileno, encoding, ... as the stream has them
        return getattr(self.stream, attr)

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            raise self._failed(e) from None

    def flush(self):
        try:
            self.stream.flush()
        except OSError as e:
            raise self._failed(e) from None

    def _failed(self, error):
        """The error to raise, naming the stream (OSError(EPIPE, ...) is a BrokenPipeError). The
        stream's file becomes os.devnull: its unwritten text would fail again in the flush at exit,
        which prints "Exception ignored" after the script's own message."""
        try:
            fd = self.stream.fileno()
        except (OSError, ValueError, io.UnsupportedOperation):   # no file behind it (a test's capture)
            fd = None
        if fd is not None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        return OSError(error.errno, f"cannot write to the {self.name}: {error.strerror}")


def standard_streams():
    """(stdout, stderr) for a script to install as sys.stdout and sys.stderr.

    A stream closed at start (`>&-`, which leaves Python None) becomes os.devnull, so the script
    goes on without those messages instead of failing at the first; a character the terminal's
    encoding lacks (a story's "é" on an ASCII terminal) shows as "?" instead of raising. Each line
    is written as it ends, also to a file or a pipe (`> train.log`, a batch scheduler's log): Python
    would hold ~8 KB of them back, so the log of a run showed nothing for minutes, and lost them to
    a kill."""
    streams = []
    for stream, name in ((sys.stdout, "standard output"), (sys.stderr, "standard error")):
        if isinstance(stream, NamedStream):   # main() run twice in one process, as the tests do
            stream = stream.stream
        stream = stream or open(os.devnull, "w", encoding="utf-8")
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace", line_buffering=True)
        streams.append(NamedStream(stream, name))
    return tuple(streams)
