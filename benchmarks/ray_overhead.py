"""What running on Ray costs on one machine: the same folder through both engines.

For each size (100 and 1,000 images by default: the sample photos copied over and over
into a temporary folder), two child processes, run one after the other:

- local: ``python -m convnext_cli classify DIR -m CKPT --format jsonl`` (today's engine);
- ray:   the same command with ``--engine ray`` (a local Ray started and shut down by the
         run).

Reported per engine: the whole-process wall time (Python start, imports, model load, Ray's
start included), the ratio ray / local, and the steady-state images/s: the records after
the first batch divided by the time from the first record to the last, both timed here as
the child's lines arrive on its stdout.

    python benchmarks/ray_overhead.py                      # a tiny random checkpoint
    python benchmarks/ray_overhead.py --model tiny-random  # convnext-tiny's shape, random
    python benchmarks/ray_overhead.py --model path/to/ckpt --sizes 100,1000 --dtype float32
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_images"


def photo_folder(root: Path, count: int) -> Path:
    """`count` copies of the sample photos (named apart), in a folder of their own."""
    folder = root / f"photos-{count}"
    folder.mkdir()
    photos = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    for i in range(count):
        source = photos[i % len(photos)]
        shutil.copyfile(source, folder / f"{i:05d}-{source.name}")
    return folder


def make_model(kind: str, root: Path) -> Path:
    if kind == "tiny":  # the tests' tiny V1 (2-block stages, 8-32 channels, 1000 labels)
        sys.path.insert(0, str(REPO / "tests" / "support"))
        import factories

        folder = root / "tiny"
        return factories.save_hf(factories.hf_model(num_labels=1000, seed=1), folder)
    if kind == "tiny-random":  # convnext-tiny's architecture with random weights
        sys.path.insert(0, str(REPO / "benchmarks"))
        from assets import make_checkpoint

        return make_checkpoint(root / "convnext-tiny-random", "tiny")
    return Path(kind)


def run(cmd: list[str], count: int) -> tuple[float, float, int]:
    """(whole-process seconds, steady-state images/s, records) of one child."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True
    )
    assert proc.stdout is not None
    stamps: list[float] = []
    for _line in proc.stdout:
        stamps.append(time.perf_counter())
    err = proc.stderr.read() if proc.stderr else ""
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0 or len(stamps) != count:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}, {len(stamps)} records):\n{err}")
    # the first batch's records arrive together: steady state starts after them
    first = stamps[0]
    after = [t for t in stamps if t - first > 1e-3]
    steady = len(after) / (stamps[-1] - first) if after and stamps[-1] > first else float("nan")
    return wall, steady, len(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny | tiny-random | a checkpoint")
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--replicas", default="auto")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ray-overhead-", dir="/tmp"))
    try:
        model = make_model(args.model, root)
        print(
            f"model {args.model}, device {args.device}, dtype {args.dtype}, {os.cpu_count()} CPUs",
            flush=True,
        )
        header = f"{'images':>7} {'engine':>6} {'wall s':>8} {'ratio':>6} {'steady img/s':>13}"
        print(header)
        for count in [int(s) for s in args.sizes.split(",")]:
            folder = photo_folder(root, count)
            local_cmd = [
                sys.executable,
                "-m",
                "convnext_cli",
                "classify",
                str(folder),
                "-m",
                str(model),
                "--format",
                "jsonl",
                "--device",
                args.device,
                "--dtype",
                args.dtype,
            ]
            ray_cmd = [*local_cmd, "--engine", "ray"]
            if args.replicas != "auto":
                ray_cmd += ["--replicas", args.replicas]
            local_wall, local_steady, _ = run(local_cmd, count)
            print(
                f"{count:>7} {'local':>6} {local_wall:>8.1f} {1.0:>6.2f} {local_steady:>13.1f}",
                flush=True,
            )
            ray_wall, ray_steady, _ = run(ray_cmd, count)
            print(
                f"{count:>7} {'ray':>6} {ray_wall:>8.1f} {ray_wall / local_wall:>6.2f} "
                f"{ray_steady:>13.1f}  ({ray_steady / local_steady:.0%} of local)",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
