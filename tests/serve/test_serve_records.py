"""Warm calls (a running `convnext serve`) write the same bytes as in-process runs of the same
command, in every format; the summary says a server ran the model; --no-server and
CONVNEXT_SERVER=0 run in-process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from servers import Server, convnext, runtime_env, start

SERVED = b"(convnext serve, pid "


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, v1_checkpoint: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("served")
    env = runtime_env(tmp / "run")
    server = start(tmp, env, "--idle-timeout", "600", "-m", str(v1_checkpoint), models=1)
    yield server
    server.stop()


def both(served: Server, tmp: Path, *args: object) -> tuple[bytes, bytes, bytes]:
    """(warm stdout, cold stdout, warm stderr) of ``convnext ARGS``; outputs named with
    ``{}`` go to warm-/cold- files."""
    runs = []
    for kind, extra in (("warm", []), ("cold", ["--no-server"])):
        given = [str(a).replace("{}", str(tmp / kind)) for a in args]
        done = convnext(*given, *extra, env=served.env, cwd=tmp)
        assert done.returncode == 0, done.stderr.decode()
        runs.append(done)
    assert SERVED in runs[0].stderr, runs[0].stderr.decode()
    assert SERVED not in runs[1].stderr
    return runs[0].stdout, runs[1].stdout, runs[0].stderr


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_classify_text_formats_are_byte_identical(served, tmp_path, photos, v1_checkpoint, fmt):
    warm, cold, _ = both(served, tmp_path, "classify", *photos, "-m", v1_checkpoint, "-k", "3",
                         "-o", f"{{}}.{fmt}")  # fmt: skip
    assert warm == cold == b""
    assert (tmp_path / f"warm.{fmt}").read_bytes() == (tmp_path / f"cold.{fmt}").read_bytes()
    assert len((tmp_path / f"warm.{fmt}").read_bytes()) > 100


def test_classify_stdout_jsonl_and_table(served, tmp_path, photos, v1_checkpoint):
    warm, cold, _ = both(served, tmp_path, "classify", *photos, "-m", v1_checkpoint)
    assert warm == cold
    assert [json.loads(line)["path"] for line in warm.splitlines()] == [str(p) for p in photos]
    warm, cold, _ = both(
        served, tmp_path, "classify", *photos, "-m", v1_checkpoint, "--format", "table"
    )
    assert warm == cold
    assert photos[0].name.encode() in warm


def test_classify_scores_and_all_classes(served, tmp_path, photos, v1_checkpoint):
    warm, cold, _ = both(served, tmp_path, "classify", photos[0], "-m", v1_checkpoint,
                         "-k", "all", "--scores", "logits")  # fmt: skip
    assert warm == cold
    assert len(json.loads(warm)["predictions"]) == 1000


def test_parquet_outputs_hold_the_same_table(served, tmp_path, photos, v1_checkpoint):
    for command in ("classify", "embed"):
        out = f"{{}}-{command}.parquet"
        both(served, tmp_path, command, *photos, "-m", v1_checkpoint, "-o", out)
        warm = pq.read_table(tmp_path / f"warm-{command}.parquet")
        cold = pq.read_table(tmp_path / f"cold-{command}.parquet")
        assert warm.equals(cold)
        assert warm.num_rows == len(photos)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "npy", "safetensors"])
def test_embed_formats_are_byte_identical(served, tmp_path, photos, v1_checkpoint, fmt):
    both(served, tmp_path, "embed", *photos, "-m", v1_checkpoint, "--normalize",
         "-o", f"{{}}.{fmt}")  # fmt: skip
    assert (tmp_path / f"warm.{fmt}").read_bytes() == (tmp_path / f"cold.{fmt}").read_bytes()
    if fmt == "npy":
        warm = (tmp_path / "warm.paths.txt").read_bytes()
        assert warm == (tmp_path / "cold.paths.txt").read_bytes()


def test_error_records_match(served, tmp_path, photos, v1_checkpoint):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    inputs = [photos[0], broken, tmp_path / "missing.png", folder, photos[1]]
    runs = []
    for extra in ([], ["--no-server"]):
        done = convnext("classify", *inputs, "-m", v1_checkpoint, *extra, env=served.env)
        assert done.returncode == 1, done.stderr.decode()
        runs.append(done.stdout)
    assert runs[0] == runs[1]
    assert sum(b'"error"' in line for line in runs[0].splitlines()) == 3


def test_resume_of_a_cold_run_by_a_warm_one(served, tmp_path, photos, v1_checkpoint):
    out = tmp_path / "labels.jsonl"
    first = convnext("classify", *photos[:3], "-m", v1_checkpoint, "-o", out, "--no-server",
                     env=served.env)  # fmt: skip
    assert first.returncode == 0
    done = convnext("classify", *photos, "-m", v1_checkpoint, "-o", out, "--resume", env=served.env)
    assert done.returncode == 0, done.stderr.decode()
    assert SERVED in done.stderr and b"3 inputs already done" in done.stderr
    whole = convnext("classify", *photos, "-m", v1_checkpoint, "--no-server", env=served.env)
    assert out.read_bytes() == whole.stdout


def test_no_server_and_env_run_in_process(served, tmp_path, photos, v1_checkpoint):
    env = dict(served.env, CONVNEXT_SERVER="0")
    done = convnext("classify", photos[0], "-m", v1_checkpoint, env=env)
    assert done.returncode == 0 and SERVED not in done.stderr
    env["CONVNEXT_SERVER"] = "maybe"
    done = convnext("classify", photos[0], "-m", v1_checkpoint, env=env)
    assert done.returncode == 2 and b"CONVNEXT_SERVER" in done.stderr


def test_html_report_from_a_warm_call(served, tmp_path, photos, v1_checkpoint):
    done = convnext("classify", *photos, "-m", v1_checkpoint, "-o", tmp_path / "r.html",
                    env=served.env)  # fmt: skip
    assert done.returncode == 0 and SERVED in done.stderr
    html = (tmp_path / "r.html").read_text()
    assert all(p.name in html for p in photos)


def test_a_server_with_another_environment_is_not_used(served, tmp_path, photos, v1_checkpoint):
    env = dict(served.env, CONVNEXT_MAX_FILE_BYTES="1000")
    done = convnext("classify", photos[0], "-m", v1_checkpoint, env=env)
    assert SERVED not in done.stderr
    assert b"another environment" in done.stderr
    assert done.returncode == 1  # the photo is over 1000 bytes: read by this process's limit
