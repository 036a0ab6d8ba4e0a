"""Every file the tool reads besides images, built hostile in the test: FIFOs, /dev/zero,
sparse files of gigabytes, one line of gigabytes, JSON nested 100,000 deep, oversized CSV
fields, odd Parquet ids, a tar header claiming 4.5 GiB, a label that is not valid UTF-8.

Each gives one usage error naming the file (exit 2), or an error record for that input,
within a generous time bound (the subprocess timeout: a hang fails the test), no
traceback, and -- where the file is large -- a peak resident memory under PEAK_BOUND for
the whole CLI process (about 0.9 GB: Python, torch, a tiny model; the unbounded reads took
3 GB and more).  The limits: convnext_cli/reading.py (MAX_JSON_FILE_BYTES, ...).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import PeakRun, run_with_peak

from convnext_cli import reading as image_files
from convnext_cli.errors import UsageError
from convnext_cli.reading import bounded_lines, json_depth, parse_json

REPO = Path(__file__).resolve().parents[2]
PEAK_BOUND = 1.5e9  # bytes, as in test_memory_bounds.py
HANG_BOUND = 120  # seconds for one CLI run (a few on an idle machine); a hang hits it
GIB = 1024**3
DEEP = "[" * 100_000 + "]" * 100_000

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="FIFOs, ru_maxrss in KiB")
pytestmark = linux_only


def cli(tmp_path: Path, *args: object, stdin: Any = subprocess.DEVNULL) -> PeakRun:
    return run_with_peak(*args, timeout=HANG_BOUND, cwd=tmp_path, stdin=stdin)


def classify(tmp_path: Path, model: Path, *args: object, stdin: object = None) -> PeakRun:
    common = ["-m", model, "--device", "cpu", "--dtype", "float32", "-k", "1"]
    return cli(tmp_path, "classify", *args, *common, stdin=stdin or subprocess.DEVNULL)


def assert_usage_error(run: PeakRun, names: str) -> None:
    """Exit 2, one error line naming the file, no traceback, memory bounded."""
    assert "Traceback" not in run.stderr, run.stderr
    assert run.code == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    assert names in errors[0], errors[0]
    assert "internal error" not in errors[0]
    assert run.peak < PEAK_BOUND, f"peak {run.peak / 1e9:.2f} GB"


def sparse(path: Path, size: int, head: bytes = b"") -> Path:
    path.write_bytes(head)
    os.truncate(path, size)
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


# ------------------------------------------------------------------ resume targets, sidecars

RESUME_CASES = {
    "run.json FIFO": lambda d: fifo(d / ".out.jsonl.run.json"),
    "run.json 3 GiB sparse": lambda d: sparse(d / ".out.jsonl.run.json", 3 * GIB),
    "run.json nested 100000 deep": lambda d: (d / ".out.jsonl.run.json").write_text(DEEP),
    "jsonl target FIFO": lambda d: fifo(d / "out.jsonl"),
    "jsonl one 3 GiB line": lambda d: sparse(d / "out.jsonl", 3 * GIB, b'{"path": "'),
    "csv field of 200 KB": lambda d: (d / "out.csv").write_text(
        "path,rank,label,index,score,error\n" + "x" * 200_000 + ",1,a,0,0.5,\n"
    ),
    "csv one 3 GiB line": lambda d: sparse(d / "out.csv", 3 * GIB, b"path,rank,label\nx"),
    "parquet target FIFO": lambda d: fifo(d / "out.parquet"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_hostile_resume_target_is_one_usage_error(
    case: str, tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    RESUME_CASES[case](tmp_path)
    fmt = "csv" if "csv" in case else "parquet" if "parquet" in case else "jsonl"
    run = classify(tmp_path, v1_checkpoint, photos[0], "-o", f"out.{fmt}", "--resume")
    named = ".out.jsonl.run.json" if "run.json" in case else f"out.{fmt}"
    assert_usage_error(run, named)


def test_jsonl_line_nested_100000_deep_is_redone(
    tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    """A line that is no record (here, too deep to parse) is redone, as a torn line is."""
    target = tmp_path / "out.jsonl"
    target.write_text(json.dumps({"path": str(photos[1])})[:-1] + ', "x": ' + DEEP + "}\n")
    run = classify(tmp_path, v1_checkpoint, photos[0], photos[1], "-o", target, "--resume")
    assert "Traceback" not in run.stderr and run.code == 0, run.stderr
    kept = [json.loads(line) for line in target.read_text().splitlines()]
    assert sorted(r["path"] for r in kept) == sorted(map(str, photos[:2]))
    assert all("predictions" in r for r in kept)


@pytest.mark.parametrize("path_value", [None, '"broken'])
def test_parquet_target_with_odd_paths_resumes(
    path_value: str | None, tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    """A null path is no record (its row is kept, its input has none); a field that is not
    the JSON its quote promises is an id as it stands.  Every input ends with one record."""
    from convnext_cli.outputs.parquet import CLASSIFY_SCHEMA

    row: dict[str, Any] = {"path": path_value, "error": None, "label": "a", "index": 0}
    row["score"] = 0.5
    row["predictions"] = [{"label": "a", "index": 0, "score": 0.5}]
    target = tmp_path / "out.parquet"
    first = classify(tmp_path, v1_checkpoint, photos[1], "-o", target)  # what wrote it
    assert first.code == 0, first.stderr
    written = pq.read_table(target)
    odd = pa.Table.from_pylist([row], schema=CLASSIFY_SCHEMA)
    pq.write_table(pa.concat_tables([odd, written.cast(CLASSIFY_SCHEMA)]).replace_schema_metadata(
        written.schema.metadata), target)  # fmt: skip
    run = classify(tmp_path, v1_checkpoint, photos[0], photos[1], "-o", target, "--resume")
    assert "Traceback" not in run.stderr and run.code == 0, run.stderr
    paths = pq.read_table(target, columns=["path"]).column(0).to_pylist()
    assert sorted(paths, key=str) == sorted([path_value, *map(str, photos[:2])], key=str)


# ------------------------------------------------------------------------- --labels, stdin


LABEL_CASES = {
    "FIFO": lambda d: fifo(d / "labels.txt"),
    "/dev/zero": lambda d: (d / "labels.txt").symlink_to("/dev/zero"),
    "3 GiB sparse": lambda d: sparse(d / "labels.txt", 3 * GIB),
    "nested 100000 deep": lambda d: (d / "labels.txt").write_text(DEEP),
    "nested 65 deep": lambda d: (d / "labels.txt").write_text("[" * 65 + "]" * 65),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_hostile_labels_file_is_one_usage_error(
    case: str, tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    LABEL_CASES[case](tmp_path)
    run = classify(tmp_path, v1_checkpoint, photos[0], "--labels", "labels.txt")
    assert_usage_error(run, "--labels labels.txt")


def test_stdin_list_of_dev_zero_is_one_usage_error(tmp_path: Path, v1_checkpoint: Path) -> None:
    with open("/dev/zero", "rb") as zero:
        run = classify(tmp_path, v1_checkpoint, "-", stdin=zero)
    assert_usage_error(run, "<stdin>")


# ---------------------------------------------------------------------- checkpoint folders


CHECKPOINT_CASES = {
    "config.json FIFO": ("config.json", lambda p: fifo(p)),
    "config.json nested 100000 deep": ("config.json", lambda p: p.write_text(DEEP)),
    "config.json 3 GiB sparse": ("config.json", lambda p: sparse(p, 3 * GIB)),
    "preprocessor_config.json FIFO": ("preprocessor_config.json", lambda p: fifo(p)),
    "preprocessor_config.json deep": ("preprocessor_config.json", lambda p: p.write_text(DEEP)),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_hostile_checkpoint_json_is_one_usage_error(
    case: str, tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(v1_checkpoint, model)
    name, build = CHECKPOINT_CASES[case]
    (model / name).unlink()
    build(model / name)
    run = classify(tmp_path, model, photos[0])
    assert_usage_error(run, name)


def test_safetensors_header_nested_deep_is_one_usage_error(
    tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(v1_checkpoint, model)
    header = ('{"__metadata__": ' + DEEP + "}").encode()
    (model / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    run = classify(tmp_path, model, photos[0])
    assert_usage_error(run, "model.safetensors")


# --------------------------------------------------------------------------- dataset inputs


def test_parquet_input_that_is_a_fifo_is_an_error_record(
    tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    fifo(tmp_path / "rows.parquet")
    run = classify(tmp_path, v1_checkpoint, "rows.parquet", photos[0])
    assert "Traceback" not in run.stderr and run.code == 1, run.stderr
    records = {r["path"]: r for r in run.records()}
    assert "FIFO" in records["rows.parquet"]["error"]
    assert "predictions" in records[str(photos[0])]


def test_tar_long_name_header_of_4_5_gib_is_an_error_record(
    tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    """A GNU long-name header claiming 4.5 GiB, in a 5 GiB sparse shard: the member before it
    is classified, the shard gets an error record, and nothing reads the 4.5 GiB."""
    image = photos[0].read_bytes()
    member = tarfile.TarInfo("a.jpg")
    member.size = len(image)
    longname = tarfile.TarInfo("././@LongLink")
    longname.type = tarfile.GNUTYPE_LONGNAME
    longname.size = 9 * GIB // 2
    shard = tmp_path / "shard.tar"
    with open(shard, "wb") as out:
        out.write(member.tobuf(format=tarfile.USTAR_FORMAT))
        out.write(image + b"\0" * (-len(image) % tarfile.BLOCKSIZE))
        out.write(longname.tobuf(format=tarfile.USTAR_FORMAT))
    os.truncate(shard, 5 * GIB)
    run = classify(tmp_path, v1_checkpoint, "shard.tar")
    assert "Traceback" not in run.stderr and run.code == 1, run.stderr
    records = {r["path"]: r for r in run.records()}
    assert "predictions" in records["shard.tar#a.jpg"]
    assert "4831838208 bytes" in records["shard.tar"]["error"]
    assert run.peak < PEAK_BOUND, f"peak {run.peak / 1e9:.2f} GB"


# ------------------------------------------------------------------ labels that are not text


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_label_with_a_lone_surrogate_is_written_by_every_writer(
    fmt: str, tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(v1_checkpoint, model)
    config = json.loads((model / "config.json").read_text())
    config["id2label"] = {str(i): f"cat{i}\udc80" for i in range(1000)}
    config["label2id"] = {f"cat{i}": i for i in range(1000)}
    (model / "config.json").write_text(json.dumps(config))
    run = classify(tmp_path, model, photos[0], "-o", f"out.{fmt}")
    assert "Traceback" not in run.stderr and run.code == 0, run.stderr
    if fmt == "parquet":
        label = pq.read_table(tmp_path / "out.parquet").column("label").to_pylist()[0]
        assert label.endswith("\\udc80")  # the escape as text, as CSV writes it
    elif fmt == "csv":
        assert "\\udc80," in (tmp_path / "out.csv").read_text(encoding="utf-8")
    else:
        record = json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))
        assert record["predictions"][0]["label"].endswith("\udc80")  # JSON keeps it exact


# ------------------------------------------------------------------------ the reader itself


def test_parse_json_bounds_depth_and_names_the_file() -> None:
    assert parse_json("[" * 64 + "]" * 64, "f") == eval("[" * 64 + "]" * 64)
    for text in ("[" * 65 + "]" * 65, DEEP, '{"a": ' * 70 + "1" + "}" * 70):
        with pytest.raises(UsageError, match=r"^f: not valid JSON \(nested deeper than 64"):
            parse_json(text, "f")
    with pytest.raises(UsageError, match=r"^f: not valid JSON"):
        parse_json(b"\xff", "f")
    # brackets inside strings do not count
    assert parse_json(json.dumps(["[" * 1000]), "f") == ["[" * 1000]
    assert json_depth({"a": [1, {"b": []}]}) == 4 and json_depth(1) == 0


def test_bounded_lines_refuse_a_long_line_before_holding_it() -> None:
    lines = bounded_lines(io.BytesIO(b"ab\n" + b"x" * 100 + b"\ncd"), "f", max_bytes=10)
    assert next(lines) == b"ab\n"
    with pytest.raises(UsageError, match=r"^f: line 2 is longer than 10 bytes"):
        next(lines)


def test_read_small_file_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo(tmp_path / "p")
    for path, reason in [
        (tmp_path / "p", "named pipe"),
        (Path("/dev/zero"), "character device"),
        (tmp_path, "directory"),
        (tmp_path / "missing", "(?i)no such file"),
        (sparse(tmp_path / "big", 2 * GIB), "over the 67108864-byte limit"),
    ]:
        with pytest.raises(UsageError, match=reason):
            image_files.read_small_file(path, str(path))
