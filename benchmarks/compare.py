"""This tool against its peers, in one go, on the same checkpoint and the same photos.

End to end (whole process: interpreter start, imports, model load, decode, preprocess,
model, top-5), each run as a fresh subprocess and timed from outside:

- ``convnext classify DIR`` (JSON lines to /dev/null);
- transformers' ``pipeline("image-classification")`` over the same paths, same batch size;
- timm's ``convnext_tiny`` with its own eval transforms and a DataLoader.

Model only (in this process, random input, batch 32, channels_last for both): our model
against timm's ``convnext_tiny`` and transformers' ``ConvNextForImageClassification``.

Ratios are against the peers measured in the same run.  Usage:

    python benchmarks/compare.py                    # makes the checkpoint and 100 photos
    python benchmarks/compare.py --dtypes float32 --repeats 3 --json bench-out/compare.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

TRANSFORMERS_SCRIPT = """
import glob, sys, torch
from transformers import pipeline
folder, model, batch, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
paths = sorted(glob.glob(folder + "/*.jpg"))
pipe = pipeline("image-classification", model=model, device="cpu", dtype=getattr(torch, dtype))
count = sum(1 for _ in pipe(paths, batch_size=batch, top_k=5))
assert count == len(paths), count
"""

TIMM_SCRIPT = """
import glob, sys, torch, timm
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader
folder, batch, dtype, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
dtype = getattr(torch, dtype)
paths = sorted(glob.glob(folder + "/*.jpg"))
model = timm.create_model("convnext_tiny", pretrained=False).eval()
model = model.to(dtype=dtype, memory_format=torch.channels_last)
transform = create_transform(**resolve_data_config({}, model=model))
class Photos(torch.utils.data.Dataset):
    def __len__(self):
        return len(paths)
    def __getitem__(self, i):
        return transform(Image.open(paths[i]).convert("RGB"))
loader = DataLoader(Photos(), batch_size=batch, num_workers=workers)
count = 0
with torch.inference_mode():
    for x in loader:
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        model(x).float().softmax(-1).topk(5)
        count += len(x)
assert count == len(paths), count
"""


def end_to_end(args: argparse.Namespace, dtype: str) -> dict[str, dict]:
    from proc import timed

    from convnext_cli.engine.pipeline import default_workers

    count = len(list(args.photos.glob("*.jpg")))
    workers = default_workers(count, args.batch_size, "cpu")
    py = sys.executable
    commands = {
        "convnext classify": [
            py,
            "-m",
            "convnext_cli",
            "classify",
            str(args.photos),
            "-m",
            str(args.model),
            "-b",
            str(args.batch_size),
            "--dtype",
            dtype,
            "--device",
            "cpu",
            "--format",
            "jsonl",
            "-o",
            os.devnull,
        ],
        "transformers pipeline": [
            py,
            "-c",
            TRANSFORMERS_SCRIPT,
            str(args.photos),
            str(args.model),
            str(args.batch_size),
            dtype,
        ],
        "timm + DataLoader": [
            py,
            "-c",
            TIMM_SCRIPT,
            str(args.photos),
            str(args.batch_size),
            dtype,
            str(workers),
        ],
    }
    results: dict[str, dict] = {name: {"seconds": [], "rss_mb": []} for name in commands}
    for _ in range(args.repeats):  # interleaved, so drift hits every contender alike
        for name, cmd in commands.items():
            seconds, rss = timed(cmd)
            results[name]["seconds"].append(seconds)
            results[name]["rss_mb"].append(rss)
            print(
                f"  {dtype:9s} {name:22s} {seconds:6.2f} s  peak RSS {rss:5.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    for record in results.values():
        record["best_s"] = min(record["seconds"])
        record["images_per_s"] = count / record["best_s"]
    return results


def model_only(dtype_name: str, batch: int, iters: int) -> dict[str, float]:
    import timm
    import torch
    import transformers

    from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint

    dtype = getattr(torch, dtype_name)
    checkpoint = load_checkpoint(str(ARGS.model))
    ours = build_model(checkpoint, "cpu", dtype)
    peer_timm = timm.create_model("convnext_tiny", pretrained=False).eval()
    peer_timm = peer_timm.to(dtype=dtype, memory_format=torch.channels_last)
    peer_hf = transformers.ConvNextForImageClassification.from_pretrained(ARGS.model).eval()
    peer_hf = peer_hf.to(dtype=dtype, memory_format=torch.channels_last)
    pixels = torch.randn(batch, 3, 224, 224).to(dtype)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    contenders = {
        "convnext_cli": lambda: ours(pixels),
        "timm": lambda: peer_timm(pixels),
        "transformers": lambda: peer_hf(pixel_values=pixels).logits,
    }
    best = {name: float("inf") for name in contenders}
    with torch.inference_mode():
        for fn in contenders.values():
            fn()
        for _ in range(iters):  # interleaved
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: batch / seconds for name, seconds in best.items()}


def main() -> None:
    global ARGS
    from assets import make_checkpoint, make_photos

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "bench-out" / "convnext-tiny")
    parser.add_argument("--photos", type=Path, default=REPO / "bench-out" / "photos")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="model-only timed iterations")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    ARGS = args = parser.parse_args()
    make_checkpoint(args.model)
    make_photos(args.photos, args.count)

    report: dict = {"batch_size": args.batch_size, "photos": args.count, "e2e": {}, "model": {}}
    dtypes = args.dtypes.split(",")
    if not args.skip_e2e:  # first, while this process is small and the machine quiet
        for dtype in dtypes:
            print(f"end to end, {dtype}", file=sys.stderr, flush=True)
            report["e2e"][dtype] = end_to_end(args, dtype)
    for dtype in dtypes:
        print(f"model only, {dtype}, batch {args.batch_size}", file=sys.stderr, flush=True)
        report["model"][dtype] = model_only(dtype, args.batch_size, args.iters)

    print(f"\n{args.count} photos, batch {args.batch_size}, {os.cpu_count()} CPU cores")
    for dtype, results in report["e2e"].items():
        ours = results["convnext classify"]["best_s"]
        print(f"\nend to end, whole process, {dtype}")
        for name, record in results.items():
            ratio = record["best_s"] / ours
            print(
                f"  {name:22s} {record['best_s']:7.2f} s  {record['images_per_s']:6.1f} img/s"
                f"  peak RSS {max(record['rss_mb']):5.0f} MiB  time / ours {ratio:5.2f}x"
            )
    for dtype, rates in report["model"].items():
        print(f"\nmodel only, {dtype}, batch {args.batch_size}, channels_last")
        for name, rate in rates.items():
            ratio = rates["convnext_cli"] / rate
            print(f"  {name:22s} {rate:7.1f} img/s   ours / this {ratio:5.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
