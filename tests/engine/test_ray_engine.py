"""The Ray Data engine: the local engine's records, whatever Ray kills on the way.

One local Ray for the module (loopback, its own short temporary folder, no dashboard),
started by the fixture and shut down by it.  The stages record their process ids in a
folder only these tests name (``CONVNEXT_RAY_TEST_DIR``), so that a test can ``kill -9`` a
model actor or a decoding worker mid-run, and read a per-call pause from it, so that the
kill lands while there is work left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from convnext_cli.engine.loading import ModelSource, RunOptions, load_runner
from convnext_cli.engine.ray import datasource, parts, session, settings, stages, units
from convnext_cli.engine.ray import run as ray_driver
from convnext_cli.engine.task import Task
from convnext_cli.outputs.names import path_field
from convnext_cli.outputs.parquet import METADATA_KEY
from convnext_cli.results import Result

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hooks() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="cnr-hooks-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def local_ray(hooks: Path) -> Iterator[None]:
    """A Ray of its own for this module, started as the engine starts one (on 127.0.0.1
    only, with a token of its own), with a short temporary folder; the runs join it."""
    temp = tempfile.mkdtemp(prefix="cnr-", dir="/tmp")
    os.environ[settings.TEST_DIR_ENV] = str(hooks)  # inherited by Ray's workers
    try:
        with session.ray_session(settings.RaySettings(temp_dir=temp)):
            assert ray.is_initialized()
            yield
        assert not ray.is_initialized()
    finally:
        os.environ.pop(settings.TEST_DIR_ENV, None)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture()
def clean_hooks(hooks: Path) -> Path:
    for name in ("pids", "delay-decode", "delay-actor"):
        (hooks / name).unlink(missing_ok=True)
    return hooks


@pytest.fixture(scope="module")
def inputs(photos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The sample photos, one under a name that is not UTF-8, then broken files: empty,
    truncated, text named .png."""
    broken = tmp_path_factory.mktemp("broken")
    odd = os.path.join(os.fsencode(broken), b"caf\xe9.jpg")
    with open(odd, "wb") as out:
        out.write(photos[0].read_bytes())
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "truncated.jpg").write_bytes(photos[-1].read_bytes()[:300])
    (broken / "text.png").write_text("this is not a picture\n")
    paths = [str(p) for p in photos]
    names = ("empty.jpg", "truncated.jpg", "text.png")
    return [*paths, os.fsdecode(odd), *(str(broken / n) for n in names)]


def local_records(model: Path, paths: list[str], task: str, **kw: object) -> list[Result]:
    runner = load_runner(str(model), RunOptions("cpu", "float32")).runner
    if task == "classify":
        return [r for b in runner.classify(paths, workers=0, **kw) for r in b]  # type: ignore[arg-type]
    return [r for b in runner.embed(paths, workers=0, **kw) for r in b]  # type: ignore[arg-type]


def options(model: Path, command: str = "classify", **task: Any) -> settings.RayRun:
    """A Ray run of ``model`` on the CPU in float32, with ``task``'s fields."""
    cpu = RunOptions("cpu", "float32")
    return settings.RayRun(ModelSource(str(model)), cpu, Task(command, **task))


def planned(command: str = "classify", device: str = "auto", **cluster: Any) -> settings.RayRun:
    """A run to plan actors for (its model is never read)."""
    cluster_settings = settings.RaySettings(**cluster)
    return settings.RayRun(ModelSource("m"), RunOptions(device), Task(command), cluster_settings)


def assert_same(ray_results: list[Result], local: list[Result]) -> None:
    assert [r.path for r in ray_results] == [r.path for r in local]
    for got, want in zip(ray_results, local, strict=True):
        assert got.error == want.error, got.path
        assert [p.index for p in got.predictions] == [p.index for p in want.predictions]
        assert [p.label for p in got.predictions] == [p.label for p in want.predictions]
        for g, w in zip(got.predictions, want.predictions, strict=True):
            assert abs(g.score - w.score) <= 1e-6
        if want.embedding is None:
            assert got.embedding is None
        else:
            assert got.embedding is not None
            diff = (got.embedding - want.embedding).norm() / want.embedding.norm()
            assert float(diff) <= 1e-6


def events(hooks: Path) -> list[tuple[str, int, int]]:
    path = hooks / "pids"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        event, pid, first = line.split()[:3]
        out.append((event, int(pid), int(first)))
    return out


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- no Ray, no cluster ----------------------------------------------------------------------


