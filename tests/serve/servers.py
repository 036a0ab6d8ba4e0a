"""Starting and stopping real `convnext serve` processes for the tests in this folder, each
in a runtime folder of its own (XDG_RUNTIME_DIR), always killed at the end."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers import cli_env

START_SECONDS = 180.0


def runtime_env(folder: Path, **extra: str) -> dict[str, str]:
    """The CLI's environment with XDG_RUNTIME_DIR = ``folder`` (created 0700)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    env = cli_env(XDG_RUNTIME_DIR=str(folder), COLUMNS="120", **extra)
    env.pop("CONVNEXT_SERVER", None)
    return env


def socket_of(env: dict[str, str]) -> Path:
    return Path(env["XDG_RUNTIME_DIR"]) / "convnext" / "server.sock"


class Server:
    """A `convnext serve` subprocess with its log file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.env = env
        self.log_path = log
        self.out = open(log, "ab")  # noqa: SIM115  # closed in stop()
        command = [sys.executable, "-m", "convnext_cli", "serve", *args]
        self.proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.out
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, count: int = 1, timeout: float = START_SECONDS) -> None:
        """Until the log says ``text`` ``count`` times (the server must stay up)."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the server's log:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        self.out.close()


def start(tmp: Path, env: dict[str, str], *args: str, models: int = 0) -> Server:
    """A server started and listening (and its ``models`` preloaded)."""
    server = Server(env, tmp / f"server-{time.monotonic_ns()}.log", *args)
    try:
        server.wait_for("listening on")
        if models:
            server.wait_for("loaded ", models)
    except BaseException:
        server.stop()
        raise
    return server


def convnext(
    *args: object, env: dict[str, str], timeout: float = 300, **run: Any
) -> subprocess.CompletedProcess[bytes]:
    """``python -m convnext_cli ARGS`` in a subprocess."""
    command = [sys.executable, "-m", "convnext_cli", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, timeout=timeout, **run)


def raw(env: dict[str, str], timeout: float = 30) -> socket.socket:
    """A plain connection to the server's socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(socket_of(env)))
    return sock


def send_frame(sock: socket.socket, data: bytes, blob: bytes = b"") -> None:
    sock.sendall(struct.pack(">II", len(data), len(blob)) + data + blob)


def read_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame's message, or None when the server closed the connection (reset:
    it closed with the rest of a refused request unread)."""
    try:
        return _frame(sock)
    except ConnectionResetError:
        return None


def _frame(sock: socket.socket) -> dict[str, Any] | None:
    head = b""
    while len(head) < 8:
        chunk = sock.recv(8 - len(head))
        if not chunk:
            return None
        head += chunk
    size, blob = struct.unpack(">II", head)
    data = b""
    while len(data) < size + blob:
        chunk = sock.recv(size + blob - len(data))
        if not chunk:
            return None
        data += chunk
    return json.loads(data[:size])
