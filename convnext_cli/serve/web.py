"""``convnext serve --http ADDR``: the server's models over HTTP, for programs in other
languages.

``POST /v1/classify`` and ``POST /v1/embed`` take an image's bytes as the body (at most the
run's file size limit) and answer the JSON record a run writes for it (``path`` is
``upload``); the query string takes ``model``, ``top_k``, ``scores`` (classify) and
``normalize`` (embed); the model runs with the default device, dtype and decoder.  Every
request needs ``Authorization: Bearer TOKEN``, the token the server wrote (mode 0600) beside
its socket.  The body is written to a private file and read, decoded and run as a file
input is (the same readers, limits and decode guard process).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import os
import secrets
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from convnext_cli.errors import UsageError, one_line
from convnext_cli.reading import max_file_bytes

TOKEN_NAME = "http.token"
ROUTES = {"/v1/classify": "classify", "/v1/embed": "embed"}


STRANGER_BODY_BYTES = 1024**2  # a request without the token: at most this much is read


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--http {text!r}: use HOST:PORT, e.g. 127.0.0.1:8765")
    return host, int(port)


def exposure(host: str) -> str | None:
    """What listening on ``host`` exposes, when it is more than this machine."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        if host == "localhost":
            return None
    return (
        f"warning: --http {host}: the models are reachable from other machines on that "
        "network by anyone with the token; use 127.0.0.1 to keep them on this machine"
    )


def write_token(folder: Path) -> tuple[Path, str]:
    """A fresh random token in ``folder/http.token``, mode 0600."""
    token = secrets.token_urlsafe(32)
    path = folder / TOKEN_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return path, token


Runner = Callable[[str, str, dict[str, list[str]]], str]  # (command, file, query) -> record


def handler(
    token: str, run: Runner, log: Callable[[str], None], uploads: Path
) -> type[BaseHTTPRequestHandler]:
    """The request handler: a bearer token checked before the body is read, image bytes
    written to a private temporary file, ``run`` answering its record."""

    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # seconds for a slow client's request line, headers and body

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request, below

        def do_POST(self) -> None:  # noqa: N802  # http.server's name
            status, body = self._answer()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            log(f"http {self.path.split('?')[0][:60]} {status}")

        def do_GET(self) -> None:  # noqa: N802
            self.send_error(405, "POST an image to /v1/classify or /v1/embed")

        def _answer(self) -> tuple[int, bytes]:
            length = self.headers.get("Content-Length", "")
            if not length.isdigit() or not 0 < int(length) <= max_file_bytes():
                self.close_connection = True
                return 413, b'{"error": "the body must be an image of at most the size limit"}'
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                if int(length) <= STRANGER_BODY_BYTES:  # drained, so the 401 reaches them
                    self.rfile.read(int(length))
                else:  # a large body is never read for a stranger: the connection closes
                    self.close_connection = True
                return 401, b'{"error": "a bearer token is needed (see the http.token file)"}'
            data = self.rfile.read(int(length))
            url = urlsplit(self.path)
            command = ROUTES.get(url.path)
            if command is None:
                return 404, b'{"error": "POST to /v1/classify or /v1/embed"}'
            fd, name = tempfile.mkstemp(dir=uploads)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                record = run(command, name, parse_qs(url.query, max_num_fields=8))
            except Exception as exc:  # a bad model or option: said, the server goes on
                return 400, json.dumps({"error": one_line(exc)}).encode()
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(name)
            return 200, record.encode()

    return Handler


def start(
    address: str, folder: Path, run: Runner, log: Callable[[str], None]
) -> ThreadingHTTPServer:
    """Listen on ``address`` in a thread; ``run`` answers each request's record."""
    host, port = parse_address(address)
    warning = exposure(host)
    if warning:
        log(warning)
    token_path, token = write_token(folder)
    uploads = Path(tempfile.mkdtemp(prefix="convnext-http-"))  # 0700, this user's
    Handler = handler(token, run, log, uploads)
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    bound_host, bound_port = server.server_address[:2]
    shown = bound_host.decode() if isinstance(bound_host, bytes) else bound_host
    log(f"http on {shown}:{bound_port}; token in {token_path}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
