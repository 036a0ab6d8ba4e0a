"""The local Ray of `--engine ray`: on loopback, with a token of its own; and joining a
user's cluster (unreachable, without authentication, GPUs it does not have).

Each test starts its own Ray processes (a `convnext` subprocess, or a head in a subprocess),
on 127.0.0.1, with fractional CPUs, and stops only those.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import record_ids
from processes import descendants

from convnext_cli.engine.loading import ModelSource, RunOptions
from convnext_cli.engine.ray import session, settings
from convnext_cli.errors import UsageError

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]


# --- the processes a run started, their listening sockets --------------------------------


def _address(hexaddr: str) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)


def listening(pids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state held by ``pids``
    (/proc/net/tcp{,6} matched to the socket inodes of their file descriptors)."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}", encoding="ascii") as rows:
            next(rows)
            for row in rows:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in owner:  # 0A: LISTEN
                    found.append((*_address(cols[1]), owner[cols[9]]))
    return found


def is_loopback(address: str) -> bool:
    return (
        address.startswith("127.")
        or address in ("::1", "::ffff:127.0.0.1")
        or (address.startswith("::ffff:127."))
    )


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def connect_code() -> str:
    return (
        "import sys, ray\n"
        "try:\n"
        "    ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
        "except Exception as exc:\n"
        "    print('REFUSED', type(exc).__name__); sys.exit(3)\n"
        "print('JOINED', ray.cluster_resources().get('CPU'))\n"
        "ray.shutdown()\n"
    )


def bare_env(home: Path) -> dict[str, str]:
    """This environment without any Ray token, with an empty home (no ~/.ray)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    env[session.LOOPBACK_ENV] = "0"  # the joining driver on 127.0.0.1 too
    return env


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


