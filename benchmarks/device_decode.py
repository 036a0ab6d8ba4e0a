"""The device-decode path's resize: one batched resize + centre crop against image by image.

``--decode gpu`` resizes a batch's decoded JPEGs (all sizes) with
``PreprocessSpec.resize_and_crop_batch`` (two batched matmuls on the zero-padded crop
windows) instead of a Python loop of ``resize_and_crop``.  This times both, in the same go,
on `--count` decoded ImageNet-size photos (400-1024 px on the long side, 224 bicubic spec),
and prints the per-image and batched times, their ratio and the largest pixel difference.
On the CPU the per-image path is torch's uint8 kernel; on CUDA (``--device cuda``) both run
in float32 on the device, which is where the batched path is meant to pay.  Usage:

    python benchmarks/device_decode.py                  # CPU, 64 photos, 5 repeats
    python benchmarks/device_decode.py --device cuda --count 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    import torch
    from assets import make_photos

    from convnext_cli.imaging.decoding import decode_file
    from convnext_cli.imaging.preprocess import PreprocessSpec

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    folder = make_photos(REPO / "bench-out" / f"photos-{args.count}", args.count)
    paths = sorted(folder.glob("*.jpg"))[: args.count]
    images = [decode_file(p).to(device) for p in paths]
    spec = PreprocessSpec.imagenet(224)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def per_image() -> torch.Tensor:
        return torch.stack([spec.resize_and_crop(image) for image in images])

    def batched() -> torch.Tensor:
        out = spec.resize_and_crop_batch(images)
        assert out is not None
        return out

    times: dict[str, list[float]] = {"per_image": [], "batched": []}
    outputs = {}
    with torch.inference_mode():
        for name, run in (("per_image", per_image), ("batched", batched)):
            outputs[name] = run()  # warm-up
        for _ in range(args.repeats):
            for name, run in (("per_image", per_image), ("batched", batched)):
                sync()
                start = time.perf_counter()
                run()
                sync()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    difference = (outputs["batched"].int() - outputs["per_image"].int()).abs().max()
    longest = [max(image.shape[-2:]) for image in images]
    report = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "images": len(images),
        "long_sides": f"{min(longest)}-{max(longest)} px",
        "per_image_ms": round(median["per_image"] * 1000, 1),
        "batched_ms": round(median["batched"] * 1000, 1),
        "batched_over_per_image": round(median["batched"] / median["per_image"], 2),
        "max_pixel_difference": int(difference),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
