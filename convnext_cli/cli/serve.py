"""`convnext serve`: a resident process that keeps models loaded; classify and embed use it
by themselves when it runs (see :mod:`convnext_cli.serve`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Annotated, Any

import typer

from convnext_cli.cli.errors import say
from convnext_cli.errors import UsageError

DEFAULT_IDLE = "15m"
DEFAULT_MEMORY = "4G"
START_SECONDS = 120.0  # --detach waits this long for the server to answer
_DURATION = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,3})?)([smh]?)")
_SIZE = re.compile(r"([0-9]{1,12})([kmgt]?)i?b?")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h`` -> seconds; ``0``: never."""
    found = _DURATION.fullmatch(text.strip().lower())
    if not found:
        raise typer.BadParameter(f"{text!r}: seconds, or a number with s, m or h (0: never)")
    return float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[found.group(2)]


def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``2GiB`` -> bytes."""
    found = _SIZE.fullmatch(text.strip().lower())
    if not found:
        raise typer.BadParameter(f"{text!r}: bytes, or a number with K, M, G or T")
    return int(found.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[found.group(2)]


def _flag(name: str, text: str) -> Any:
    return typer.Option(name, metavar="", help=text)


ModelsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        "-m",
        metavar="MODEL",
        help="Load MODEL at start (repeat for several); any other is loaded on first use.",
    ),
]
IdleOpt = Annotated[
    str,
    typer.Option(
        "--idle-timeout",
        metavar="T",
        help="Exit after T with no request: seconds, or 90s, 15m, 2h; 0: never.",
    ),
]
MemoryOpt = Annotated[
    str,
    typer.Option(
        "--max-memory",
        metavar="SIZE",
        help="Models kept beyond SIZE (4G, 512M) drop the least recently used.",
    ),
]
HttpOpt = Annotated[
    str | None,
    typer.Option(
        "--http",
        metavar="HOST:PORT",
        help="Also serve POST /v1/classify and /v1/embed (image bytes in, the JSON record "
        "out) on HOST:PORT, with a bearer token written beside the socket (0600).",
    ),
]
DetachOpt = Annotated[bool, _flag("--detach", "Start the server in the background.")]
StatusOpt = Annotated[bool, _flag("--status", "Say whether a server runs, and what it holds.")]
StopOpt = Annotated[bool, _flag("--stop", "Stop the running server (requests in flight finish).")]


def serve(
    model: ModelsOpt = None,
    idle_timeout: IdleOpt = DEFAULT_IDLE,
    max_memory: MemoryOpt = DEFAULT_MEMORY,
    http: HttpOpt = None,
    detach: DetachOpt = False,
    status: StatusOpt = False,
    stop: StopOpt = False,
) -> None:
    """Keep models loaded, so that a repeated classify or embed starts in a fraction of a
    second: they use the server by themselves when it can do exactly what was asked (the
    summary says so); --no-server or CONVNEXT_SERVER=0 runs in-process.

    Listens on a Unix socket in $XDG_RUNTIME_DIR/convnext/ (else a private folder in the
    temp folder), served to this user only; one line per request on stderr.

    Examples:
      $ convnext serve --detach -m facebook/convnext-tiny-224
      $ convnext classify cat.jpg
      $ convnext serve --status
      $ convnext serve --stop
      $ convnext serve -m ./convnext-tiny --http 127.0.0.1:8765
    """
    if sum((detach, status, stop)) > 1:
        raise UsageError("--detach, --status and --stop: one at a time")
    from convnext_cli.serve.client import model_reference

    seconds = parse_duration(idle_timeout)
    budget = parse_size(max_memory)
    model = [model_reference(m) for m in model or []]  # keyed as the clients send them
    if status:
        raise typer.Exit(show_status())
    if stop:
        raise typer.Exit(stop_server())
    if http is not None:
        from convnext_cli.serve.web import parse_address

        parse_address(http)  # a usage error before anything starts
    if detach:
        raise typer.Exit(start_detached(model, idle_timeout, max_memory, http))
    from convnext_cli.serve.server import run_server

    raise typer.Exit(run_server(seconds, budget, model, http=http))


def _ask(message: dict[str, Any]) -> dict[str, Any] | None:
    from convnext_cli.serve.client import ServerGone, connect

    conn = connect()
    if conn is None:
        return None
    try:
        return conn.request(message)
    except ServerGone:
        return None
    finally:
        conn.close()


def show_status() -> int:
    """The server's pid, socket, uptime and models on stdout; exit 1 when none runs."""
    from convnext_cli.serve.paths import socket_path

    answer = _ask({"op": "status"})
    if answer is None or not isinstance(answer.get("status"), dict):
        print(f"no convnext server running ({socket_path()})")
        return 1
    info = answer["status"]
    idle = info.get("idle_timeout") or 0
    print(
        f"convnext server running: pid {info.get('pid')}, up {info.get('uptime')} s, "
        f"{info.get('requests')} requests, idle timeout {f'{idle:g} s' if idle else 'none'}"
    )
    print(f"socket: {info.get('socket')}")
    models = info.get("models") or []
    print(f"models loaded: {', '.join(map(str, models)) if models else 'none'}")
    return 0


def stop_server() -> int:
    """Ask the server to stop and wait until its socket is gone."""
    from convnext_cli.serve.paths import socket_path

    path = socket_path()
    if _ask({"op": "stop"}) is None:
        say(f"no convnext server running ({path})")
        return 0
    deadline = time.monotonic() + 70
    while os.path.lexists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    say("convnext server stopped")
    return 0


def start_detached(models: list[str], idle: str, memory: str, http: str | None) -> int:
    """``convnext serve`` in a new session, its log in the runtime folder; returns once it
    answers (0) or has failed (2, with its last log line)."""
    from convnext_cli.serve.paths import LOG_NAME, private_folder

    log_path = private_folder() / LOG_NAME
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    command = [sys.executable, "-m", "convnext_cli", "serve", "--idle-timeout", idle]
    command += ["--max-memory", memory, *(f"--model={m}" for m in models)]
    command += [] if http is None else [f"--http={http}"]
    started = os.stat(log_path).st_size
    with os.fdopen(log, "ab") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        answer = _ask({"op": "status"})
        if answer is not None and answer.get("status", {}).get("pid") == process.pid:
            say(f"convnext server started (pid {process.pid}); log: {log_path}")
            return 0
        if process.poll() is not None:
            with open(log_path, "rb") as written:
                written.seek(started)
                lines = written.read().decode(errors="replace").strip().splitlines()
            say(lines[-1] if lines else f"error: the server exited with {process.returncode}")
            return 2
        time.sleep(0.05)
    say(f"error: the server did not answer within {START_SECONDS:g} s; log: {log_path}")
    return 2
