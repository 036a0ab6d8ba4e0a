"""What long runs cost: listing a huge tree, resuming, and dataset inputs against loose files.

Three measurements, each a fresh child process timed whole (interpreter start included)
against a peer run in the same go:

1. **Listing**: a generated tree of empty ``.jpg`` files (1,000 folders of 1,000 by default)
   expanded by ``convnext_cli.inputs.expand_inputs(recursive=True)`` in a child, against
   ``find ROOT -type f``; peak RSS of the child.  Targets: peak under 500 MB, time within
   2x of ``find``.
2. **Resume overhead**: ``convnext classify --resume`` on a folder of 10,000 inputs whose
   records are all in ``-o`` already, against the same command on one input; the
   difference is what skipping 10,000 done inputs costs.  Target: under 2 s.
3. **Dataset inputs**: the same photos as loose files, as one WebDataset tar shard and as
   one Parquet file, classified with the tests' tiny model (so the run is decode-bound);
   images/s of each.  Target: tar and Parquet at least as fast as loose files.

    python benchmarks/long_runs.py                  # all three
    python benchmarks/long_runs.py --files 1000000 --skip-datasets
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_images"
sys.path.insert(0, str(REPO / "tests"))

LIST_CHILD = """
import sys
from convnext_cli.inputs import expand_inputs
found = expand_inputs([sys.argv[1]], recursive=True)
print(len(found))
"""


def timed(cmd: list[str], **kwargs) -> tuple[float, float, subprocess.CompletedProcess]:
    """(seconds, peak RSS of the child in MB, result) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, **kwargs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if result.returncode not in (0, 1):
        raise SystemExit(f"{cmd[:4]} failed ({result.returncode}):\n{result.stderr.decode()}")
    return seconds, max(peak, before) / 1024, result


def make_tree(root: Path, files: int, per_folder: int = 1000) -> None:
    for n in range(files):
        folder = root / f"{n // per_folder:05d}"
        if n % per_folder == 0:
            folder.mkdir(parents=True)
        os.close(os.open(folder / f"{n % per_folder:06d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def listing(root: Path, files: int) -> None:
    start = time.perf_counter()
    make_tree(root / "tree", files)
    print(f"made {files} empty files in {time.perf_counter() - start:.1f} s", flush=True)
    find_s, _, found = timed(["find", str(root / "tree"), "-type", "f"])
    ours_s, peak, listed = timed([sys.executable, "-c", LIST_CHILD, str(root / "tree")])
    assert int(listed.stdout) == files == len(found.stdout.splitlines())
    print(
        f"listing {files} files: find {find_s:.2f} s, convnext {ours_s:.2f} s "
        f"({ours_s / find_s:.2f}x find; target <= 2x), peak RSS {peak:.0f} MB (target < 500)",
        flush=True,
    )


def tiny_model(root: Path) -> Path:
    import factories

    return factories.save_hf(factories.hf_model(num_labels=1000, seed=1), root / "tiny")


def resume_overhead(root: Path, model: Path, count: int = 10_000) -> None:
    folder = root / "done"
    folder.mkdir()
    photo = next(p for p in sorted(SAMPLES.iterdir()) if p.suffix == ".png")
    records = []
    for n in range(count):
        path = folder / f"{n:06d}.png"
        path.touch()
        preds = [{"label": "tabby, tabby cat", "index": 281, "score": 0.5}] * 5
        records.append(json.dumps({"path": str(path), "predictions": preds}) + "\n")
    output = root / "done.jsonl"
    output.write_text("".join(records))
    single = root / "one"
    single.mkdir()
    shutil.copy(photo, single / "one.png")
    common = ["-m", str(model), "--device", "cpu", "--dtype", "float32"]
    cli = [sys.executable, "-m", "convnext_cli", "classify"]
    one_s, _, _ = timed([*cli, str(single), *common, "-o", str(root / "one.jsonl")])
    resume_s, _, result = timed([*cli, str(folder), *common, "-o", str(output), "--resume"])
    assert f"{count} inputs already done" in result.stderr.decode(), result.stderr
    print(
        f"resume: {count} done inputs skipped in {resume_s:.2f} s against {one_s:.2f} s for a "
        f"one-image run: overhead {resume_s - one_s:.2f} s (target < 2 s)",
        flush=True,
    )


def datasets(root: Path, model: Path, count: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from factories import make_shard

    photos = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    loose = root / "loose"
    loose.mkdir()
    members, blobs = [], []
    for n in range(count):
        source = photos[n % len(photos)]
        data = source.read_bytes()
        (loose / f"{n:06d}{source.suffix}").write_bytes(data)
        members.append((f"{n:06d}{source.suffix}", data))
        blobs.append(data)
    shard = make_shard(root / "photos.tar", members)
    table = root / "photos.parquet"
    pq.write_table(pa.table({"image": blobs}), table, row_group_size=256)
    cli = [sys.executable, "-m", "convnext_cli", "classify"]
    common = ["-m", str(model), "--device", "cpu", "--dtype", "float32", "--format", "jsonl"]
    rates = {}
    for name, source in (("loose files", loose), ("tar shard", shard), ("parquet", table)):
        best = min(timed([*cli, str(source), *common])[0] for _ in range(2))
        rates[name] = count / best
    base = rates["loose files"]
    for name, rate in rates.items():
        print(f"{count} images as {name:12s} {rate:7.1f} img/s  ({rate / base:.2f}x loose)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--skip-listing", action="store_true")
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--skip-datasets", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="long-runs-", dir="/tmp"))
    try:
        print(f"{os.cpu_count()} CPUs", flush=True)
        if not args.skip_listing:
            listing(root, args.files)
        model = tiny_model(root)
        if not args.skip_resume:
            resume_overhead(root, model)
        if not args.skip_datasets:
            datasets(root, model, args.images)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
