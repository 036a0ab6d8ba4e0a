"""Dataset inputs through the CLI: tar shards and Parquet files give the loose files'
predictions, broken members/cells/shards get their own records, --shard covers everything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factories import make_shard

CLI = [sys.executable, "-m", "convnext_cli"]


def classify(*args: object) -> tuple[int, list[dict], str]:
    out = subprocess.run(
        [*CLI, "classify", *map(str, args), "--format", "jsonl", "--dtype", "float32"],
        capture_output=True,
        timeout=300,
    )
    records = [json.loads(line) for line in out.stdout.decode().splitlines()]
    return out.returncode, records, out.stderr.decode()


@pytest.fixture(scope="module")
def loose(photos: list[Path], v1_checkpoint: Path) -> list[list[int]]:
    code, records, err = classify(*photos, "-m", v1_checkpoint, "-k", "3")
    assert code == 0, err
    return [[p["index"] for p in r["predictions"]] for r in records]


def test_tar_shards_give_the_loose_files_predictions(
    photos: list[Path], v1_checkpoint: Path, loose: list[list[int]], tmp_path: Path
) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    for n in range(2):
        members = []
        for i, photo in enumerate(photos):
            members.append((f"{i:06d}{photo.suffix}", photo.read_bytes()))
            members.append((f"{i:06d}.json", b'{"caption": "x"}'))
        if n == 1:
            members.append(("999999.jpg", photos[-1].read_bytes()[:300]))  # a broken member
        make_shard(folder / f"{n:05d}.tar", members)
    code, records, _ = classify(folder / "{00000..00001}.tar", "-m", v1_checkpoint, "-k", "3")
    assert code == 1
    assert len(records) == 2 * len(photos) + 1
    first = [r for r in records if r["path"].startswith(str(folder / "00000.tar#"))]
    assert [r["path"] for r in first] == [
        f"{folder / '00000.tar'}#{i:06d}{p.suffix}" for i, p in enumerate(photos)
    ]
    assert [[p["index"] for p in r["predictions"]] for r in first] == loose
    broken = records[-1]
    assert broken["path"] == f"{folder / '00001.tar'}#999999.jpg" and "error" in broken
    # a folder of shards reads the same; a truncated shard keeps the members before the cut
    data = (folder / "00000.tar").read_bytes()
    (folder / "00000.tar").write_bytes(data[: len(data) // 2])
    code, records, _ = classify(folder, "-m", v1_checkpoint, "-k", "3")
    assert code == 1
    assert any(r["path"] == str(folder / "00000.tar") and "error" in r for r in records)
    good = [r for r in records if "predictions" in r and "00000.tar#" in r["path"]]
    assert 0 < len(good) < len(photos)


def test_parquet_inputs_give_the_loose_files_predictions(
    photos: list[Path], v1_checkpoint: Path, loose: list[list[int]], tmp_path: Path
) -> None:
    cells = [{"bytes": p.read_bytes(), "path": p.name} for p in photos]
    cells.append({"bytes": b"garbage", "path": "bad.png"})
    table = pa.table({"image": cells, "key": [f"k{i}" for i in range(len(cells))]})
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=4)
    code, records, _ = classify(path, "-m", v1_checkpoint, "-k", "3")
    assert code == 1
    assert [r["path"] for r in records] == [f"k{i}" for i in range(len(cells))]
    assert [[p["index"] for p in r["predictions"]] for r in records[:-1]] == loose
    assert "error" in records[-1]
    # plain binary column chosen by name; no id column: FILE#ROW
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"pixels": [p.read_bytes() for p in photos]}), plain)
    code, records, _ = classify(plain, "-m", v1_checkpoint, "-k", "3", "--image-column", "pixels")
    assert code == 0
    assert [r["path"] for r in records] == [f"{plain}#{i}" for i in range(len(photos))]
    assert [[p["index"] for p in r["predictions"]] for r in records] == loose
    # a corrupt Parquet file is one error record naming it
    (tmp_path / "broken.parquet").write_bytes(plain.read_bytes()[:100])
    code, records, _ = classify(tmp_path / "broken.parquet", "-m", v1_checkpoint)
    assert code == 1 and len(records) == 1 and "Parquet" in records[0]["error"]


@pytest.mark.parametrize("count", [1, 3, 7])
def test_shards_cover_every_input_exactly_once(
    count: int, photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    listing = "".join(f"{photos[i % len(photos)]}\n" for i in range(17))
    seen: list[str] = []
    for index in range(count):
        out = subprocess.run(
            [
                *CLI,
                "classify",
                "-",
                "-m",
                str(v1_checkpoint),
                "--format",
                "jsonl",
                "--shard",
                f"{index}/{count}",
                "-k",
                "1",
                "--workers",
                "0",
            ],
            input=listing.encode(),
            capture_output=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        seen.extend(json.loads(line)["path"] for line in out.stdout.decode().splitlines())
    from convnext_cli.inputs.expand import UniqueIds, input_id

    unique = UniqueIds(lambda _message: None)  # a path listed twice: its second id is PATH#2
    assert sorted(seen) == sorted(input_id(unique.one(p)) for p in listing.splitlines())
    bad = subprocess.run([*CLI, "classify", str(photos[0]), "--shard", "3/3"], capture_output=True)
    assert bad.returncode == 2 and b"0 <= I < N" in bad.stderr
