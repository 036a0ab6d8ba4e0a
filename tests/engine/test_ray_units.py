"""The distributed engine at scale, as a user runs it: units listed (never their members),
one part and one status per unit written by the cluster into ``-o DIR``, ``--resume``
after ``kill -9`` of the driver, ids within and across units, Ctrl-C / SIGTERM, the local
Ray's private folder and an address-space limit, a simulated multi-node cluster with a
node killed mid-run, and the driver's memory for a listing of a million rows.

Each run is a real ``convnext`` subprocess with its own local Ray (loopback, a token of its
own) or an in-process ``ray.cluster_utils.Cluster`` on loopback; only what a test started
is stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from processes import alive, command_line, descendants, kill_all

from convnext_cli.engine.ray import parts, settings, units
from convnext_cli.engine.ray.datasource import unit_inputs
from convnext_cli.inputs.expand import input_id

ray = pytest.importorskip("ray")
duckdb = pytest.importorskip("duckdb")

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture()
def folder(photos: list[Path], tmp_path: Path) -> Path:
    """12 images (the sample photos twice, under names of their own)."""
    images = tmp_path / "images"
    images.mkdir()
    for n in range(2):
        for photo in photos:
            shutil.copy(photo, images / f"{n}-{photo.name}")
    return images


@pytest.fixture()
def hooks() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cnr-hooks-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def command(model: Path, *inputs: object, out: Path) -> list[str]:
    base = [sys.executable, "-m", "convnext_cli", "classify", *map(str, inputs)]
    base += ["-m", str(model), "--device", "cpu", "--dtype", "float32", "-k", "2"]
    return [*base, "--engine", "ray", "-o", str(out), "--format", "parquet"]


def environment(hooks: Path | None = None, unit_rows: int = 2) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), **{units.UNIT_ROWS_ENV: str(unit_rows)})
    if hooks is not None:
        env[settings.TEST_DIR_ENV] = str(hooks)
    return env


def count(out: Path) -> tuple[int, int]:
    rows = duckdb.sql(f"select count(*), count(distinct path) from read_parquet('{out}/*.parquet')")
    ((total, distinct),) = rows.fetchall()
    return int(total), int(distinct)


def statuses(out: Path) -> dict[str, dict]:
    return parts.complete_units(out)


# --- no Ray: units, ids ----------------------------------------------------------------------


def test_units_are_shards_row_groups_and_chunks_never_members(
    photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from factories import make_shard

    monkeypatch.setenv(units.UNIT_ROWS_ENV, "4")
    loose = tmp_path / "loose"
    loose.mkdir()
    for n in range(5):
        shutil.copy(photos[0], loose / f"{n}.jpg")
    members = [(f"{i:03d}.jpg", photos[0].read_bytes()) for i in range(7)]
    shard = make_shard(tmp_path / "s.tar", members)
    table = pa.table({"key": [f"k{i}" for i in range(10)], "jpg": [b"x"] * 10})
    rows = tmp_path / "rows.parquet"
    pq.write_table(table, rows, row_group_size=6)  # row groups of 6 and 4
    listed = list(units.iter_units([str(loose), str(shard), str(rows)]))
    kinds = [(u.kind, len(u.refs), u.row_group, u.rows[:2]) for u in listed]
    assert kinds == [
        ("files", 4, None, (0, 0)),
        ("files", 1, None, (0, 0)),
        ("tar", 0, None, (0, 0)),  # the shard, not its 7 members
        ("parquet", 0, 0, (0, 4)),
        ("parquet", 0, 0, (4, 6)),
        ("parquet", 0, 1, (0, 4)),
    ]
    # the names are the same in every listing of the same inputs (resume by unit)
    again = [u.name for u in units.iter_units([str(loose), str(shard), str(rows)])]
    assert again == [u.name for u in listed] and len(set(again)) == len(again)
    # the read task's rows: the local engine's ids
    ids = [input_id(ref) for unit in listed for ref in unit_inputs(unit)]
    assert ids[5:12] == [f"{shard}#{name}" for name, _ in members]
    assert ids[12:] == [f"k{i}" for i in range(10)]


def test_ids_collide_within_a_unit_as_today_and_across_units_are_kept(
    photos: list[Path], tmp_path: Path
) -> None:
    from factories import make_shard

    data = photos[0].read_bytes()
    shard = make_shard(tmp_path / "s.tar", [("a.jpg", data), ("a.jpg", data), ("b.jpg", data)])
    (unit,) = units.iter_units([str(shard)])
    ids = [input_id(ref) for ref in unit_inputs(unit)]
    assert ids == [f"{shard}#a.jpg", f"{shard}#a.jpg#2", f"{shard}#b.jpg"]
    # the same shard named twice: two units, each with the same ids (reported after a run)
    first, second = units.iter_units([str(shard), str(shard)])
    assert first.name != second.name
    assert [input_id(r) for r in unit_inputs(second)] == ids


def test_clearing_a_folder_touches_only_this_tools_files_of_its_own_shard(
    tmp_path: Path,
) -> None:
    """What --resume (or a new run) removes in DIR: pieces, temporary files, parts without
    status, of the units of its own --shard only; complete units kept; other files never."""
    names = [f"{seq:08d}-files-{seq:010x}" for seq in range(4)]
    for name in names:
        (tmp_path / f"{name}.parquet").write_bytes(b"part")
        (tmp_path / f"{name}.status.json").write_text(json.dumps({"unit": name, "rows": 1}))
        (tmp_path / f".{name}.r000000000-000000003.piece").write_bytes(b"piece")
    (tmp_path / "00000009-mine.parquet").write_bytes(b"not a unit name of this tool's")
    (tmp_path / "notes.status.json").write_text("{}")
    keep = {names[0]}  # complete; names[2] is not (a --retry-errors unit, say)
    assert parts.clear_unfinished(tmp_path, keep, shard=(0, 2)) == 2 + 2
    left = sorted(p.name for p in tmp_path.iterdir())
    assert f"{names[0]}.parquet" in left and f"{names[0]}.status.json" in left
    assert not [n for n in left if n.startswith(names[2]) or n.startswith(f".{names[2]}")]
    assert not [n for n in left if n.startswith(f".{names[0]}")]  # its piece went
    for other in (names[1], names[3]):  # shard 1 of 2: not this run's
        assert f"{other}.parquet" in left and f".{other}.r000000000-000000003.piece" in left
    assert "00000009-mine.parquet" in left and "notes.status.json" in left
    assert set(parts.complete_units(tmp_path)) == {names[0], names[1], names[3]}


def test_a_million_row_listing_holds_units_not_inputs(tmp_path: Path) -> None:
    """The driver lists a 1,000,000-row Parquet file as units (footer only): its peak
    memory is that of a 10,000-row listing, within 20%, in a subprocess of its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for rows in (10_000, 1_000_000):
        table = pa.table({"png": pa.array([b"\x89PNG"] * rows, pa.binary())})
        pq.write_table(table, tmp_path / f"{rows}.parquet", row_group_size=100_000)
    code = (
        "import resource, sys\n"
        "from convnext_cli.engine.ray import units\n"
        "listed = 0\n"
        "for window in units.windows(units.iter_units([sys.argv[1]])):\n"
        "    listed += sum(u.rows[1] - u.rows[0] for u in window)\n"
        "print(listed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    peaks = {}
    for rows in (10_000, 1_000_000):
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / f"{rows}.parquet")],
            capture_output=True,
            text=True,
            timeout=300,
            env=environment(unit_rows=1024),
        )
        assert out.returncode == 0, out.stderr
        listed, peak = map(int, out.stdout.split())
        assert listed == rows
        peaks[rows] = peak
    assert peaks[1_000_000] <= 1.2 * peaks[10_000], peaks


