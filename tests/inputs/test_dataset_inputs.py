"""WebDataset tar shards and Parquet files as inputs: ids, offsets, broken shards and cells."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factories import make_shard

from convnext_cli.errors import ImageError, UsageError
from convnext_cli.inputs.datasets import (
    Item,
    dataset_items,
    expand_braces,
    parquet_items,
    read_item,
    tar_items,
)

EXTS = frozenset({".jpg", ".jpeg", ".png"})


def read(item: Item) -> bytes:
    return read_item(item, 1 << 30)


def test_brace_expansion() -> None:
    assert expand_braces("s/{00008..00011}.tar") == [
        "s/00008.tar",
        "s/00009.tar",
        "s/00010.tar",
        "s/00011.tar",
    ]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain{}.tar") == ["plain{}.tar"]
    assert expand_braces("x{3..1}") == ["x3", "x2", "x1"]


def test_tar_members_by_offset(tmp_path: Path, photos: list[Path]) -> None:
    members = [
        ("000000.jpg", photos[-1].read_bytes()),
        ("000000.json", b"{}"),
        ("000001.png", photos[0].read_bytes()),
        ("sub/dir/000002.PNG", photos[1].read_bytes()),
    ]
    shard = make_shard(tmp_path / "s.tar", members)
    items = list(tar_items(str(shard), EXTS))
    assert [i.id for i in items] == [
        f"{shard}#000000.jpg",
        f"{shard}#000001.png",
        f"{shard}#sub/dir/000002.PNG",
    ]
    assert [read(i) for i in items] == [members[0][1], members[2][1], members[3][1]]
    assert all(i.error is None for i in items)


def test_truncated_and_corrupt_shards(tmp_path: Path, photos: list[Path]) -> None:
    good = [(f"{n:06d}.png", photos[n].read_bytes()) for n in range(3)]
    shard = make_shard(tmp_path / "s.tar", good)
    data = shard.read_bytes()
    # cut inside the last member's data: the first two members keep their records
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) - 20000])
    items = list(tar_items(str(cut), EXTS))
    assert [i.error is None for i in items[:2]] == [True, True]
    assert any(i.error and "truncated" in i.error for i in items[2:])
    # garbage instead of a header in the middle
    second = data.index(b"000001.png")
    garbled = tmp_path / "garbled.tar"
    garbled.write_bytes(data[:second] + b"\x07" * 512 + data[second + 512 :])
    items = list(tar_items(str(garbled), EXTS))
    assert items[0].error is None
    assert items[-1].id == str(garbled) and "corrupt" in (items[-1].error or "")
    # not a tar at all, and an empty file
    (tmp_path / "text.tar").write_text("hello")
    (tmp_path / "empty.tar").write_bytes(b"")
    for name in ("text.tar", "empty.tar", "missing.tar"):
        (only,) = list(tar_items(str(tmp_path / name), EXTS))
        assert only.error and only.id == str(tmp_path / name)


def test_parquet_binary_and_hf_struct(tmp_path: Path, photos: list[Path]) -> None:
    blobs = [p.read_bytes() for p in photos[:3]]
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"jpg": blobs, "n": [1, 2, 3]}), plain)
    items = list(parquet_items(str(plain)))
    assert [i.id for i in items] == [f"{plain}#0", f"{plain}#1", f"{plain}#2"]
    assert [read(i) for i in items] == blobs

    hf = tmp_path / "hf.parquet"
    structs: list[dict[str, object]] = [
        {"bytes": b, "path": f"x{n}.png"} for n, b in enumerate(blobs)
    ]
    structs[1] = {"bytes": None, "path": "none.png"}
    pq.write_table(pa.table({"image": structs, "id": ["a", "b", "c"]}), hf)
    items = list(dataset_items(str(hf), EXTS))
    assert [i.id for i in items] == ["a", "b", "c"]
    assert read(items[0]) == blobs[0] and read(items[2]) == blobs[2]
    with pytest.raises(ImageError, match="no image bytes in this row"):
        read(items[1])


def test_parquet_columns_and_corruption(tmp_path: Path, photos: list[Path]) -> None:
    blobs = [p.read_bytes() for p in photos[:2]]
    table = pa.table({"pixels": blobs, "name": ["one", "two"]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    (missing,) = list(parquet_items(str(path)))
    assert missing.error and "--image-column" in missing.error
    items = list(parquet_items(str(path), image_column="pixels", id_column="name"))
    assert [i.id for i in items] == ["one", "two"]
    data = path.read_bytes()
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(data[: len(data) // 2])
    (only,) = list(parquet_items(str(broken), image_column="pixels"))
    assert only.id == str(broken) and "Parquet" in (only.error or "")


def test_brace_bombs_are_refused_before_expansion() -> None:
    with pytest.raises(UsageError, match="over 1000000 files"):
        expand_braces("x{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}.tar")
    with pytest.raises(UsageError):
        expand_braces("{1..100000000}.tar")


def test_a_huge_row_group_is_an_error_per_row_not_a_huge_read(
    tmp_path: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import convnext_cli.inputs.datasets as dataset_inputs

    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"image": [p.read_bytes() for p in photos[:2]]}), path)
    monkeypatch.setattr(dataset_inputs, "MAX_ROW_GROUP_BYTES", 1000)
    items = list(parquet_items(str(path)))
    with pytest.raises(ImageError, match="over the 1000-byte limit"):
        read(items[0])


def _read_in_a_decoding_process(path: str, conn: Connection) -> None:
    """In a forked child (what a decoding process is): the cells, and the row groups that
    pyarrow was asked for, in the order asked."""
    reads: list[tuple[int, bool]] = []  # (row group, read by the thread that reads ahead)
    real_read = pq.ParquetFile.read_row_group

    def counted(self: pq.ParquetFile, group: int, *args: object, **kwargs: object) -> object:
        ahead = threading.current_thread().name.startswith("convnext-parquet")
        reads.append((group, ahead))
        return real_read(self, group, *args, **kwargs)

    pq.ParquetFile.read_row_group = counted  # this child only
    cells = [read(item) for item in parquet_items(path)]
    conn.send((cells, reads))


@pytest.mark.skipif(sys.platform == "win32", reason="forks a decoding process")
def test_each_row_group_is_read_once_and_the_next_one_ahead(
    tmp_path: Path, photos: list[Path]
) -> None:
    """A decoding process reads a row group once for all its rows, and the next one in a
    thread while the current one is decoded; the cells are the bytes written."""
    blobs = [photos[n % len(photos)].read_bytes() for n in range(10)]
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"image": blobs}), path, row_group_size=4)  # groups of 4, 4, 2
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_read_in_a_decoding_process, args=(str(path), send))
    child.start()
    assert receive.poll(60), "the decoding process sent nothing"
    cells, reads = receive.recv()
    child.join(30)
    assert child.exitcode == 0
    assert cells == blobs
    assert sorted(group for group, _ in reads) == [0, 1, 2]
    assert [group for group, _ in reads[:2]] == [0, 1]
    # groups 1 and 2 were read ahead, in the thread, while the one before was being used
    assert [group for group, ahead in reads if ahead] == [1, 2]


def _open_shards(folder: Path) -> set[str]:
    """The files under ``folder`` this process holds open (its descriptors, as Linux lists)."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(folder)):
                held.add(target)
    return held


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists descriptors in /proc")
def test_tar_shards_stay_open_a_few_at_a_time(tmp_path: Path, photos: list[Path]) -> None:
    from convnext_cli.inputs.datasets import OPEN_ARCHIVES

    shards = []
    for n in range(OPEN_ARCHIVES + 3):
        members = [(f"{n:03d}-{i}.png", photos[(n + i) % 6].read_bytes()) for i in range(2)]
        shards.append((make_shard(tmp_path / f"{n:03d}.tar", members), members))
    for shard, members in shards + shards[:2]:
        assert [read(i) for i in tar_items(str(shard), EXTS)] == [data for _, data in members]
        held = _open_shards(tmp_path)
        assert str(shard.resolve()) in held and len(held) <= OPEN_ARCHIVES
    # a shard that is gone after listing, and closed since (the others were read after it):
    # its members fail, one by one, with the reason
    items = list(tar_items(str(shards[-1][0]), EXTS))
    for shard, _ in shards[:OPEN_ARCHIVES]:
        read(next(tar_items(str(shard), EXTS)))
    assert str(shards[-1][0].resolve()) not in _open_shards(tmp_path)
    shards[-1][0].unlink()
    with pytest.raises(ImageError, match="cannot read archive"):
        read(items[0])
