"""What wrote the records lives with them (docs/robustness.md, outputs/resume.py): a resume
never mixes two runs' records unless forced, never records of another shape even then, and
a record of the run that is missing, forged or foreign is a refusal, not a pass.  Also the
resumed outputs that are refused before anything is read or made beside them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import invoke

REPO = Path(__file__).resolve().parents[2]
CPU = ["--dtype", "float32", "--device", "cpu", "--workers", "0"]


def one_error_line(result, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def first_run(tmp_path: Path, photos: list[Path], v1_checkpoint: Path) -> Path:
    """out.jsonl with the records of the first two photos, by the v1 model."""
    out = tmp_path / "out.jsonl"
    result = invoke("classify", *photos[:2], "-m", v1_checkpoint, "-o", out, *CPU)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("sidecar", ["[1]", "{}", '{"runs": {}}', "not json", "deleted"])
@pytest.mark.parametrize("model", ["same", "other"])
def test_a_forged_or_lost_record_of_the_run_is_refused(
    sidecar: str,
    model: str,
    first_run: Path,
    photos: list[Path],
    v1_checkpoint: Path,
    v2_checkpoint: Path,
) -> None:
    run_json = first_run.with_name(f".{first_run.name}.run.json")
    if sidecar == "deleted":
        run_json.unlink()
    else:
        run_json.write_text(sidecar)
    before = files_in(first_run.parent)
    checkpoint = v1_checkpoint if model == "same" else v2_checkpoint
    result = invoke("classify", *photos, "-m", checkpoint, "-o", first_run, "--resume", *CPU)
    line = one_error_line(result, ".out.jsonl.run.json")
    said = {"deleted": "missing", "not json": "not valid JSON"}.get(sidecar, "not the record")
    assert said in line, line
    assert files_in(first_run.parent) == before
    if model == "same":  # forced: the records are added to, and the record is written again
        forced = [*photos, "-m", checkpoint, "-o", first_run, "--resume", "--force-resume"]
        assert invoke("classify", *forced, *CPU).exit_code == 0
        assert len(first_run.read_text().splitlines()) == len(photos)
        again = invoke("classify", *photos, "-m", checkpoint, "-o", first_run, "--resume", *CPU)
        assert again.exit_code == 0, again.stderr


def test_records_another_run_wrote_are_refused_though_a_record_exists(
    first_run: Path, photos: list[Path], v1_checkpoint: Path, v2_checkpoint: Path, tmp_path: Path
) -> None:
    """A .run.json describing other records (here: another file's) is no pass for these."""
    other = tmp_path / "other.jsonl"
    made = invoke("classify", *photos[2:4], "-m", v2_checkpoint, "-o", other, *CPU)
    assert made.exit_code == 0, made.stderr
    shutil.copy(other.with_name(".other.jsonl.run.json"), tmp_path / ".out.jsonl.run.json")
    result = invoke("classify", *photos, "-m", v2_checkpoint, "-o", first_run, "--resume", *CPU)
    one_error_line(result, "does not describe the records")


def test_ctrl_c_before_the_first_record_keeps_the_record_of_the_run(
    first_run: Path, photos: list[Path], v2_checkpoint: Path
) -> None:
    """Another model's run, stopped before its first record: the file and the record of the
    run that wrote it are as they were, and a resume with the other model is refused."""
    before = files_in(first_run.parent)
    args = ["classify", *photos, "-m", v2_checkpoint, "-o", first_run, *CPU]
    proc = subprocess.Popen(
        [sys.executable, "-m", "convnext_cli", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    time.sleep(1.0)  # starting up or loading the model: no record yet
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    if first_run.with_name(".out.jsonl.partial").exists():
        pytest.skip("the run got as far as its first batch: not the moment this test is for")
    assert files_in(first_run.parent) == before
    resumed = invoke("classify", *photos, "-m", v2_checkpoint, "-o", first_run, "--resume", *CPU)
    one_error_line(resumed, "different run", "model")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_force_resume_never_mixes_records_of_another_shape(
    fmt: str, photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / f"f.{fmt}"
    first = invoke("embed", *photos[:2], "-m", v1_checkpoint, "--stage", "stage1", "-o", out, *CPU)
    assert first.exit_code == 0, first.stderr
    before = files_in(tmp_path)
    args = ["embed", *photos, "-m", v1_checkpoint, "--stage", "stage2", "-o", out]
    result = invoke(*args, "--resume", "--force-resume", *CPU)
    one_error_line(result, "another shape", "features")
    assert files_in(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".parts", ".partial"))]


# ------------------------------------------------------------------ Parquet: foreign files


def foreign(kind: str, path: Path, photos: list[Path]) -> None:
    if kind == "path and error only":
        table = pa.table({"path": [str(photos[0])], "error": pa.array([None], pa.string())})
    elif kind == "null path":
        table = pa.table({"path": pa.array([None], pa.string()), "error": ["x"]})
    elif kind == "other columns":
        table = pa.table({"path": [str(photos[0])], "error": [None], "label": [3]})
    else:  # this tool's columns, no record of the run that wrote them
        from convnext_cli.outputs.parquet import CLASSIFY_SCHEMA

        row: dict[str, object] = {"path": str(photos[0]), "error": None, "label": "a"}
        row.update(index=0, score=0.5)
        row["predictions"] = [{"label": "a", "index": 0, "score": 0.5}]
        table = pa.Table.from_pylist([row], schema=CLASSIFY_SCHEMA)
    pq.write_table(table, path)


@pytest.mark.parametrize(
    "kind", ["path and error only", "null path", "other columns", "no metadata"]
)
@pytest.mark.parametrize("where", ["target", "part"])
def test_a_parquet_file_this_tool_did_not_write_is_refused(
    kind: str, where: str, photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    if where == "target":
        foreign(kind, out, photos)
        named = "out.parquet"
    else:
        parts = tmp_path / ".out.parquet.parts"
        parts.mkdir()
        foreign(kind, parts / "part-000000.parquet", photos)
        named = "part-000000.parquet"
    before = files_in(tmp_path)
    result = invoke("classify", *photos[:2], "-m", v1_checkpoint, "-o", out, "--resume", *CPU)
    one_error_line(result, named)
    assert "internal error" not in result.stderr
    assert files_in(tmp_path) == before


# ------------------------------------------------------------------ refused before anything


def test_pool_none_maps_of_several_sizes_to_parquet_are_refused_cleanly(
    v1_checkpoint: Path, tmp_path: Path
) -> None:
    from PIL import Image

    model = tmp_path / "model"
    shutil.copytree(v1_checkpoint, model)
    pre = json.loads((model / "preprocessor_config.json").read_text())
    (model / "preprocessor_config.json").write_text(json.dumps(dict(pre, do_resize=False)))
    images = []
    for n, size in enumerate([(64, 64), (64, 64), (96, 64)]):
        images.append(tmp_path / f"i{n}.png")
        Image.new("RGB", size, (n * 40, 90, 200)).save(images[-1])
    out = tmp_path / "maps.parquet"
    args = ["embed", *images, "-m", model, "--stage", "stage1", "--pool", "none", "-o", out]
    result = invoke(*args, "-b", "1", *CPU)
    assert result.exit_code == 2, result.stderr
    assert "written to" not in result.stderr and "internal error" not in result.stderr
    assert "one shape" in result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model", *(i.name for i in images)]
    )


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("how", ["folder", "glob"])
def test_resumed_output_linked_to_an_input_of_a_folder_is_refused_before_reading_it(
    fmt: str, how: str, photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:3]:
        shutil.copy(photo, folder / photo.name)
    victim = sorted(folder.iterdir())[1]
    out = tmp_path / f"out.{fmt}"
    out.symlink_to(victim)
    before = files_in(folder)
    given = folder if how == "folder" else folder / "*"
    args = ["classify", given, "-m", v1_checkpoint, "-o", out, "--format", fmt, "--resume"]
    result = invoke(*args, *CPU)
    one_error_line(result, "refusing", "an input", victim.name)
    assert files_in(folder) == before
    assert sorted(os.listdir(folder)) == sorted(before)  # no .victim.png.partial, .run.json...
    assert sorted(os.listdir(tmp_path)) == ["out." + fmt, "photos"]


def test_forced_resume_with_no_record_of_the_run_never_makes_a_ragged_csv(
    photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    """Nothing says what wrote the file (its .run.json deleted) and the resume is forced
    with another stage: the first row of another width stops it, the target untouched."""
    out = tmp_path / "f.csv"
    first = invoke("embed", *photos[:2], "-m", v1_checkpoint, "--stage", "stage1", "-o", out, *CPU)
    assert first.exit_code == 0, first.stderr
    (tmp_path / ".f.csv.run.json").unlink()
    before = out.read_bytes()
    args = ["embed", *photos, "-m", v1_checkpoint, "--stage", "stage2", "-o", out]
    result = invoke(*args, "--resume", "--force-resume", "-q", *CPU)
    one_error_line(result, "one width")
    assert out.read_bytes() == before
