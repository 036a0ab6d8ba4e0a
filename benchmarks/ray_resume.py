"""Resume by unit after ``kill -9`` of the driver: exact records, and the resumed half's time.

A Parquet file of N tiny PNG rows (as ray_scale.py makes it) is labelled three times with
``--engine ray -o DIR --format parquet`` (the tiny model, CPU):

1. a clean run into DIR1: its whole time T;
2. a run into DIR2, killed with SIGKILL (the driver only; its Ray's processes then) once
   the status files count about half the rows;
3. ``--resume`` into DIR2: its time R, then DuckDB's ``count(*)``, ``count(DISTINCT path)``.

Reported: T, R, R / (T / 2) and the counts (both must be N).

    python benchmarks/ray_resume.py --rows 100000
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from processes import descendants, kill_all  # noqa: E402
from ray_scale import REPO, make_model, make_rows, rows_done  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    import duckdb

    root = Path(tempfile.mkdtemp(prefix="ray-resume-"))
    model = make_model(root)
    rows = root / "rows.parquet"
    make_rows(rows, args.rows)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "convnext_cli", "classify", str(rows), "-m", str(model)]
    base += ["--device", "cpu", "--dtype", "float32", "-k", "1", "-q", "--engine", "ray"]
    base += ["--format", "parquet", "-o"]
    started = time.monotonic()
    subprocess.run([*base, str(root / "clean")], env=env, check=False)
    clean = time.monotonic() - started
    out = root / "killed"
    child = subprocess.Popen([*base, str(out)], env=env)
    while child.poll() is None and rows_done(out) < args.rows // 2:
        time.sleep(0.5)
    family = descendants(child.pid)
    child.send_signal(signal.SIGKILL)
    child.wait()
    kill_all(family[1:])  # its Ray's processes then
    kept = rows_done(out)
    started = time.monotonic()
    subprocess.run([*base, str(out), "--resume"], env=env, check=False)
    resumed = time.monotonic() - started
    query = f"select count(*), count(distinct path) from read_parquet('{out}/*.parquet')"
    ((total, distinct),) = duckdb.sql(query).fetchall()
    print(f"rows {args.rows:,}: clean run {clean:.1f} s; killed with {kept:,} rows in parts;")
    print(f"resumed in {resumed:.1f} s = {resumed / (clean / 2):.2f}x half the clean run;")
    print(f"DuckDB: count(*) {total:,}, count(DISTINCT path) {distinct:,}")


if __name__ == "__main__":
    main()
