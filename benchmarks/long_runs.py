"""What long runs cost: listing a huge tree, resuming, and dataset inputs against loose files.

Each measurement is a fresh child process (interpreter start included), against a peer
run in the same go; peak memory is the child's own (measured by a small parent of its own).

1. **Listing**: a generated tree of empty ``.jpg`` files (1,000 folders of 1,000 by
   default), and one flat folder of as many, streamed by
   ``convnext_cli.inputs.expand.iter_inputs(recursive=True)`` in a child, against
   ``find ROOT -type f`` (the best of 3 interleaved runs of each); peak RSS of the child.
   Targets: peak under 500 MB, time within 2x of ``find``.  Then **time to first record**:
   ``convnext classify TREE -r`` against ``convnext classify ONE_IMAGE`` (the same start-up
   and model load): the difference is what the listing delays the first record by, to
   compare with the whole listing's time.
2. **Resume**: ``convnext classify --resume`` on a folder of 10,000 inputs whose records
   are all in ``-o`` already, against the same command on one input (target: under 2 s
   more); and a resume that keeps 1,000,000 records (``--resume-records``) against a
   one-image run: its extra time and peak memory (target: a few hundred MB at most).
3. **Dataset inputs**: the same photos as loose files, as one WebDataset tar shard and as
   one Parquet file (row groups of 256, dictionary encoding off, as distinct photos would
   be stored: the sample photos repeat), classified with the tests' tiny model (so the run
   is decode-bound), in interleaved rounds; the best and the median images/s of each,
   whole run and between the first and the last record (``--workers N`` for another
   decoding plan than the default).  A second copy of the loose files runs beside them as
   the noise floor: its ratio to the first copy is what this machine's noise does to a
   ratio.  Target: tar and Parquet at least as fast as loose files.

    python benchmarks/long_runs.py                  # all of them
    python benchmarks/long_runs.py --files 1000000 --skip-datasets
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_images"
sys.path.insert(0, str(REPO / "tests" / "support"))
CLI = [sys.executable, "-m", "convnext_cli"]

LIST_CHILD = """
import sys
try:
    from convnext_cli.inputs.expand import iter_inputs
except ImportError:  # a version from before the listing was streamed
    from convnext_cli.inputs.expand import expand_inputs as iter_inputs
print(sum(1 for _ in iter_inputs([sys.argv[1]], recursive=True)))
"""

# runs a command and reports its wall time and its own peak RSS (not its siblings')
MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
print(json.dumps({
    "seconds": time.perf_counter() - start,
    "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "code": done.returncode,
    "lines": done.stdout.count(b"\\n"),
    "stdout": done.stdout.decode(errors="replace")[-2000:],
    "stderr": done.stderr.decode(errors="replace")[-2000:],
}))
"""


def measured(cmd: list[str]) -> dict:
    """{seconds, peak_mb, code, stdout, stderr} of one child process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, check=True)
    result = json.loads(out.stdout)
    if result["code"] not in (0, 1):
        raise SystemExit(f"{cmd[:4]} failed ({result['code']}):\n{result['stderr']}")
    return result


def first_record_seconds(cmd: list[str]) -> float:
    """Seconds from starting `cmd` to its first line on stdout; the run is then stopped."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    seconds = time.perf_counter() - start
    proc.kill()
    proc.wait()
    if not line:
        raise SystemExit(f"{cmd[:4]}: no record")
    return seconds


