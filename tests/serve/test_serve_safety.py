"""`convnext serve` as a server: only its own user served, hostile and malformed requests
answered with an error (the server goes on), inputs read with the run's safe readers, 16
concurrent clients with mixed models each get their own records, Ctrl-C on a client cancels
its request only, and the client side never imports torch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import (
    Server,
    convnext,
    raw,
    read_frame,
    runtime_env,
    send_frame,
    socket_of,
    start,
)

SERVED = b"(convnext serve, pid "


@pytest.fixture()
def server(tmp_path: Path, v1_checkpoint: Path) -> Iterator[Server]:
    env = runtime_env(tmp_path / "run")
    running = start(tmp_path, env, "--idle-timeout", "300", "-m", str(v1_checkpoint), models=1)
    yield running
    running.stop()


def alive(server: Server) -> bool:
    """The server still answers a status request."""
    sock = raw(server.env)
    with sock:
        send_frame(sock, b'{"op": "status"}')
        answer = read_frame(sock)
    return answer is not None and answer["status"]["pid"] == server.proc.pid


# ---------------------------------------------------------------------------- peers


def _as_other_user(path: str) -> str:
    """In a forked child that drops to uid 65534: connect and read the first answer."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no package code, only the socket
        outcome = "?"
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(20)
            try:
                sock.connect(path)
                data = b'{"op": "status"}'
                try:
                    sock.sendall(len(data).to_bytes(4, "big") + bytes(4) + data)
                except BrokenPipeError:
                    pass  # refused before the request was sent: the answer is waiting
                outcome = "answer:" + sock.recv(65536)[8:].decode(errors="replace")
            except PermissionError:
                outcome = "permission"
            except OSError as exc:
                outcome = f"oserror:{exc}"
        finally:
            os.write(write_end, outcome.encode()[:4000])
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        text = reader.read().decode()
    os.waitpid(pid, 0)
    return text


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_another_user_is_refused(tmp_path, v1_checkpoint):
    # a runtime folder another user could reach (a pytest tmp_path is private to root)
    base = Path(tempfile.mkdtemp(prefix="serve-peer-", dir="/tmp"))
    try:
        env = runtime_env(base / "run")
        server = start(tmp_path, env, "--idle-timeout", "120")
        try:
            path = str(socket_of(env))
            # as made: the folder (0700) and the socket (0600) keep the other user out
            assert _as_other_user(path) == "permission"
            # even with both opened up, the server's peer check refuses the connection
            os.chmod(base, 0o755)
            os.chmod(base / "run", 0o755)
            os.chmod(socket_of(env).parent, 0o755)
            os.chmod(path, 0o666)
            outcome = _as_other_user(path)
            assert outcome.startswith("answer:") and "refused" in outcome, outcome
            assert '"status"' not in outcome
            assert "refused a connection from uid 65534" in server.log()
            # the client refuses a folder open to others too: it runs in-process
            os.chmod(path, 0o600)
            assert alive(server)
        finally:
            server.stop()
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


# ------------------------------------------------------------------------- hostile


def framed(data: bytes, blob: bytes = b"") -> bytes:
    return struct.pack(">II", len(data), len(blob)) + data + blob


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">II", 2**31 - 1, 0),  # a 2 GiB message announced
        framed(b"{}", b"x" * 16),  # a blob, which requests never carry
        framed(b"{oops"),  # not JSON
        framed(b"[]"),  # not an object
        framed(b'{"op": "boom"}'),  # no such request
        framed(b'{"op": "run"}'),  # run before load
    ],
)
def test_malformed_frames_get_an_error(server, frame):
    with raw(server.env) as sock:
        sock.sendall(frame)
        answer = read_frame(sock)
        assert answer is not None and "error" in answer
        assert read_frame(sock) is None  # and the connection is closed
    assert alive(server)


