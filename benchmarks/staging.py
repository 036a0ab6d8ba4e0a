"""Decoded batches per second with and without the shared-memory staging ring, in one go.

Decodes the same JPEGs (made offline: the sample photos at ImageNet-like sizes) through
``decoded_batches`` with 4 decode workers, alternately with the staging ring
(engine/staging.py: crops written into a shared slot, the batch a view of it) and with the
pickle path (``staging=False``: stacked, pickled through the pipe, unpickled and
concatenated in the main process).  The consumer does what the Runner does to a batch on
the CPU side: reads its pixels once and releases it.  Each mode runs `--repeats` times,
interleaved; the best rate of each is kept.

Reports, per mode: batches/s and images/s over the steady state (from the first batch
out, so worker start-up is not in it), and the main process's CPU seconds per 1,000 images
(what the one Python main thread spends receiving batches: the cost the ring removes).

    python benchmarks/staging.py                      # 2,000 JPEGs of ~500 px, batch 64
    python benchmarks/staging.py --count 2000 --long-side 256 --batch 128
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convnext_cli.engine.pipeline import decoded_batches  # noqa: E402
from convnext_cli.imaging.preprocess import PreprocessSpec  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def make_jpegs(folder: Path, count: int, long_side: int, seed: int = 0) -> list[str]:
    """`count` JPEGs, cut from the sample photos and scaled to `long_side` pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources = [
        Image.open(p).convert("RGB")
        for p in sorted((REPO / "sample_images").iterdir())
        if p.suffix.lower() in (".jpg", ".png")
    ]
    distinct = []
    for i in range(min(count, 64)):  # 64 distinct files, repeated: decoding cost is the same
        image = sources[i % len(sources)]
        w, h = image.size
        cw, ch = rng.randint(w * 2 // 3, w), rng.randint(h * 2 // 3, h)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = image.crop((left, top, left + cw, top + ch))
        scale = long_side / max(crop.size)
        crop = crop.resize(
            (round(crop.width * scale), round(crop.height * scale)), Image.Resampling.BICUBIC
        )
        path = folder / f"src{i:03d}.jpg"
        crop.save(path, quality=90)
        distinct.append(path.read_bytes())
    paths = []
    for n in range(count):
        path = folder / f"{n:05d}.jpg"
        path.write_bytes(distinct[n % len(distinct)])
        paths.append(str(path))
    return paths


def one_run(paths: list[str], batch: int, workers: int, staging: bool) -> dict[str, float]:
    spec = PreprocessSpec(shortest_edge=224)
    started = time.perf_counter()
    first = None
    batches = images = 0
    checksum = 0
    for decoded in decoded_batches(paths, spec, batch, workers, staging=staging):
        if first is None:
            first = time.perf_counter()
            cpu_first = time.process_time()
            first_images = sum(len(p) for p, _ in decoded.groups)
        for _, pixels in decoded.groups:
            checksum += int(pixels[:, :, ::64, ::64].sum())  # touch the pixels, as a copy would
        images += sum(len(p) for p, _ in decoded.groups)
        batches += 1
        decoded.release()
    ended = time.perf_counter()
    cpu_ended = time.process_time()
    assert first is not None
    steady = max(1e-9, ended - first)
    return {
        "batches_per_s": (batches - 1) / steady,
        "images_per_s": (images - first_images) / steady,
        "startup_s": first - started,
        "main_cpu_s_per_1000": 1000 * (cpu_ended - cpu_first) / max(1, images - first_images),
        "images": images,
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--long-side", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.count, args.long_side)
        runs: dict[str, list[dict[str, float]]] = {"ring": [], "pickle": []}
        for _ in range(args.repeats):
            for mode in ("ring", "pickle"):
                runs[mode].append(one_run(paths, args.batch, args.workers, mode == "ring"))
    best = {mode: max(rs, key=lambda r: r["batches_per_s"]) for mode, rs in runs.items()}
    assert best["ring"]["checksum"] == best["pickle"]["checksum"], "the two paths differ"
    ratio = best["ring"]["batches_per_s"] / best["pickle"]["batches_per_s"]
    cpu_ratio = best["pickle"]["main_cpu_s_per_1000"] / max(
        1e-9, best["ring"]["main_cpu_s_per_1000"]
    )
    print(
        f"{args.count} JPEGs, long side {args.long_side} px -> 224x224, batch {args.batch}, "
        f"{args.workers} workers, best of {args.repeats}"
    )
    print(f"{'':8} {'batches/s':>10} {'images/s':>10} {'start-up s':>11} {'main CPU s/1k':>14}")
    for mode, r in best.items():
        print(
            f"{mode:8} {r['batches_per_s']:10.2f} {r['images_per_s']:10.1f} "
            f"{r['startup_s']:11.2f} {r['main_cpu_s_per_1000']:14.3f}"
        )
    print(f"ring / pickle: {ratio:.2f}x batches/s, {cpu_ratio:.1f}x less main-process CPU")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": None}, "best": best, "ratio": ratio})
        )


if __name__ == "__main__":
    main()