# --- a local Ray, as the CLI starts it ---------------------------------------------------------


def test_driver_killed_then_resume_gives_one_record_per_input(
    v1_checkpoint: Path, folder: Path, tmp_path: Path, hooks: Path
) -> None:
    """kill -9 of the driver mid-run: the units whose status is there are kept, the others
    redone by --resume: exactly one record per input (DuckDB), the parts equal to a run's."""
    out = tmp_path / "out"
    (hooks / "delay-actor").write_text("1.5")
    run = subprocess.Popen(
        command(v1_checkpoint, folder, out=out),
        env=environment(hooks),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: len(statuses(out)) >= 1 or run.poll() is not None)
        assert run.poll() is None, run.stderr.read() if run.stderr else ""
        started = descendants(run.pid)
        run.kill()
        run.wait(timeout=30)
    finally:
        kill_all(descendants(run.pid) if alive(run.pid) else [])
    kill_all(started[1:])  # the killed driver's Ray: this test started it
    kept = statuses(out)
    assert 1 <= len(kept) < 6
    (hooks / "delay-actor").unlink()
    again = subprocess.run(
        [*command(v1_checkpoint, folder, out=out), "--resume"],
        env=environment(hooks),
        capture_output=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr.decode()
    assert f"{len(kept)} units" in again.stderr.decode()
    assert count(out) == (12, 12)
    done = statuses(out)
    assert len(done) == 6 and sum(s["rows"] for s in done.values()) == 12
    for name, status in kept.items():  # the kept units were not redone
        assert done[name] == status
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_collisions_across_units_are_reported_after_the_run(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    from factories import make_shard

    data = photos[0].read_bytes()
    shard = make_shard(tmp_path / "s.tar", [("a.jpg", data), ("a.jpg", data), ("b.jpg", data)])
    out = tmp_path / "out"
    done = subprocess.run(
        command(v1_checkpoint, shard, shard, out=out),
        env=environment(),
        capture_output=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr.decode()
    paths = sorted(r[0] for r in duckdb.sql(f"select path from '{out}/*.parquet'").fetchall())
    ids = [f"{shard}#a.jpg", f"{shard}#a.jpg#2", f"{shard}#b.jpg"]
    assert paths == sorted(ids * 2)  # one record per input; within a unit, ID#N
    stderr = done.stderr.decode()
    assert "6 records" in stderr and "another unit" in stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_keeping_finished_parts(
    v1_checkpoint: Path, folder: Path, tmp_path: Path, hooks: Path, signum: int
) -> None:
    """SIGTERM / Ctrl-C mid-run: exit 143 / 130 within 10 s, one line, no crash dump from
    Ray's C++ code, every complete unit's part kept; the local Ray's folder was private
    (0700) while it ran, and nothing of it is left."""
    out = tmp_path / "out"
    (hooks / "delay-actor").write_text("1.5")
    got = signalled(
        command(v1_checkpoint, folder, out=out),
        environment(hooks),
        lambda run: wait_for(lambda: len(statuses(out)) >= 1 or run.poll() is not None),
        signum,
    )
    modes = [mode for mode in got.folders.values() if mode is not None]
    assert modes and all(mode == 0o700 for mode in modes)
    assert got.returncode == (143 if signum == signal.SIGTERM else 130), got.stderr
    assert got.took < 10, got.took
    lines = got.stderr.strip().splitlines()
    assert lines[-1] == ("terminated" if signum == signal.SIGTERM else "interrupted")
    assert not any("***" in line or "SIGTERM received" in line for line in lines), lines
    kept = statuses(out)
    assert kept and all((out / s["part"]).exists() for s in kept.values())
    assert count(out)[0] == sum(s["rows"] for s in kept.values())
    assert_all_ended(got.started)
    assert not [f for f in got.folders if os.path.exists(f)]


@dataclasses.dataclass
class Signalled:
    """A run that was sent a signal: its processes and private Ray folders just before (each
    with its mode, None where it did not exist), then its exit status, stderr, and seconds
    from the signal to the exit."""

    started: list[int]
    folders: dict[str, int | None]
    returncode: int
    stderr: str
    took: float


def signalled(
    cmd: list[str], env: dict[str, str], moment: Callable[[subprocess.Popen], None], signum: int
) -> Signalled:
    """Start ``cmd``, wait for ``moment(run)`` to return, send ``signum``, wait for the end
    (the run is killed if the test fails before it ends)."""
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        moment(run)
        assert run.poll() is None, "the run ended before the moment"
        started = descendants(run.pid)
        folders = {
            f: os.stat(f).st_mode & 0o777 if os.path.isdir(f) else None
            for f in private_folders(started)
        }
        sent = time.monotonic()
        run.send_signal(signum)
        _, stderr = run.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if run.poll() is None:
            run.kill()
    return Signalled(started, folders, run.returncode, stderr.decode(), took)


def assert_all_ended(pids: list[int], timeout: float = 60.0) -> None:
    """The run's processes (its local Ray's included) end by themselves; those left are
    named (a worker still importing torch when Ray ended it may take seconds under load)."""
    deadline = time.monotonic() + timeout
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [command_line(p)[:120] for p in pids if alive(p)]
    assert not left, left


# moments inside ray.init: (a process of the local Ray seen, seconds after it); a signal
# 0.4 s after the first worker process left Ray's dashboard agent running before the fix
START_MOMENTS = [(b"gcs_server", 0.0), (b"raylet", 0.3), (b"default_worker", 0.2)]
START_MOMENTS += [(b"default_worker", 0.4), (b"default_worker", 0.7)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_ray_starts_ends_the_run_cleanly(
    v1_checkpoint: Path, folder: Path, tmp_path: Path, signum: int
) -> None:
    """A signal at several moments inside ``ray.init`` (:data:`START_MOMENTS`): held until
    Ray has started, then the run ends 143 / 130 within 10 s in one line -- never Ray's
    abort (-6) or a crash dump, and no Ray process or folder left behind."""
    for n, (process, delay) in enumerate(START_MOMENTS):

        def moment(run: subprocess.Popen, process: bytes = process, delay: float = delay) -> None:
            while run.poll() is None and not any(
                process in command_line(pid) for pid in descendants(run.pid)[1:]
            ):
                time.sleep(0.01)
            time.sleep(delay)

        got = signalled(
            command(v1_checkpoint, folder, out=tmp_path / f"out-{n}"),
            environment(),
            moment,
            signum,
        )
        assert got.returncode == (143 if signum == signal.SIGTERM else 130), got.stderr
        assert got.took < 10, got.took
        lines = got.stderr.strip().splitlines()
        assert lines == ["terminated" if signum == signal.SIGTERM else "interrupted"], lines
        assert_all_ended(got.started, timeout=15)
        assert not [f for f in got.folders if os.path.exists(f)]


def private_folders(pids: list[int]) -> list[str]:
    """The local Ray's folder (``/tmp/convnext-ray-*``), from its raylet's command line."""
    found = set()
    for pid in pids:
        for arg in command_line(pid).split(b"\0"):
            if arg.startswith(b"--temp_dir=") or arg.startswith(b"--temp-dir="):
                found.add(os.path.dirname(os.fsdecode(arg.split(b"=", 1)[1]).rstrip("/")))
    return sorted(found)


def test_an_address_space_limit_is_one_line_and_nothing_is_left(
    v1_checkpoint: Path, folder: Path, tmp_path: Path
) -> None:
    before = set(Path("/tmp").glob("convnext-ray-*"))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))

    run = subprocess.Popen(
        command(v1_checkpoint, folder, out=tmp_path / "out"),
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=limit,
    )
    _, stderr = run.communicate(timeout=300)
    lines = stderr.decode().strip().splitlines()
    assert run.returncode == 2, lines
    assert len(lines) == 1 and "address-space limit" in lines[0], lines
    left = [p for p in descendants(run.pid) if p != run.pid and alive(p)]
    assert not left
    assert not set(Path("/tmp").glob("convnext-ray-*")) - before


# --- many machines, simulated on this one ------------------------------------------------------


def raylet_of(node) -> int:
    return int(node.all_processes["raylet"][0].process.pid)


SLOW_ENV = "CONVNEXT_SLOW_TESTS"  # about 90 s on 2 cores: outside the default run


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(SLOW_ENV), reason=f"slow: set {SLOW_ENV}=1")
def test_a_node_killed_mid_run_loses_nothing(
    v1_checkpoint: Path,
    photos: list[Path],
    folder: Path,
    tmp_path: Path,
    hooks: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three nodes on loopback (a head with no CPU for tasks, two workers of one CPU each):
    the run spreads over the workers; the node running the model actor is killed (its
    raylet and workers, no goodbye) after the first records: Ray restarts the actor on the
    other node and retries what was lost; every input ends with one record, in one part
    per unit."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from convnext_cli.engine.loading import ModelSource, RunOptions
    from convnext_cli.engine.ray import run as ray_driver
    from convnext_cli.engine.task import Task

    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # every node on 127.0.0.1
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv(settings.TEST_DIR_ENV, str(hooks))
    monkeypatch.setenv(units.UNIT_ROWS_ENV, "16")  # 48 inputs: 3 units, one model call each
    (hooks / "delay-actor").write_text("2")
    for n in range(2, 8):
        for photo in photos:
            shutil.copy(photo, folder / f"{n}-{photo.name}")
    temp = tempfile.mkdtemp(prefix="cnr-", dir="/tmp")
    os.mkdir(os.path.join(temp, "ray"))
    monkeypatch.setenv("RAY_TMPDIR", temp)  # Ray's files, ray_current_cluster too
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=0, include_dashboard=False)  # the head: no task there
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        ray.init(address=cluster.address)
        run = settings.RayRun(
            ModelSource(str(v1_checkpoint)), RunOptions("cpu", "float32"), Task("classify", top_k=2)
        )
        out = tmp_path / "out"
        paths = sorted(str(p) for p in folder.iterdir())
        batches = ray_driver.write_parts_on_ray(paths, run, settings.PartFiles(str(out)))
        seen: dict[int, set[int]] = {id(w): set() for w in workers}

        def look() -> None:  # the worker processes of each node, as the run goes
            for w in workers:
                with contextlib.suppress(Exception):
                    seen[id(w)] |= set(descendants(raylet_of(w)))

        look()
        got = list(next(batches))
        look()
        calls = [line.split() for line in (hooks / "pids").read_text().splitlines()]
        actor = next(int(pid) for event, pid, *_ in calls if event == "actor-call")
        victim = next(w for w in workers if actor in seen[id(w)])
        survivor = next(w for w in workers if w is not victim)
        killed_at = len(calls)
        cluster.remove_node(victim, allow_graceful=False)
        for batch in batches:
            got += batch
            look()
        assert sorted({r.path for r in got}) == paths
        assert count(out) == (48, 48)
        done = statuses(out)
        assert len(done) == 3 and sum(s["rows"] for s in done.values()) == 48
        later = [line.split() for line in (hooks / "pids").read_text().splitlines()]
        after = [(e, int(p)) for e, p, *_ in later[killed_at:]]
        assert any(e == "actor-call" and p in seen[id(survivor)] for e, p in after), after
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