def test_deeply_nested_json_and_bad_fields(server, v1_checkpoint):
    with raw(server.env) as sock:
        send_frame(sock, b"[" * 200_000 + b"]" * 200_000)
        assert "error" in (read_frame(sock) or {})
    loads = [
        {"op": "load", "source": {"model": 5}, "options": {}},
        {"op": "load", "source": {"model": "x", "pickle": "y"}, "options": {}},
        {"op": "load", "source": {"model": "x\u0000y"}, "options": {}},
        {"op": "load", "source": {"model": str(v1_checkpoint)}, "options": {"compile": "yes"}},
        {"op": "load", "source": {"model": "/nonexistent/model"}, "options": {}},
    ]
    for message in loads:
        with raw(server.env) as sock:
            send_frame(sock, json.dumps({**message, "env": _env_key(server)}).encode())
            answer = read_frame(sock)
            assert answer is not None and "error" in answer, message
    assert alive(server)


def _env_key(server: Server) -> str:
    code = "from convnext_cli.serve.protocol import environment_key; print(environment_key())"
    done = subprocess.run([sys.executable, "-c", code], env=server.env, capture_output=True)
    return done.stdout.decode().strip()


def test_bad_run_requests_get_an_error(server, v1_checkpoint, photos):
    key = _env_key(server)
    runs = [
        {"task": {"command": "classify"}, "items": ["relative/path.jpg"], "end": True},
        {"task": {"command": "classify"}, "items": [str(photos[0])] * 5000, "end": True},
        {"task": {"command": "rm -rf"}, "items": [], "end": True},
        {"task": {"command": "classify", "top_k": "x"}, "items": [], "end": True},
        {"task": {"command": "classify", "batch_size": 10**9}, "items": [], "end": True},
        {"task": {"command": "classify"}, "items": [{"id": "x", "offset": "y"}], "end": True},
    ]
    for run in runs:
        with raw(server.env) as sock:
            load = {"op": "load", "source": {"model": str(v1_checkpoint)}, "options": {}}
            send_frame(sock, json.dumps({**load, "env": key}).encode())
            assert "facts" in (read_frame(sock) or {})
            send_frame(sock, json.dumps({"op": "run", "workers": None, **run}).encode())
            answer = read_frame(sock)
            assert answer is not None and "error" in answer, run
    assert alive(server)


def test_fifos_devices_and_loops_are_error_records(server, tmp_path, photos, v1_checkpoint):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    inputs = [photos[0], fifo, "/dev/zero", "/dev/urandom", loop, photos[1]]
    runs = []
    for extra in ([], ["--no-server"]):
        done = convnext("classify", *inputs, "-m", v1_checkpoint, *extra, env=server.env,
                        timeout=120)  # fmt: skip
        assert done.returncode == 1, done.stderr.decode()
        runs.append(done)
    assert SERVED in runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    records = [json.loads(line) for line in runs[0].stdout.splitlines()]
    assert [("error" in r) for r in records] == [False, True, True, True, True, False]
    assert alive(server)


# --------------------------------------------------------------------- concurrency