def test_without_ray_the_import_works_and_the_call_is_a_usage_error() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from convnext_cli.engine.ray import run, settings\n"
        "from convnext_cli.engine.loading import ModelSource\n"
        "from convnext_cli.errors import UsageError\n"
        "try:\n"
        "    run.run_on_ray(['x.jpg'], settings.RayRun(ModelSource('m')))\n"
        "except UsageError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == settings.NEEDS_RAY


def test_actor_plan() -> None:
    opts = planned()
    two = settings.plan_actors({"CPU": 2.0}, opts)
    assert (two.replicas, two.num_gpus, two.threads, two.batch_size) == (1, 0.0, 2, 8)
    assert two.num_cpus + two.decode_cpus <= 1.0  # an actor and a decode task fit in 1 CPU
    gpus = settings.plan_actors({"CPU": 32.0, "GPU": 4.0}, opts)
    assert (gpus.replicas, gpus.num_gpus, gpus.batch_size) == (4, 1.0, 32)
    cpus = settings.plan_actors({"CPU": 64.0, "GPU": 4.0}, planned("embed", device="cpu"))
    assert (cpus.replicas, cpus.num_gpus, cpus.threads) == (8, 0.0, 8)
    for plan in (two, gpus, cpus):  # never equal: Ray Data would fuse decoding into the actors
        assert (plan.num_cpus, plan.num_gpus) != (plan.decode_cpus, 0.0)
    with pytest.raises(settings.UsageError):
        planned(replicas=0)
    sized = settings.RayRun(ModelSource("m"), task=Task("classify", batch_size=3))
    assert settings.plan_actors({"CPU": 2.0}, sized).batch_size == 3


def test_a_model_actor_runs_the_jobs_own_objects(v1_checkpoint: Path, inputs: list[str]) -> None:
    """Without a cluster: a model actor built from a pickled RayRun (as Ray sends it) runs the
    run's task on the decode stage's rows and gives the local records; the run's options
    keep ``--decode gpu`` (what the job said), which the actor, fed pixels, does not apply."""
    import pickle

    import pyarrow as pa

    run = settings.RayRun(
        ModelSource(str(v1_checkpoint)),
        RunOptions("cpu", "float32", decode="gpu"),
        Task("classify", top_k=4, scores="log-probs"),
    )
    received = pickle.loads(pickle.dumps(run))
    assert received == run
    spec, _width = settings.read_preprocessing(run.source, "classify")
    (unit,) = units.refs_units(inputs)  # what a read task does with it, in the cluster
    rows = pa.concat_tables(datasource.read_unit(unit))
    assert rows.column("last").to_pylist() == [False] * (len(inputs) - 1) + [True]
    plan = settings.plan_actors({"CPU": 2.0}, received)
    actor = stages.ModelActor(received, plan)
    assert actor.task is received.task and actor.runner.jpeg_on_device is False
    table = actor(stages.decode_rows(rows, spec))
    got = stages.results_from_table(table, "classify")
    assert_same(got, local_records(v1_checkpoint, inputs, "classify", top_k=4, scores="log-probs"))


# --- on a local Ray ------------------------------------------------------------------------


def test_classify_gives_the_local_records(
    local_ray: None, clean_hooks: Path, v1_checkpoint: Path, inputs: list[str]
) -> None:
    local = local_records(v1_checkpoint, inputs, "classify", top_k=5)
    assert sum(r.error is not None for r in local) == 3
    batches = list(ray_driver.run_on_ray(inputs, options(v1_checkpoint, top_k=5)))
    assert_same([r for b in batches for r in b], local)
    started = [e for e in events(clean_hooks) if e[0] == "decode"]
    actors = {pid for event, pid, _ in events(clean_hooks) if event.startswith("actor")}
    # decoding ran in its own tasks, not fused into the model actors
    assert started and not {pid for _, pid, _ in started} & actors


def test_embed_gives_the_local_records(
    local_ray: None, clean_hooks: Path, v2_checkpoint: Path, inputs: list[str]
) -> None:
    local = local_records(v2_checkpoint, inputs, "embed", normalize=True)
    got = list(ray_driver.run_on_ray(inputs, options(v2_checkpoint, "embed", normalize=True)))
    assert_same([r for b in got for r in b], local)


