"""Peak memory of `convnext classify` on a folder and on a folder ten times larger.

The pipeline streams (decode workers -> batches -> writer), so memory should be bounded by
the batch, not by the number of inputs.  Usage:

    python benchmarks/memory_scaling.py            # 100 and 1000 photos, bfloat16 auto
    python benchmarks/memory_scaling.py --small 100 --factor 10 --dtype float32
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    from assets import make_checkpoint, make_photos
    from proc import timed

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "bench-out" / "convnext-tiny")
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--format", default="jsonl")
    args = parser.parse_args()
    make_checkpoint(args.model)
    results = {}
    for count in (args.small, args.small * args.factor):
        photos = make_photos(REPO / "bench-out" / f"photos-{count}", count)
        cmd = [
            sys.executable,
            "-m",
            "convnext_cli",
            "classify",
            str(photos),
            "-m",
            str(args.model),
            "-b",
            str(args.batch_size),
            "--dtype",
            args.dtype,
            "--device",
            "cpu",
            "--format",
            args.format,
            "-o",
            os.devnull,
        ]
        seconds, peak = timed(cmd)
        results[count] = peak
        print(f"{count:6d} photos: {seconds:7.1f} s, peak RSS {peak:7.1f} MiB", flush=True)
    small, large = results.values()
    print(f"growth for {args.factor}x the photos: {100 * (large - small) / small:+.1f}%")


if __name__ == "__main__":
    main()
