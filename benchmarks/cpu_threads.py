"""The model's CPU threads chosen by measuring (``convnext_cli/engine/thread_tuner.py``) against a
fixed count, on runs bound by decoding and runs bound by the model.

Each run is a fresh ``convnext classify`` child (float32 on the CPU, JSON lines to a pipe),
timed whole and between its first and last record.  The peer is the same command with
``OMP_NUM_THREADS`` set to torch's own thread count: the same threads, but a count the user
chose, which the tool leaves alone (and, on a CPU with fewer than 4 cores, decodes in turns
with the model, as every run did before the tuner).  Rounds interleave the two, each going
first in turn; the best and the median of each are compared.

Workloads:

- ``decode-bound``: the tests' tiny model on 600 sample photos (decoding is nearly all of
  the work);
- ``large photos``: ConvNeXt-T's architecture on 160 photos of 12 megapixels (decoding a
  camera's photo costs more than the model's pass over it);
- ``model-bound``: ConvNeXt-T's architecture on 160 photos of ordinary sizes (400-1024 px).

    python benchmarks/cpu_threads.py --rounds 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))
sys.path.insert(0, str(REPO / "benchmarks"))
CLI = [sys.executable, "-m", "convnext_cli", "classify"]


def large_photos(folder: Path, count: int) -> Path:
    """`count` 4000x3000 JPEGs (the sample photos scaled up)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in (REPO / "sample_images").iterdir() if p.suffix in (".jpg", ".png"))
    made = []
    for n, source in enumerate(sources):
        path = folder / f"large_{n:02d}.jpg"
        large = Image.open(source).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
        large.save(path, quality=90)
        made.append(path)
    for n in range(len(made), count):
        os.link(made[n % len(made)], folder / f"large_{n:05d}.jpg")
    return folder


def repeated_samples(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in (REPO / "sample_images").iterdir() if p.suffix in (".jpg", ".png"))
    for n in range(count):
        source = photos[n % len(photos)]
        (folder / f"{n:06d}{source.suffix}").write_bytes(source.read_bytes())
    return folder


def compare(name: str, model: Path, photos: Path, count: int, rounds: int) -> None:
    import torch
    from long_runs import best_and_median, interleaved_rates

    cmd = [*CLI, "-m", str(model), "--device", "cpu", "--dtype", "float32", "--format", "jsonl"]
    cmd.append(str(photos))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    runs = {
        "tuned": (cmd, base),
        "fixed": (cmd, dict(base, OMP_NUM_THREADS=str(torch.get_num_threads()))),
    }
    whole, steady = interleaved_rates(runs, count, rounds)

    def ratio(rates: dict[str, list[float]]) -> str:
        best, median = best_and_median(rates, "tuned", "fixed")
        return (
            f"{max(rates['tuned']):6.1f} against {max(rates['fixed']):6.1f} img/s "
            f"({best:.2f}x; median {median:.2f}x)"
        )

    print(
        f"{name:13s} {count} images: whole run {ratio(whole)}; "
        f"first to last record {ratio(steady)}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--only", choices=["decode-bound", "large photos", "model-bound"], action="append"
    )
    args = parser.parse_args()
    import assets
    import factories

    with tempfile.TemporaryDirectory(prefix="convnext-threads-") as tmp:
        root = Path(tmp)
        jobs = {
            "decode-bound": lambda: (
                factories.save_hf(factories.hf_model(num_labels=1000, seed=1), root / "tiny"),
                repeated_samples(root / "samples", 600),
                600,
            ),
            "large photos": lambda: (
                assets.make_checkpoint(root / "convnext-t"),
                large_photos(root / "large", 160),
                160,
            ),
            "model-bound": lambda: (
                assets.make_checkpoint(root / "convnext-t"),
                assets.make_photos(root / "photos", 160),
                160,
            ),
        }
        for name, make in jobs.items():
            if args.only and name not in args.only:
                continue
            model, photos, count = make()
            compare(name, model, photos, count, args.rounds)


if __name__ == "__main__":
    main()