def record_times(
    cmd: list[str], env: dict[str, str] | None = None
) -> tuple[float, float, float, int]:
    """(first record, last record, exit) in seconds from the start, and the record count."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    first = last = 0.0
    count = 0
    for _ in proc.stdout:
        last = time.perf_counter() - start
        first = first or last
        count += 1
    proc.wait()
    return first, last, time.perf_counter() - start, count


def make_tree(root: Path, files: int, per_folder: int = 1000) -> None:
    for n in range(files):
        folder = root / f"{n // per_folder:05d}"
        if n % per_folder == 0:
            folder.mkdir(parents=True)
        os.close(os.open(folder / f"{n % per_folder:06d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def tiny_model(root: Path) -> Path:
    import factories

    return factories.save_hf(factories.hf_model(num_labels=1000, seed=1), root / "tiny")


def common(model: Path) -> list[str]:
    return ["-m", str(model), "--device", "cpu", "--dtype", "float32", "--format", "jsonl"]


def listing(root: Path, files: int, flat_files: int, model: Path) -> None:
    start = time.perf_counter()
    make_tree(root / "tree", files)
    if flat_files:
        make_tree(root / "flat", flat_files, per_folder=flat_files)
    print(f"made {files + flat_files} empty files in {time.perf_counter() - start:.1f} s")
    trees = [("tree", files, "1,000 folders")]
    if flat_files:
        trees.append(("flat/00000", flat_files, "one folder"))
    list_s = {}
    for name, count, shape in trees:
        finds, ourses = [], []
        for _ in range(3):  # interleaved; the best of each (a warm cache for both)
            finds.append(measured(["find", str(root / name), "-type", "f"]))
            ourses.append(measured([sys.executable, "-c", LIST_CHILD, str(root / name)]))
        find = min(finds, key=lambda run: run["seconds"])
        ours = min(ourses, key=lambda run: run["seconds"])
        assert int(ours["stdout"]) == count == find["lines"], (ours["stdout"], find["lines"])
        list_s[name] = ours["seconds"]
        print(
            f"listing {count} files ({shape}): find {find['seconds']:.2f} s, convnext "
            f"{ours['seconds']:.2f} s ({ours['seconds'] / find['seconds']:.2f}x find; target "
            f"<= 2x), peak RSS {ours['peak_mb']:.0f} MB (target < 500)",
            flush=True,
        )
    one = root / "one"
    one.mkdir()
    shutil.copy(next(p for p in sorted(SAMPLES.iterdir()) if p.suffix == ".png"), one)
    classify = [*CLI, "classify", *common(model), "--workers", "0"]
    for name, count, shape in trees:
        base = min(first_record_seconds([*classify, str(one)]) for _ in range(2))
        tree = min(first_record_seconds([*classify, str(root / name), "-r"]) for _ in range(2))
        print(
            f"first record, {count} files ({shape}): {tree:.2f} s against {base:.2f} s for one "
            f"image: the listing delays it {tree - base:.2f} s (the whole listing takes "
            f"{list_s[name]:.2f} s)",
            flush=True,
        )


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
    single = root / "single"
    single.mkdir()
    shutil.copy(photo, single / "one.png")
    cli = [*CLI, "classify", *common(model)]
    one = measured([*cli, str(single), "-o", str(root / "one.jsonl")])
    resumed = measured([*cli, str(folder), "-o", str(output), "--resume"])
    assert f"{count} inputs already done" in resumed["stderr"], resumed["stderr"]
    print(
        f"resume: {count} done inputs skipped in {resumed['seconds']:.2f} s against "
        f"{one['seconds']:.2f} s for a one-image run: overhead "
        f"{resumed['seconds'] - one['seconds']:.2f} s (target < 2 s)",
        flush=True,
    )


def resume_memory(root: Path, model: Path, count: int) -> None:
    """A resume that keeps `count` records (of other inputs) and adds one."""
    output = root / "kept.jsonl"
    preds = json.dumps([{"label": "tabby, tabby cat", "index": 281, "score": 0.5}] * 5)
    with open(output, "w") as out:
        for n in range(count):
            out.write(
                f'{{"path": "/photos/{n // 1000:04d}/{n:07d}.jpg", "predictions": {preds}}}\n'
            )
    size = output.stat().st_size
    single = root / "single"
    cli = [*CLI, "classify", *common(model), "--workers", "0", str(single)]
    one = measured([*cli, "-o", str(root / "one.jsonl")])
    resumed = measured([*cli, "-o", str(output), "--resume"])
    assert "inputs already done" in resumed["stderr"], resumed["stderr"]
    print(
        f"resume keeping {count} records ({size / 1e6:.0f} MB): {resumed['seconds']:.2f} s, peak "
        f"RSS {resumed['peak_mb']:.0f} MB, against {one['seconds']:.2f} s and "
        f"{one['peak_mb']:.0f} MB for a one-image run: +{resumed['peak_mb'] - one['peak_mb']:.0f} "
        "MB",
        flush=True,
    )


def datasets(root: Path, model: Path, count: int, rounds: int, workers: str | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from factories import make_shard

    photos = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    loose, copy = root / "loose", root / "loose-copy"
    loose.mkdir()
    copy.mkdir()
    members, blobs = [], []
    for n in range(count):
        source = photos[n % len(photos)]
        data = source.read_bytes()
        (loose / f"{n:06d}{source.suffix}").write_bytes(data)
        (copy / f"{n:06d}{source.suffix}").write_bytes(data)
        members.append((f"{n:06d}{source.suffix}", data))
        blobs.append(data)
    shard = make_shard(root / "photos.tar", members)
    table = root / "photos.parquet"
    pq.write_table(pa.table({"image": blobs}), table, row_group_size=256, use_dictionary=False)
    cli = [*CLI, "classify", *common(model), *(["--workers", workers] if workers else [])]
    sources = [
        ("loose files", loose),
        ("tar shard", shard),
        ("parquet", table),
        ("loose copy", copy),  # the noise floor
    ]
    runs = {name: ([*cli, str(source)], None) for name, source in sources}
    whole, steady = interleaved_rates(runs, count, rounds)

    def ratios(rates: dict[str, list[float]], name: str) -> str:
        best, median = best_and_median(rates, name, "loose files")
        return f"{max(rates[name]):6.1f} img/s ({best:.2f}x loose; median {median:.2f}x)"

    for name, _ in sources:
        print(
            f"{count} images as {name:12s} whole run {ratios(whole, name)}, "
            f"first to last record {ratios(steady, name)}",
            flush=True,
        )


Rates = dict[str, list[float]]


def interleaved_rates(
    runs: Mapping[str, tuple[list[str], dict[str, str] | None]], count: int, rounds: int
) -> tuple[Rates, Rates]:
    """Images/s of each named (command, environment) over `rounds` interleaved rounds, each
    going first in turn: (whole run, between the first and the last record)."""
    names = list(runs)
    whole: Rates = {name: [] for name in names}
    steady: Rates = {name: [] for name in names}
    for n in range(rounds):
        turn = n % len(names)
        for name in names[turn:] + names[:turn]:
            first, last, end, records = record_times(*runs[name])
            assert records == count, (name, records)
            whole[name].append(count / end)
            # between the first and the last record: the first batch's records come together
            steady[name].append((count - 8) / (last - first))
    return whole, steady


def best_and_median(rates: Rates, name: str, peer: str) -> tuple[float, float]:
    """`name` against `peer`: the ratio of their best rates, and of their medians."""
    best = max(rates[name]) / max(rates[peer])
    return best, statistics.median(rates[name]) / statistics.median(rates[peer])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--flat-files", type=int, default=None, help="default: --files")
    parser.add_argument("--resume-records", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", default=None, help="--workers for the dataset runs")
    parser.add_argument("--skip-listing", action="store_true")
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--skip-datasets", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="long-runs-", dir="/tmp"))
    try:
        print(f"{os.cpu_count()} CPUs", flush=True)
        model = tiny_model(root)
        if not args.skip_listing:
            flat = args.files if args.flat_files is None else args.flat_files
            listing(root, args.files, flat, model)
        if not args.skip_resume:
            resume_overhead(root, model)
            resume_memory(root, model, args.resume_records)
        if not args.skip_datasets:
            datasets(root, model, args.images, args.rounds, args.workers)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
