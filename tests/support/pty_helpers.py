"""Running the CLI with real terminals, files and pipes on its stdout and stderr.

``run_attached(args, stdout="tty", stderr="tty")`` starts ``python -m convnext_cli`` with
each stream a pseudo-terminal (``os.openpty``), a regular file or a pipe (``"same"`` for
stderr: the stdout terminal itself), drains them all and returns what each received.
``screen(data)`` replays terminal output on a small emulator (carriage return, line feed,
cursor up, erase line, colours ignored) and returns the lines a person would see at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Attached:
    returncode: int
    stdout: bytes
    stderr: bytes
    kinds: tuple[str, str] = field(default=("", ""))


def _drain(fd: int, sink: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        sink.append(chunk)


def _terminal(columns: int = 120, rows: int = 40) -> tuple[int, int]:
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return master, slave


def run_attached(
    args: Sequence[object],
    stdout: str = "tty",
    stderr: str = "tty",
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    columns: int = 120,
    cwd: str | os.PathLike[str] | None = None,
) -> Attached:
    """Run the CLI; ``stdout`` is tty|file|pipe, ``stderr`` is tty|file|pipe|same.

    Terminals are ``columns`` wide (and ``COLUMNS`` says so too)."""
    cleanup: list[int] = []
    readers: list[tuple[int, list[bytes]]] = []
    files: dict[str, tempfile._TemporaryFileWrapper] = {}

    def attach(kind: str, name: str) -> int:
        if kind == "tty":
            master, slave = _terminal(columns)
            readers.append((master, sinks[name]))
            cleanup.append(slave)
            return slave
        if kind == "pipe":
            read_end, write_end = os.pipe()
            readers.append((read_end, sinks[name]))
            cleanup.append(write_end)
            return write_end
        if kind == "file":
            files[name] = tempfile.NamedTemporaryFile()
            return files[name].fileno()
        raise ValueError(kind)

    sinks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    out_fd = attach(stdout, "stdout")
    err_fd = out_fd if stderr == "same" else attach(stderr, "stderr")
    proc = subprocess.Popen(
        [sys.executable, "-m", "convnext_cli", *map(str, args)],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=out_fd,
        stderr=err_fd,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), **(env or {})},
        cwd=cwd,
        start_new_session=True,  # the terminal may become its controlling terminal
    )
    for fd in cleanup:  # only the child holds the writing ends now
        os.close(fd)
    threads = [threading.Thread(target=_drain, args=r, daemon=True) for r in readers]
    for thread in threads:
        thread.start()
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    for thread in threads:
        thread.join(timeout=30)
    for fd, _sink in readers:
        os.close(fd)
    for name, handle in files.items():
        handle.seek(0)
        sinks[name].append(handle.read())
        handle.close()
    return Attached(
        proc.returncode, b"".join(sinks["stdout"]), b"".join(sinks["stderr"]), (stdout, stderr)
    )


_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def screen(data: bytes) -> list[str]:
    """The lines left on a terminal after ``data`` (enough of VT100 for rich's live display)."""
    text = data.decode("utf-8", "replace")
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(text):
        ch = text[i]
        match = _CSI.match(text, i) if ch == "\x1b" else None
        if match:
            arg, op = match.groups()
            n = int(arg) if arg.isdigit() else 1
            if op == "A":
                row = max(0, row - n)
            elif op == "B":
                row += n
            elif op == "G":
                col = max(0, n - 1)
            elif op == "K":
                line = lines[row]
                if arg in ("", "0"):
                    del line[col:]
                elif arg == "2":
                    line.clear()
            i = match.end()
            continue
        if ch == "\x1b":  # another escape (e.g. ESC ] title ... BEL): skip to its end
            end = text.find("\x07", i)
            i = end + 1 if end != -1 else i + 1
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            col = 0
        elif ch >= " ":
            while len(lines) <= row:
                lines.append([])
            line = lines[row]
            while len(line) < col:
                line.append(" ")
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        while len(lines) <= row:
            lines.append([])
        i += 1
    return ["".join(line).rstrip() for line in lines]


def json_lines(data: bytes) -> list[str]:
    """Lines of a stream (terminal CR LF or LF) that look like JSON records."""
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")
    return [line for line in text.split("\n") if line.startswith("{")]
