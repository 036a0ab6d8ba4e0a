"""The distributed engine at scale: driver memory and time to the first part, by size.

For each size (10k, 100k, 1M inputs by default), a Parquet file of that many tiny PNG rows
(one 8x8 image, repeated, with a ``key`` column of distinct ids; row groups of 100,000) is
labelled with ``--engine ray -o DIR --format parquet`` (the tiny test model, CPU):

- time to the first part: from the start of the process to the first ``*.status.json`` in
  DIR (a unit whose part is complete);
- the driver's peak RSS (``VmHWM`` of the ``convnext`` process, Ray's own processes not
  counted), read when the run has gone on ``--after`` seconds past its first part; the run
  is then stopped with SIGTERM (a 1M-row run need not finish: its driver's memory does not
  grow with the rows done, only with the units listed);
- the rows done by then (the ``rows`` of the status files), and so rows/s once started.

The local engine beside it: the same file to ``-o out.parquet`` for the same time, its peak
RSS and the rows it wrote (its Parquet parts).

    python benchmarks/ray_scale.py                         # 10k, 100k, 1M
    python benchmarks/ray_scale.py --sizes 10000,10000000  # 10M: stopped after its first parts
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tiny_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 40)).save(out, format="PNG")
    return out.getvalue()


def make_rows(path: Path, count: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = tiny_png()
    with pq.ParquetWriter(path, pa.schema([("key", pa.string()), ("png", pa.binary())])) as out:
        for start in range(0, count, 100_000):
            stop = min(count, start + 100_000)
            keys = pa.array([f"img-{n:09d}" for n in range(start, stop)])
            out.write_table(pa.table({"key": keys, "png": [png] * (stop - start)}))


def make_model(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests" / "support"))
    import factories

    return factories.save_hf(factories.hf_model(num_labels=1000, seed=1), root / "tiny")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rows_done(out: Path) -> int:
    total = 0
    for status in out.glob("*.status.json"):
        try:
            total += json.loads(status.read_text())["rows"]
        except (OSError, ValueError, KeyError):
            pass
    return total


def local_rows(out: Path) -> int:
    import pyarrow.parquet as pq

    total = 0
    for part in [out, *out.parent.glob(f".{out.name}*/*.parquet")]:
        try:
            total += pq.ParquetFile(part).metadata.num_rows
        except Exception:
            pass
    return total


def run(cmd: list[str], done, after: float, limit: float, warm: float) -> dict[str, float]:
    """Start ``cmd``; wait for its first rows (``done()`` above 0), then ``after`` seconds
    more; read the peak RSS; SIGTERM; wait.  The steady rate is the rows done from ``warm``
    seconds past the first part to the end of the window, over that time."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    peak = 0.0
    mark: tuple[float, int] | None = None  # (time, rows) `warm` seconds past the first part
    while child.poll() is None and time.monotonic() - started < limit:
        peak = max(peak, peak_rss_mb(child.pid))
        now = time.monotonic() - started
        if first is None and done() > 0:
            first = now
        if first is not None and mark is None and now > first + warm:
            mark = (now, done())
        if first is not None and now > first + after:
            break
        time.sleep(0.2)
    end = time.monotonic() - started
    rows = done()
    if child.poll() is None:
        peak = max(peak, peak_rss_mb(child.pid))
        child.send_signal(signal.SIGTERM)
    child.communicate(timeout=120)
    # a run that ended before the window (all its rows done by then): its rate since the first
    since, before = mark if mark is not None and rows > mark[1] else (first or 0.0, 0)
    return {
        "first": first or float("nan"),
        "peak": peak,
        "rows": max(rows, done()),
        "rate": (rows - before) / max(1e-9, end - since),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--after", type=float, default=30.0, help="seconds past the first part")
    parser.add_argument("--limit", type=float, default=600.0, help="seconds per run at most")
    parser.add_argument(
        "--warm", type=float, default=0.0, help="seconds past the first part before the rate"
    )
    parser.add_argument("--no-local", action="store_true", help="the Ray engine only")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ray-scale-"))
    model = make_model(root)
    base = [sys.executable, "-m", "convnext_cli", "classify", "-m", str(model)]
    base += ["--device", "cpu", "--dtype", "float32", "-k", "1", "-q"]
    print("| inputs | engine | driver peak RSS | first part | rows done | steady rows/s |")
    print("|-------:|--------|----------------:|-----------:|----------:|----------------:|")
    for size in (int(s) for s in args.sizes.split(",")):
        rows = root / f"rows-{size}.parquet"
        make_rows(rows, size)
        out = root / f"out-{size}"
        got = run(
            [*base, str(rows), "--engine", "ray", "-o", str(out), "--format", "parquet"],
            lambda out=out: rows_done(out),
            args.after,
            args.limit,
            args.warm,
        )
        print(
            f"| {size:,} | ray | {got['peak']:.0f} MB | {got['first']:.1f} s | {got['rows']:,} "
            f"| {got['rate']:.0f} |",
            flush=True,
        )
        if args.no_local:
            continue
        target = root / f"local-{size}.parquet"
        got = run(
            [*base, str(rows), "-o", str(target)],
            lambda target=target: local_rows(target),
            args.after,
            args.limit,
            args.warm,
        )
        print(
            f"| {size:,} | local | {got['peak']:.0f} MB | {got['first']:.1f} s "
            f"| {got['rows']:,} | {got['rate']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