def test_the_local_ray_is_on_loopback_with_its_own_token(
    v1_checkpoint: Path,
    photos: list[Path],
    tmp_path: Path,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "delay-actor").write_text("1")  # the run lasts while the checks run
    paths = [str(p) for p in photos] * 8
    env = bare_env(home)
    env.pop(session.LOOPBACK_ENV)
    env[settings.TEST_DIR_ENV] = str(hooks)
    env["RAY_AUTH_TOKEN"] = "the-users-own-token"  # must not be the run's
    command = [sys.executable, "-m", "convnext_cli", "classify", "-", "-m", str(v1_checkpoint)]
    command += ["--device", "cpu", "--dtype", "float32", "-k", "2", "--engine", "ray"]
    command += ["--batch-size", "1", "--format", "jsonl"]
    run = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        assert run.stdin is not None
        run.stdin.write("".join(p + "\n" for p in paths).encode())
        run.stdin.close()
        run.stdin = None
        deadline = time.monotonic() + 240
        while not (hooks / "pids").exists() or "actor-call" not in (hooks / "pids").read_text():
            assert run.poll() is None, run.stderr.read() if run.stderr else ""
            assert time.monotonic() < deadline, "the run did not start its model actor"
            time.sleep(0.2)
        pids = descendants(run.pid)
        sockets = listening(pids)
        gcs = [pid for pid in pids if comm(pid) == "gcs_server"]
        assert len(gcs) == 1, [comm(p) for p in pids]
        gcs_env = environ_of(gcs[0])
        assert gcs_env.get("RAY_AUTH_MODE") == "token"
        assert "RAY_AUTH_TOKEN" not in gcs_env
        token_path = Path(gcs_env["RAY_AUTH_TOKEN_PATH"])
        assert stat.S_IMODE(token_path.parent.stat().st_mode) == 0o700
        assert len(token_path.read_text()) == 64
        assert not (home / ".ray").exists()  # never the user's ~/.ray token
        # every server the run started listens on loopback only
        assert {pid for _, _, pid in sockets} >= {gcs[0], run.pid}
        exposed = [(a, p, comm(pid)) for a, p, pid in sockets if not is_loopback(a)]
        assert not exposed, exposed
        gcs_ports = [port for _, port, pid in sockets if pid == gcs[0]]
        address = f"127.0.0.1:{gcs_ports[0]}"
        assert session.cluster_requires_token(address) is True
        # --ray-address to it: the user's token is passed through (Ray sends none to an
        # explicit address unless RAY_AUTH_MODE=token); without one, a usage error
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_path))
        assert session.join_settings(address) == {"RAY_AUTH_MODE": "token"}
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
        with pytest.raises(UsageError, match="the cluster needs its token"):
            session.join_settings(address)
        # another process on loopback, without the token: refused
        stranger = subprocess.run(
            [sys.executable, "-c", connect_code(), address],
            env=bare_env(home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert stranger.returncode == 3, stranger.stdout + stranger.stderr
        assert "REFUSED" in stranger.stdout
        # the same, with the run's token: joins (so the refusal was the token's)
        friend_env = {**bare_env(home), "RAY_AUTH_MODE": "token"}
        friend_env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        friend = subprocess.run(
            [sys.executable, "-c", connect_code(), address],
            env=friend_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert friend.returncode == 0 and "JOINED" in friend.stdout, friend.stderr[-2000:]
        assert run.poll() is None, "the run ended before the checks did"
        (hooks / "delay-actor").unlink()
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err.decode()[-2000:]
        records = [json.loads(line) for line in out.decode().splitlines()]
        assert [r["path"] for r in records] == record_ids(paths)
        assert not token_path.parent.exists()  # removed at the end
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()


# --- a cluster of the user's -------------------------------------------------------------


def test_an_address_where_nothing_listens_is_one_line_at_once(
    v1_checkpoint: Path, photos: list[Path]
) -> None:
    started = time.monotonic()
    with pytest.raises(UsageError, match="cannot reach a Ray cluster"):
        session.check_reachable("127.0.0.1:1")
    assert time.monotonic() - started < 10
    command = [sys.executable, "-m", "convnext_cli", "classify", str(photos[0])]
    command += ["-m", str(v1_checkpoint), "--engine", "ray", "--ray-address", "127.0.0.1:1"]
    started = time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert time.monotonic() - started < 30  # a generous bound: "does not hang"
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0], out.stderr


@pytest.fixture()
def open_head(home: Path, tmp_path: Path) -> Iterator[str]:
    """A Ray head without authentication, in a subprocess of its own, on 127.0.0.1."""
    code = (
        "import os, sys, time, tempfile, ray\n"
        "ctx = ray.init(address='local', include_dashboard=False, num_cpus=1,\n"
        "    logging_level='ERROR', _temp_dir=tempfile.mkdtemp(prefix='cnh-', dir='/tmp'))\n"
        "print(ctx.address_info['gcs_address'], flush=True)\n"
        "sys.stdin.read()\n"
        "ray.shutdown()\n"
    )
    env = {**bare_env(home), "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert head.stdout is not None
        yield head.stdout.readline().strip()
    finally:
        assert head.stdin is not None
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def test_a_cluster_without_authentication_gets_one_warning_line(
    open_head: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    v1_checkpoint: Path,
    photos: list[Path],
    home: Path,
) -> None:
    assert open_head.startswith("127.0.0.1:")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert session.cluster_requires_token(open_head) is False
    assert session.join_settings(open_head) == {}
    err = capsys.readouterr().err.strip().splitlines()
    warning = session.NO_AUTH_WARNING.format(address=open_head)
    assert err == [warning]
    assert os.environ.get("RAY_AUTH_MODE") is None  # the probe left this process as it was
    # the whole command, joining it: the warning once, and the records
    paths = [str(p) for p in photos[:3]]
    command = [sys.executable, "-m", "convnext_cli", "classify", *paths, "-m", str(v1_checkpoint)]
    command += ["--device", "cpu", "--dtype", "float32", "--format", "jsonl", "-k", "2"]
    command += ["--engine", "ray", "--ray-address", open_head]
    env = bare_env(home)
    env.pop(session.LOOPBACK_ENV)  # the command joins a loopback address by itself
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.splitlines().count(warning) == 1, out.stderr
    assert [json.loads(line)["path"] for line in out.stdout.splitlines()] == paths


# --- GPUs and decoding --------------------------------------------------------------------


def ray_run(device: str = "auto", decode: str = "auto", **cluster: Any) -> settings.RayRun:
    """A Ray run of a model named "m" (never read here) on ``device``."""
    options = RunOptions(device, decode=decode)
    return settings.RayRun(ModelSource("m"), options, cluster=settings.RaySettings(**cluster))


def test_replicas_above_the_gpus_is_a_usage_error() -> None:
    gpus = {"CPU": 16.0, "GPU": 2.0}
    with pytest.raises(UsageError, match="--replicas 3: the Ray cluster reports 2 GPU"):
        settings.plan_actors(gpus, ray_run("auto", replicas=3))
    two = settings.plan_actors(gpus, ray_run(replicas=2))
    assert (two.replicas, two.num_gpus) == (2, 1.0)
    assert settings.plan_actors(gpus, ray_run("cpu", replicas=3)).replicas == 3  # no GPU asked
    with pytest.raises(UsageError, match="reports no GPU"):
        settings.plan_actors({"CPU": 4.0}, ray_run("cuda"))


def test_decode_gpu_is_said_not_dropped() -> None:
    assert settings.decode_notice("auto") is None
    assert settings.decode_notice("cpu") is None
    notice = settings.decode_notice("gpu")
    assert notice is not None and "--decode gpu" in notice and "\n" not in notice
    run = ray_run("cuda:1", decode="gpu")
    assert run.options.decode == "gpu"  # the job's own options, as they were given
    actor = settings.actor_options(run.options)
    assert (actor.device, actor.decode) == ("cuda", "cpu")  # the actor's GPU; decode tasks
    with pytest.raises(UsageError, match="unknown --decode 'gpx'"):
        ray_run(decode="gpx")