def test_sixteen_concurrent_clients_with_two_models(
    server, tmp_path, photos, v1_checkpoint, v2_checkpoint
):
    models = [v1_checkpoint, v2_checkpoint]
    wanted = {}
    for model in models:
        cold = convnext("classify", *photos, "-m", model, "-k", "3", "--no-server",
                        env=server.env)  # fmt: skip
        assert cold.returncode == 0
        wanted[model] = cold.stdout
    command = [sys.executable, "-m", "convnext_cli", "classify", *map(str, photos), "-k", "3"]
    clients = [
        subprocess.Popen(
            [*command, "-m", str(models[i % 2])],
            env=server.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(16)
    ]
    for i, client in enumerate(clients):
        out, err = client.communicate(timeout=600)
        assert client.returncode == 0, err.decode()
        assert SERVED in err
        assert out == wanted[models[i % 2]], f"client {i}"
    assert server.log().count("classify 6 inputs") >= 16


def test_ctrl_c_on_a_client_cancels_only_its_request(server, tmp_path, photos, v1_checkpoint):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(200):
        os.symlink(photos[i % len(photos)], folder / f"{i:04d}{photos[i % len(photos)].suffix}")
    client = subprocess.Popen(
        [sys.executable, "-m", "convnext_cli", "classify", str(folder), "-m", str(v1_checkpoint)],
        env=server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert client.stdout is not None
    assert client.stdout.readline()  # its request runs
    client.send_signal(signal.SIGINT)
    _, err = client.communicate(timeout=120)
    assert client.returncode == 130, err.decode()
    server.wait_for("request ended")  # the server dropped that request
    assert server.proc.poll() is None
    done = convnext("classify", *photos, "-m", v1_checkpoint, env=server.env)
    assert done.returncode == 0 and SERVED in done.stderr
    assert len(done.stdout.splitlines()) == len(photos)


# ---------------------------------------------------------------------- light client


CHECK = """
import sys
sys.argv = ["convnext", *sys.argv[1:]]
from convnext_cli.cli import main
main()
"""
HEAVY = {"torch", "torchvision", "PIL", "numpy", "safetensors"}


def test_help_and_a_client_call_import_no_torch(server, tmp_path, photos, v1_checkpoint):
    def modules(*args: object) -> tuple[set[str], subprocess.CompletedProcess[bytes]]:
        """The heavy packages ``convnext ARGS`` imported (``python -X importtime``: main()
        ends the process with os._exit, so it is asked from outside)."""
        command = [sys.executable, "-X", "importtime", "-c", CHECK, *map(str, args)]
        done = subprocess.run(command, env=server.env, capture_output=True, timeout=300)
        names = {
            line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in done.stderr.decode(errors="replace").splitlines()
            if line.startswith("import time:") and line.count("|") == 2
        }
        assert "convnext_cli" in names  # the check sees the imports
        return names & HEAVY, done

    found, done = modules("--help")
    assert done.returncode == 0 and found == set()
    for command in ("classify", "embed"):
        for extra in ([], ["--format", "jsonl"]):  # the short way, and through Typer
            output = tmp_path / "o.jsonl"
            found, done = modules(command, *photos, "-m", v1_checkpoint, "-o", output, *extra)
            assert SERVED in done.stderr, done.stderr.decode()
            assert done.returncode == 0 and found == set()
    found, done = modules("classify", photos[0], "-m", v1_checkpoint, "--no-server")
    assert "torch" in found  # the check can fail: in-process runs import it


# ------------------------------------------------------------------ the kept decode guard


def children(pid: int) -> set[int]:
    """The processes ``pid`` started that are still there (its decode guards)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found |= {int(c) for c in (task / "children").read_text().split()}
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="/proc (Linux)")
def test_the_decode_guard_is_kept_and_replaced_when_killed(server, photos, v1_checkpoint):
    cold = convnext("classify", *photos, "-m", v1_checkpoint, "--no-server", env=server.env)
    assert cold.returncode == 0
    first = convnext("classify", *photos, "-m", v1_checkpoint, env=server.env)
    assert first.returncode == 0 and SERVED in first.stderr and first.stdout == cold.stdout
    guards = children(server.proc.pid)
    assert guards  # a decode guard runs between requests
    for _ in range(2):  # warm calls fork no guard of their own
        again = convnext("classify", *photos, "-m", v1_checkpoint, env=server.env)
        assert again.returncode == 0 and again.stdout == cold.stdout
        assert children(server.proc.pid) == guards
    for pid in guards:  # a guard that dies between requests (OOM killer, kill -9)
        os.kill(pid, signal.SIGKILL)
    after = convnext("classify", *photos, "-m", v1_checkpoint, env=server.env)
    assert after.returncode == 0, after.stderr.decode()
    assert SERVED in after.stderr and after.stdout == cold.stdout  # no input blamed
    assert children(server.proc.pid) - guards  # a fresh guard
    assert alive(server)