def test_a_model_actor_killed_mid_run_loses_and_repeats_nothing(
    local_ray: None,
    clean_hooks: Path,
    v1_checkpoint: Path,
    photos: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(units.UNIT_ROWS_ENV, "8")
    paths = [str(p) for p in photos] * 8  # 48 inputs, 6 units, 6 model calls of 8
    local = local_records(v1_checkpoint, paths, "classify", top_k=3)
    (clean_hooks / "delay-actor").write_text("0.4")
    stream = ray_driver.run_on_ray(paths, options(v1_checkpoint, top_k=3, batch_size=8))
    got = list(next(stream))
    victim = next(pid for event, pid, _ in events(clean_hooks) if event == "actor-call")
    os.kill(victim, signal.SIGKILL)
    killed_at = len(events(clean_hooks))
    for batch in stream:
        got += batch
    assert_same(got, local)  # one record per input, in order, none duplicated
    after = [(event, pid) for event, pid, _ in events(clean_hooks)[killed_at:]]
    assert any(event == "actor-call" and pid != victim for event, pid in after), (
        "no replacement actor ran a batch after the kill"
    )


def test_a_decoding_worker_killed_mid_task_is_retried(
    local_ray: None, clean_hooks: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    paths = [str(p) for p in photos] * 6  # 36 inputs, 3 decode tasks of 16
    local = local_records(v1_checkpoint, paths, "classify", top_k=3)
    (clean_hooks / "delay-decode").write_text("3")
    stream = ray_driver.run_on_ray(paths, options(v1_checkpoint, top_k=3))
    got: list[Result] = []

    def kill_first_decoder() -> None:
        wait_for(lambda: any(e[0] == "decode" for e in events(clean_hooks)))
        _, pid, first = next(e for e in events(clean_hooks) if e[0] == "decode")
        os.kill(pid, signal.SIGKILL)
        kill_first_decoder.first = first  # type: ignore[attr-defined]

    import threading

    killer = threading.Thread(target=kill_first_decoder)
    killer.start()
    for batch in stream:
        got += batch
    killer.join()
    assert_same(got, local)
    first = kill_first_decoder.first  # type: ignore[attr-defined]
    tries = [e for e in events(clean_hooks) if e[0] == "decode" and e[2] == first]
    assert len(tries) >= 2, "the killed decode task was not run again"


def test_parquet_parts_read_back_with_duckdb_and_resume(
    local_ray: None,
    clean_hooks: Path,
    v1_checkpoint: Path,
    inputs: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One part and one status per unit, written by the cluster; a unit's part is whole or
    absent; the parts read back with DuckDB give the local records."""
    duckdb = pytest.importorskip("duckdb")
    monkeypatch.setenv(units.UNIT_ROWS_ENV, "3")  # 10 inputs: 4 units
    out = tmp_path / "out"
    files = settings.PartFiles(str(out), {"command": "classify"})
    light = [
        r
        for b in ray_driver.write_parts_on_ray(inputs, options(v1_checkpoint, top_k=3), files)
        for r in b
    ]
    assert sorted(r.path for r in light) == sorted(inputs)
    complete = parts.complete_units(out)
    assert len(complete) == 4
    assert sorted(s["rows"] for s in complete.values()) == [1, 3, 3, 3]
    assert sum(s["errors"] for s in complete.values()) == 3
    assert all(s["provenance"] == {"command": "classify"} for s in complete.values())
    assert all(s["seconds"] >= 0 for s in complete.values())
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(
        s["part"] for s in complete.values()
    )
    # an interrupted run's leftovers: a piece, a temporary file, a part without its status
    name = sorted(complete)[0]
    (out / f".{name}.r000000000-000000001.piece").write_bytes(b"half")
    (out / f".{name}.parquet.123.tmp").write_bytes(b"half a part")
    (out / f"{name}.status.json").unlink()
    (out / "notes.txt").write_text("the user's own file")
    assert parts.clear_unfinished(out, set(complete) - {name}) == 3
    assert not list(out.glob(".*")) and (out / "notes.txt").exists()
    assert not (out / f"{name}.parquet").exists()
    ray_driver_units = list(units.refs_units(inputs))
    todo = [u for u in ray_driver_units if u.name == name]
    list(ray_driver.write_parts_on_ray(todo, options(v1_checkpoint, top_k=3), files))
    assert set(parts.complete_units(out)) == set(complete)

    local_run = local_records(v1_checkpoint, inputs, "classify", top_k=3)
    local = {path_field(r.path): r for r in local_run}
    rows = duckdb.sql(
        f"select path, error, label, index, score, predictions "
        f"from read_parquet('{out}/*.parquet') order by path"
    ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(local)  # one row per input
    for path, error, label, index, score, predictions in rows:
        want = local[path]
        assert error == want.error
        if want.error is not None:
            assert label is None and predictions is None
            continue
        assert (label, index) == (want.predictions[0].label, want.predictions[0].index)
        assert abs(score - want.predictions[0].score) <= 1e-6
        assert [p["index"] for p in predictions] == [p.index for p in want.predictions]
    import pyarrow.parquet as pq

    schema = pq.read_schema(next(out.glob("*.parquet")))
    assert schema.names == ["path", "error", "label", "index", "score", "predictions"]


def test_parquet_embed_parts(
    local_ray: None, clean_hooks: Path, v2_checkpoint: Path, inputs: list[str], tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "emb"
    files = settings.PartFiles(str(out), {"command": "embed", "model": "m"})
    list(ray_driver.write_parts_on_ray(inputs, options(v2_checkpoint, "embed"), files))
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet")))
    for part in out.glob("*.parquet"):  # the output spec reached the actors as it was
        written = json.loads(pq.read_schema(part).metadata[METADATA_KEY.encode()])
        assert written == {"command": "embed", "model": "m"}
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    local = {path_field(r.path): r for r in local_records(v2_checkpoint, inputs, "embed")}
    assert sorted(table.column("path").to_pylist()) == sorted(local)
    for path, error, vector in zip(
        *(table.column(c).to_pylist() for c in ("path", "error", "embedding")), strict=True
    ):
        want = local[path]
        assert error == want.error
        if want.embedding is not None:
            got = torch.tensor(vector)
            assert float((got - want.embedding).norm() / want.embedding.norm()) <= 1e-6
        else:
            assert vector is None


def test_the_cli_engine_ray_gives_the_local_records(
    v1_checkpoint: Path, inputs: list[str], tmp_path: Path
) -> None:
    """`convnext classify ... --engine ray` as a user runs it (its own local Ray, started and
    shut down by the command): JSON lines through the driver, and Parquet parts written by
    the actors into `-o DIR`, resumable; both equal the local engine's records."""
    duckdb = pytest.importorskip("duckdb")
    stdin = "".join(p + "\n" for p in inputs).encode("utf-8", "surrogateescape")
    base = [sys.executable, "-m", "convnext_cli", "classify", "-", "-m", str(v1_checkpoint)]
    base += ["--device", "cpu", "--dtype", "float32", "-k", "3", "--engine", "ray"]

    def cli(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], input=stdin, capture_output=True, timeout=300)

    local = {
        path_field(r.path): r for r in local_records(v1_checkpoint, inputs, "classify", top_k=3)
    }
    out = cli("--format", "jsonl")
    assert out.returncode == 1, out.stderr  # the broken files
    records = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [os.fsencode(r["path"]) for r in records] == [os.fsencode(p) for p in inputs]
    for record in records:
        want = local[path_field(record["path"])]
        assert record.get("error") == want.error
        got = [p["index"] for p in record.get("predictions", [])]
        assert got == [p.index for p in want.predictions]

    folder = tmp_path / "parts"
    out = cli("-o", str(folder), "--format", "parquet")
    assert out.returncode == 1, out.stderr
    rows = duckdb.sql(f"select path, error, index from read_parquet('{folder}/*.parquet')")
    found = {path: (error, index) for path, error, index in rows.fetchall()}
    assert found.keys() == local.keys()
    again = cli("-o", str(folder), "--format", "parquet", "--resume")
    assert again.returncode == 0, again.stderr
    assert f"({len(inputs)} inputs) already done" in again.stderr.decode()


def test_dataset_inputs_on_ray_equal_the_local_engine(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    """Tar members and Parquet rows travel to the decode tasks as references (never their
    bytes through the driver) and give the local engine's records, errors included."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from factories import make_shard

    members = [(f"{i:06d}{p.suffix}", p.read_bytes()) for i, p in enumerate(photos)]
    shard = make_shard(tmp_path / "s.tar", [*members, ("bad.jpg", b"\xff\xd8 broken")])
    table = pa.table({"jpg": [p.read_bytes() for p in photos] + [None]})
    rows = tmp_path / "rows.parquet"
    pq.write_table(table, rows)
    base = [sys.executable, "-m", "convnext_cli", "classify", str(shard), str(rows)]
    base += ["-m", str(v1_checkpoint), "--device", "cpu", "--dtype", "float32", "-k", "2"]
    base += ["--format", "jsonl"]
    local = subprocess.run(base, capture_output=True, timeout=300)
    ray = subprocess.run([*base, "--engine", "ray"], capture_output=True, timeout=300)
    assert local.returncode == ray.returncode == 1, ray.stderr
    expected = [json.loads(line) for line in local.stdout.decode().splitlines()]
    got = [json.loads(line) for line in ray.stdout.decode().splitlines()]
    assert len(got) == 2 * len(photos) + 2
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    for g, e in zip(got, expected, strict=True):
        assert g.get("error") == e.get("error")
        assert [p["index"] for p in g.get("predictions", [])] == [
            p["index"] for p in e.get("predictions", [])
        ]
