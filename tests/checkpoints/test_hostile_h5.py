"""HDF5 weights files built as an attacker would (issue 29): filters that would inflate a
bomb or make libhdf5 ``dlopen`` a plugin library, groups linked into themselves or into a
2^40-path lattice, and a FIFO where the file should be.  Each is refused with one line
naming the file, exit 2, without hanging, without inflating, without loading a library.

Each run is a real ``python -m convnext_cli`` subprocess (with a timeout, so a walk that
never ends fails the test instead of hanging it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import cli_env, run_with_peak

h5py = pytest.importorskip("h5py")

KERNEL = "convnext/m/convnext/embeddings/patch_embeddings/kernel:0"
GZIP = 1  # deflate; its one value: the compression level
UNKNOWN_FILTER = 32004  # LZ4's registered id: not built into libhdf5, found as a plugin


def classify(photo: Path, model: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "convnext_cli", "classify", str(photo), "-m", str(model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(**env),
    )


def refused(done: Any, model: Path, *words: str) -> str:
    """The run (a CompletedProcess, or a PeakRun) exited 2 with one line on stderr naming
    the file (and ``words``)."""
    lines = done.stderr.strip().splitlines()
    assert getattr(done, "returncode", getattr(done, "code", None)) == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert str(model) in lines[0] and "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def run(photo: Path, model: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convnext_cli", "classify", str(photo), "-m", str(model)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env),
    )


def filtered_file(
    path: Path, code: int, chunk: bytes, shape: tuple[int, ...] = (4, 4), chunks: int = 0
) -> Path:
    """One float32 dataset behind filter ``code``, its one chunk stored as ``chunk`` (raw
    bytes, as the filter would have written them: libhdf5 must run the filter to read it).
    ``chunks``: a chunk of that many elements, larger than the dataset (an extendible one)."""
    with h5py.File(path, "w") as f:
        group = f.require_group(KERNEL.rsplit("/", 1)[0])
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((chunks,) if chunks else shape)
        dcpl.set_filter(code, h5py.h5z.FLAG_OPTIONAL, (9,) if code == GZIP else ())
        unlimited = (h5py.h5s.UNLIMITED,) * len(shape)
        space = h5py.h5s.create_simple(shape, unlimited if chunks else shape)
        name = KERNEL.rsplit("/", 1)[1].encode()
        dataset = h5py.h5d.create(group.id, name, h5py.h5t.IEEE_F32LE, space, dcpl=dcpl)
        dataset.write_direct_chunk((0,) * len(shape), chunk, filter_mask=0)
    return path


def test_every_filter_is_refused_before_reading(tmp_path: Path, photos: list[Path]) -> None:
    weights = np.arange(16 * 8, dtype="f4").reshape(16, 8)
    cases: dict[str, dict[str, Any]] = {
        "gzip.h5": {"compression": "gzip"},
        "shuffle.h5": {"shuffle": True},
        "fletcher32.h5": {"fletcher32": True},
        "lzf.h5": {"compression": "lzf"},
        "scaleoffset.h5": {"scaleoffset": 4},
        "gzip-shuffle.h5": {"compression": "gzip", "shuffle": True},
    }
    for name, options in cases.items():
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset(KERNEL, data=weights, chunks=(16, 8), **options)
    filtered_file(tmp_path / "unknown.h5", UNKNOWN_FILTER, weights[:4, :4].tobytes())
    for name in [*cases, "unknown.h5"]:
        line = refused(run(photos[0], tmp_path / name), tmp_path / name, KERNEL, "filter")
        print(line)
    line = refused(run(photos[0], tmp_path / "unknown.h5"), tmp_path / "unknown.h5")
    assert f"id {UNKNOWN_FILTER}" in line


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    done = subprocess.run(["strace", "-o", os.devnull, "true"], capture_output=True)
    return done.returncode == 0


def test_no_plugin_library_is_opened(tmp_path: Path, photos: list[Path]) -> None:
    """A dataset behind filter 32004 with HDF5_PLUGIN_PATH naming a folder whose "plugin"
    is a FIFO: libhdf5's dlopen would open it and block until a writer comes, which this
    test would see (its non-blocking open for writing succeeds only while a reader has the
    FIFO open).  Under strace as well where it runs: the folder is not even listed."""
    model = filtered_file(tmp_path / "plugin.h5", UNKNOWN_FILTER, b"\x00" * 64)
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    trap = plugins / "libh5lz4.so"
    os.mkfifo(trap)
    process = classify(photos[0], model, HDF5_PLUGIN_PATH=str(plugins))
    opened = 0
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:
            fd = os.open(trap, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader has it open
            time.sleep(0.02)
            continue
        opened += 1
        os.close(fd)  # the reader sees end of file and goes on
    if process.poll() is None:
        process.kill()
    _, stderr = process.communicate(timeout=60)
    assert opened == 0, "libhdf5 opened the plugin folder's library"
    done = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    refused(done, model, KERNEL, f"id {UNKNOWN_FILTER}")
    if not _strace_works():
        return
    log = tmp_path / "strace.log"
    env = cli_env(HDF5_PLUGIN_PATH=str(plugins))
    command = [sys.executable, "-m", "convnext_cli", "classify", str(photos[0]), "-m", str(model)]
    traced = subprocess.run(
        ["strace", "-f", "-e", "trace=open,openat,openat2", "-o", str(log), *command],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    refused(traced, model, KERNEL)
    assert str(plugins) not in log.read_text(errors="replace")


def test_a_gzip_bomb_is_not_inflated(tmp_path: Path, photos: list[Path]) -> None:
    """A 5 KB dataset whose one gzip chunk (declared 1 GiB: a chunk may be larger than an
    extendible dataset) inflates to 1 GiB, in a 1 MB file: refused before libhdf5 allocates
    or inflates it; the peak memory is that of refusing a small file (it was 1.8 GB and
    15 s: the whole chunk inflated, then the weight read)."""
    inflate = zlib.compressobj(9)
    zeros = bytes(1024 * 1024)
    chunk = b"".join(inflate.compress(zeros) for _ in range(1024)) + inflate.flush()
    bomb = filtered_file(tmp_path / "bomb.h5", GZIP, chunk, shape=(1280,), chunks=1024**3 // 4)
    assert bomb.stat().st_size < 2 * 1024 * 1024
    small = tmp_path / "ints.h5"
    with h5py.File(small, "w") as f:
        f.create_dataset(KERNEL, data=np.zeros((4, 4), dtype="i8"))
    baseline = run_with_peak("classify", photos[0], "-m", small, timeout=300)
    assert baseline.code == 2, baseline.stderr
    bombed = run_with_peak("classify", photos[0], "-m", bomb, timeout=300)
    assert bombed.peak < baseline.peak + 256 * 1024**2, (bombed.peak, baseline.peak)
    refused(bombed, bomb, KERNEL, "id 1")


def test_a_group_linked_into_itself_ends(tmp_path: Path, photos: list[Path]) -> None:
    model = tmp_path / "cycle.h5"
    with h5py.File(model, "w") as f:
        group = f.create_group("convnext/m")
        group["again"] = group  # a hard link: convnext/m/again/again/... for ever
    refused(run(photos[0], model), model, "convnext/m/again", "linked into itself")


def test_a_lattice_of_2_to_the_40_paths_ends(tmp_path: Path, photos: list[Path]) -> None:
    """40 groups, each linking twice to the next: no cycle, but 2^40 paths to walk."""
    model = tmp_path / "lattice.h5"
    with h5py.File(model, "w") as f:
        groups = [f.create_group(f"g{n}") for n in range(41)]
        for this, after in zip(groups, groups[1:], strict=False):
            this["a"] = after
            this["b"] = after
    refused(run(photos[0], model), model, "linked into itself or twice")


def test_groups_nested_too_deep_are_refused(tmp_path: Path, photos: list[Path]) -> None:
    model = tmp_path / "deep.h5"
    with h5py.File(model, "w") as f:
        f.create_group("/".join(["g"] * 100))
    refused(run(photos[0], model), model, "deep")


def test_a_fifo_does_not_block(tmp_path: Path, photos: list[Path]) -> None:
    """A FIFO named as the weights file, or as a folder's tf_model.h5: refused from its
    stat, never opened for a blocking read (the subprocess's timeout would fail the test)."""
    fifo = tmp_path / "weights.h5"
    os.mkfifo(fifo)
    refused(run(photos[0], fifo, timeout=60), fifo)
    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / "tf_model.h5")
    done = run(photos[0], folder, timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_named_datatype_is_refused(tmp_path: Path, photos: list[Path]) -> None:
    model = tmp_path / "datatype.h5"
    with h5py.File(model, "w") as f:
        f["convnext/m/t"] = np.dtype("f4")  # a committed datatype: neither group nor dataset
    refused(run(photos[0], model), model, "convnext/m/t", "neither a group nor a dataset")


def test_a_chunk_larger_than_the_file_is_refused(tmp_path: Path, photos: list[Path]) -> None:
    """Unfiltered, each chunk is stored whole: a 1 GiB chunk of a 5 KB dataset in a 10 KB
    file is not one libhdf5 should be asked to read."""
    model = tmp_path / "chunk.h5"
    with h5py.File(model, "w") as f:
        group = f.require_group(KERNEL.rsplit("/", 1)[0])
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((1024**3 // 4,))
        space = h5py.h5s.create_simple((1280,), (h5py.h5s.UNLIMITED,))
        name = KERNEL.rsplit("/", 1)[1].encode()
        dataset = h5py.h5d.create(group.id, name, h5py.h5t.IEEE_F32LE, space, dcpl=dcpl)
        dataset.write_direct_chunk((0,), np.ones(1280, "f4").tobytes(), filter_mask=0)
    refused(run(photos[0], model), model, KERNEL, "chunks of 1073741824 bytes")
