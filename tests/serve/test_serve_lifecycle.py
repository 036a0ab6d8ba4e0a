"""The server's life: its socket and folder modes, one server per socket, a stale socket
after kill -9, the idle timeout, --detach / --status / --stop, SIGTERM with a request in
flight, a server killed mid-request."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_records_close, jsonl
from servers import convnext, runtime_env, socket_of, start

SERVED = b"(convnext serve, pid "


def many_inputs(tmp: Path, photos: list[Path], count: int) -> Path:
    """A folder of ``count`` images (links to the sample photos), for a long request."""
    folder = tmp / "many"
    folder.mkdir()
    for i in range(count):
        source = photos[i % len(photos)]
        os.symlink(source, folder / f"{i:04d}{source.suffix}")
    return folder


def test_socket_and_folder_are_private(tmp_path):
    env = runtime_env(tmp_path / "run")
    server = start(tmp_path, env, "--idle-timeout", "120")
    try:
        path = socket_of(env)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
        status = convnext("serve", "--status", env=env)
        assert status.returncode == 0 and f"pid {server.proc.pid}".encode() in status.stdout
    finally:
        server.stop()


def test_a_second_server_is_refused(tmp_path):
    env = runtime_env(tmp_path / "run")
    server = start(tmp_path, env, "--idle-timeout", "120")
    try:
        second = convnext("serve", "--idle-timeout", "5", env=env, timeout=60)
        assert second.returncode == 2
        line = second.stderr.decode()
        assert "already running" in line and str(server.proc.pid) in line
        assert line.count("\n") == 1 and "Traceback" not in line
        assert server.proc.poll() is None  # the first one is untouched
        assert convnext("serve", "--status", env=env).returncode == 0
    finally:
        server.stop()


def test_stale_socket_after_kill_9(tmp_path, photos, v1_checkpoint):
    env = runtime_env(tmp_path / "run")
    first = start(tmp_path, env, "--idle-timeout", "120")
    os.kill(first.proc.pid, signal.SIGKILL)
    first.stop()
    assert socket_of(env).exists()  # left behind
    # a client finds nobody there and runs in-process
    done = convnext("classify", photos[0], "-m", v1_checkpoint, env=env)
    assert done.returncode == 0 and SERVED not in done.stderr
    assert convnext("serve", "--status", env=env).returncode == 1
    second = start(tmp_path, env, "--idle-timeout", "120")
    try:
        assert "replacing the stale socket" in second.log()
        done = convnext("classify", photos[0], "-m", v1_checkpoint, env=env)
        assert done.returncode == 0 and f"pid {second.proc.pid}".encode() in done.stderr
    finally:
        second.stop()


def test_idle_timeout_ends_the_server(tmp_path):
    env = runtime_env(tmp_path / "run")
    server = start(tmp_path, env, "--idle-timeout", "3")
    try:
        assert server.proc.wait(timeout=120) == 0
        assert "idle for 3 s: exiting" in server.log()
        assert not socket_of(env).exists()
    finally:
        server.stop()


def test_detach_status_stop(tmp_path, photos, v1_checkpoint):
    env = runtime_env(tmp_path / "run")
    assert convnext("serve", "--status", env=env).returncode == 1
    started = convnext("serve", "--detach", "--idle-timeout", "300", "-m", v1_checkpoint, env=env)
    try:
        assert started.returncode == 0, started.stderr.decode()
        assert b"convnext server started" in started.stderr
        status = convnext("serve", "--status", env=env)
        assert status.returncode == 0 and str(v1_checkpoint).encode() in status.stdout
        done = convnext("classify", photos[0], "-m", v1_checkpoint, env=env)
        assert SERVED in done.stderr
        stopped = convnext("serve", "--stop", env=env)
        assert stopped.returncode == 0 and b"stopped" in stopped.stderr
        assert not socket_of(env).exists()
        assert convnext("serve", "--status", env=env).returncode == 1
    finally:  # the detached server is no child of the test: killed by the pid it wrote
        lock = socket_of(env).parent / "server.lock"
        text = lock.read_text().strip() if lock.exists() else ""
        if text.isdigit():
            try:
                os.kill(int(text), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _client(env: dict[str, str], *args: object) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "convnext_cli", *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_finishes_the_request_in_flight(tmp_path, photos, v1_checkpoint):
    env = runtime_env(tmp_path / "run")
    folder = many_inputs(tmp_path, photos, 48)  # finished well within the 60 s of grace
    server = start(tmp_path, env, "--idle-timeout", "300", "-m", str(v1_checkpoint), models=1)
    try:
        client = _client(env, "classify", folder, "-m", v1_checkpoint, "-k", "1")
        assert client.stdout is not None
        first = client.stdout.readline()  # a batch is out: the request is in flight
        assert first
        server.proc.send_signal(signal.SIGTERM)
        rest = client.stdout.read()  # (communicate() would skip what readline buffered)
        _, err = client.communicate(timeout=300)
        assert client.returncode == 0, err.decode()
        records = jsonl(first + rest)
        assert [r["path"] for r in records] == sorted(str(p) for p in folder.iterdir())
        assert server.proc.wait(timeout=120) == 0
        assert "stopped" in server.log()
        assert b"finishing here" not in err  # the server finished it
        # after it, a call runs in-process
        done = convnext("classify", photos[0], "-m", v1_checkpoint, env=env)
        assert done.returncode == 0 and SERVED not in done.stderr
    finally:
        server.stop()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_server_killed_mid_request(tmp_path, photos, v1_checkpoint, fmt):
    """kill -9 of the server while a client's request runs: the client finishes the rest
    in-process, with one note; every input has exactly one record, in order."""
    env = runtime_env(tmp_path / "run")
    folder = many_inputs(tmp_path, photos, 160)
    server = start(tmp_path, env, "--idle-timeout", "300", "-m", str(v1_checkpoint), models=1)
    try:
        args = ["classify", folder, "-m", v1_checkpoint, "-k", "2", "--format", fmt]
        client = _client(env, *args)
        assert client.stdout is not None
        first = client.stdout.readline()  # the first batch is written: the request runs
        if fmt == "csv":
            first += client.stdout.readline()
        os.kill(server.proc.pid, signal.SIGKILL)
        rest = client.stdout.read()
        _, err = client.communicate(timeout=600)
        assert client.returncode == 0, err.decode()
        if "classify 160 inputs" not in server.log():  # it had not finished: killed mid-run
            assert err.count(b"finishing here") == 1, err.decode()
        cold = convnext(*args, "--no-server", env=env)
        assert cold.returncode == 0
        got, want = (first + rest).decode(), cold.stdout.decode()
        if fmt == "jsonl":
            assert_records_close(jsonl(got), jsonl(want))
        else:  # path, rank, label, index exactly; the scores within float32 digits
            rows = [r.split(",") for r in got.splitlines()]
            wanted = [r.split(",") for r in want.splitlines()]
            assert [r[:4] for r in rows] == [r[:4] for r in wanted]
            for row, other in zip(rows[1:], wanted[1:], strict=True):
                assert float(row[4]) == pytest.approx(float(other[4]), rel=1e-5, abs=1e-6)
    finally:
        server.stop()


def test_provenance_is_the_same(tmp_path, photos, v1_checkpoint):
    """The record of what made a file (which --resume checks) is the same warm and cold."""
    env = runtime_env(tmp_path / "run")
    server = start(tmp_path, env, "--idle-timeout", "120")
    try:
        for kind, extra in (("warm", []), ("cold", ["--no-server"])):
            out = tmp_path / f"{kind}.csv"
            done = convnext("classify", photos[0], "-m", v1_checkpoint, "-o", out, *extra, env=env)
            assert done.returncode == 0
        warm = (tmp_path / ".warm.csv.run.json").read_bytes()
        assert warm == (tmp_path / ".cold.csv.run.json").read_bytes()
        assert b'"device"' in warm
    finally:
        server.stop()
