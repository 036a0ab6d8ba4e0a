"""One script that checks the GPU path: parity, decoders, throughput, failures.

    python benchmarks/gpu_check.py                # on a CUDA machine (about 8 minutes)
    python benchmarks/gpu_check.py --smoke        # the same steps on the CPU, small sizes

It builds its own inputs (ConvNeXt-T and ConvNeXt V2-T shaped checkpoints with random,
real-valued weights; JPEGs cut from the sample photos; hard JPEGs made with Pillow), then:

1. parity: device float32 against CPU float32 (top-5 equal, embedding cosine), bfloat16 and
   float16 against float32 (logit cosine, top-1 agreement);
2. decoders: the device JPEG decoder against Pillow, pixel differences split into the
   decoder's and the resize's; hard JPEGs (progressive, 4:4:4, 4:2:2, grey, CMYK, EXIF 2-8,
   corrupt) through both decoders give the same records;
3. model-only throughput (dtypes x batch sizes, eager and compiled) and ``model+copy``; on
   CUDA also ConvNeXt-T bf16 batch 256 compiled with ``max-autotune`` and ``reduce-overhead``
   (CUDA graphs); the timm-comparable rows (batch 256, bf16, channels_last, eager and
   compiled: what timm's ``benchmark.py`` runs) are labelled as such in the Markdown;
4. end to end from JPEG files with CPU decoding (and GPU decoding on CUDA); every timed row
   carries the benchmark's device figures on CUDA (``device_peak_mb``: the GPU's used memory
   at its peak, nvjpeg and the CUDA context included; ``gpu_util_pct``: mean
   ``torch.cuda.utilization``, ``None`` without ``nvidia-ml-py``), sampled by
   :class:`convnext_cli.engine.benchmark.DeviceSampler`;
5. failures: ``cuda:1`` refused on a one-GPU machine (any missing device on the CPU);
6. on CUDA: the CUDA-marked tests, and Ray with one replica (``--ray``).

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` and exits 1 when a parity
check fails.  On the CPU (``--smoke``, or no CUDA) the sizes are small and the compiled rows
are left out unless ``--compile``; the GPU targets are printed only on CUDA.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

TARGETS = {  # issue 18, on an H100/H200
    "model bf16 compiled batch 256 img/s": 25_000,
    "end-to-end gpu decode img/s": 6_000,
    "end-to-end cpu decode (16 cores) img/s": 3_000,
}


class Check:
    """Collected results: each parity check passes or fails, with its figures."""

    def __init__(self) -> None:
        self.sections: dict[str, Any] = {}
        self.failures: list[str] = []

    def parity(self, name: str, ok: bool, **figures: Any) -> None:
        self.sections.setdefault("parity", []).append({"check": name, "ok": ok, **figures})
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {figures}", flush=True)
        if not ok:
            self.failures.append(name)


def hard_jpegs(folder: Path, source: Path) -> list[Path]:
    """JPEGs that exercise the decoders: progressive, subsampling, grey, CMYK, EXIF, corrupt."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.open(source).convert("RGB")
    files: dict[str, bytes] = {}

    def save(img: Image.Image, **kw: Any) -> bytes:
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=90, **kw)
        return out.getvalue()

    files["progressive.jpg"] = save(image, progressive=True)
    files["444.jpg"] = save(image, subsampling=0)
    files["422.jpg"] = save(image, subsampling=1)
    files["grey.jpg"] = save(image.convert("L"))
    files["cmyk.jpg"] = save(image.convert("CMYK"))
    for orientation in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[f"exif{orientation}.jpg"] = save(image, exif=exif.tobytes())
    files["truncated.jpg"] = files["444.jpg"][: len(files["444.jpg"]) // 3]
    files["garbage.jpg"] = b"\xff\xd8\xff" + os.urandom(2000) + b"\xff\xd9"
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def runner_for(
    checkpoint: Path,
    device: str,
    dtype: str,
    decode: str = "cpu",
    compile_: bool = False,
    compile_mode: str = "default",
):
    from convnext_cli.engine.loading import RunOptions, load_runner

    options = RunOptions(device=device, dtype=dtype, decode=decode, compile=compile_,
                         compile_mode=compile_mode)  # fmt: skip
    return load_runner(str(checkpoint), options, on_note=lambda n: print("  note:", n)).runner


def classify(runner, paths: list[Path], batch: int, workers: int | None = 0) -> list:
    return [r for b in runner.classify([str(p) for p in paths], top_k=5, batch_size=batch,
                                       workers=workers) for r in b]  # fmt: skip


def embed(runner, paths: list[Path], batch: int) -> list:
    return [r for b in runner.embed([str(p) for p in paths], batch_size=batch, workers=0)
            for r in b]  # fmt: skip


def logits(runner, paths: list[Path]) -> torch.Tensor:
    from convnext_cli.imaging.decoding import decode_file

    pixels = torch.stack([runner.spec.resize_and_crop(decode_file(str(p))) for p in paths])
    with torch.inference_mode():
        return runner.logits_fn(runner._to_input(pixels)).float().cpu()


def check_parity(check: Check, name: str, ckpt: Path, device: str, photos: list[Path]) -> None:
    cpu = runner_for(ckpt, "cpu", "float32")
    dev = runner_for(ckpt, device, "float32")
    a, b = classify(cpu, photos, 8), classify(dev, photos, 8)
    same_top5 = sum([p.index for p in x.predictions] == [p.index for p in y.predictions]
                    for x, y in zip(a, b, strict=True))  # fmt: skip
    check.parity(f"{name}: {device} float32 top-5 == cpu float32", same_top5 == len(a),
                 equal=same_top5, photos=len(a))  # fmt: skip
    ea, eb = embed(cpu, photos, 8), embed(dev, photos, 8)
    cos = min(float(torch.nn.functional.cosine_similarity(x.embedding, y.embedding, dim=0))
              for x, y in zip(ea, eb, strict=True))  # fmt: skip
    check.parity(f"{name}: {device} float32 embeddings", cos > 0.9999, min_cosine=round(cos, 6))
    reference = logits(cpu, photos)
    for dtype in ("bfloat16", "float16"):
        try:
            low = runner_for(ckpt, device, dtype)
        except Exception as exc:  # float16 on a CPU build without it
            print(f"  {dtype} skipped: {exc}")
            continue
        got = logits(low, photos)
        cos = float(torch.nn.functional.cosine_similarity(got, reference, dim=1).min())
        top1 = float((got.argmax(1) == reference.argmax(1)).float().mean())
        check.parity(f"{name}: {device} {dtype} logits vs float32", cos > 0.99,
                     min_cosine=round(cos, 5), top1_agreement=round(top1, 4))  # fmt: skip


def check_decoders(check: Check, device: str, photos: list[Path], hard: list[Path], ckpt: Path):
    """Pixel differences of the device decoder (decode alone, then resize alone)."""
    from convnext_cli.imaging import gpu_jpeg
    from convnext_cli.imaging.decoding import decode_file

    spec = runner_for(ckpt, "cpu", "float32").spec
    dev = torch.device(device)
    decoder_diff = resize_diff = 0
    for path in photos[: 16 if device != "cpu" else 4]:
        pil = decode_file(str(path))  # (3, H, W) uint8, Pillow
        (ours,) = gpu_jpeg.decode([gpu_jpeg.EncodedJpeg(path.read_bytes())], dev)
        if ours is None:
            continue
        decoder_diff = max(decoder_diff, int((ours.cpu().int() - pil.int()).abs().max()))
        # the device path's resize: one batched resize + crop (image by image where it has none)
        batch = spec.resize_and_crop_batch([pil.to(dev)])
        on_device = (batch[0] if batch is not None else spec.resize_and_crop(pil.to(dev))).cpu()
        resize_diff = max(resize_diff, int((on_device.int() - spec.resize_and_crop(pil).int())
                                           .abs().max()))  # fmt: skip
    check.sections["decoder_pixels"] = {"decoder_max_abs": decoder_diff,
                                        "resize_max_abs": resize_diff}  # fmt: skip
    print(f"  device decoder vs Pillow: decoder {decoder_diff}, resize {resize_diff} grey levels")
    cpu = runner_for(ckpt, device, "float32", decode="cpu")
    on_dev = runner_for(ckpt, device, "float32", decode="gpu" if device != "cpu" else "cpu")
    if device == "cpu":
        on_dev.jpeg_on_device = True  # torchvision's CPU decoder stands in for nvjpeg
    a, b = classify(cpu, hard, 4, workers=1), classify(on_dev, hard, 4, workers=1)
    same = all((x.error is None) == (y.error is None)
               and [p.index for p in x.predictions][:1] == [p.index for p in y.predictions][:1]
               for x, y in zip(a, b, strict=True))  # fmt: skip
    check.parity("hard JPEGs: same records through both decoders", same,
                 files=len(hard), errors=sum(x.error is not None for x in a))  # fmt: skip


def throughput(check: Check, name: str, ckpt: Path, device: str, args: argparse.Namespace):
    from convnext_cli.engine.benchmark import BenchmarkRunner, SweepOptions

    rows = []
    dtypes = ["float32", "bfloat16"] + (["float16"] if device != "cpu" else [])
    for compiled in [False] + ([True] if args.compile or device != "cpu" else []):
        for dtype in dtypes:
            runner = runner_for(ckpt, device, dtype, compile_=compiled)
            options = SweepOptions(batch_sizes=tuple(args.batches), warmup=args.warmup,
                                   iters=args.iters, copy_rows=True)  # fmt: skip
            for row in BenchmarkRunner(runner, options).sweep().rows:
                rows.append({"model": name, "compiled": compiled, **asdict(row)})
                print(
                    f"  {name} {row.mode} {dtype} b{row.batch_size} "
                    f"{'compiled' if compiled else 'eager'}: {row.images_per_s} img/s"
                )
    if name == "convnext-t":
        rows += compile_mode_rows(name, ckpt, device, args)
    check.sections.setdefault("model_rows", []).extend(rows)


def compile_mode_rows(name: str, ckpt: Path, device: str, args: argparse.Namespace) -> list:
    """ConvNeXt-T bf16 batch 256 compiled with max-autotune and with reduce-overhead (CUDA
    graphs): CUDA only (on the CPU the graphs do not exist and autotuning takes minutes)."""
    from convnext_cli.engine.benchmark import BenchmarkRunner, SweepOptions

    if device == "cpu":
        print("  max-autotune and reduce-overhead rows: CUDA only, skipped in smoke mode")
        return []
    rows = []
    for mode in ("max-autotune", "reduce-overhead"):
        runner = runner_for(ckpt, device, "bfloat16", compile_=True, compile_mode=mode)
        options = SweepOptions(batch_sizes=(256,), warmup=args.warmup, iters=args.iters,
                               copy_rows=False)  # fmt: skip
        for row in BenchmarkRunner(runner, options).sweep().rows:
            rows.append({"model": name, "compiled": True, **asdict(row)})
            print(f"  {name} {row.mode} bfloat16 b256 {mode}: {row.images_per_s} img/s")
        del runner
    return rows


def timm_comparable(row: dict[str, Any]) -> bool:
    """The rows that match timm's benchmark.py sweep: model-only, batch 256, bf16,
    channels_last (the runner's default), eager or compiled in the default mode."""
    return (row["mode"] == "model" and row["batch_size"] == 256 and row["dtype"] == "bfloat16"
            and row.get("compile_mode", "eager") in ("eager", "default"))  # fmt: skip


def na(value: Any) -> Any:
    return "n/a" if value is None else value


def end_to_end(check: Check, ckpt: Path, device: str, photos: list[Path], args) -> None:
    from convnext_cli.engine.benchmark import BenchmarkRunner, SweepOptions

    rows = []
    for decode in ["cpu"] + (["gpu"] if device != "cpu" else []):
        runner = runner_for(ckpt, device, "auto", decode=decode)
        options = SweepOptions(batch_sizes=(args.e2e_batch,), warmup=0, iters=1,
                               images=tuple(map(str, photos)))  # fmt: skip
        # the benchmark's DeviceSampler reads utilisation and used memory during the row
        row = BenchmarkRunner(runner, options).time_end_to_end(args.e2e_batch)
        rows.append({"decode": decode, **asdict(row)})
        print(
            f"  end to end, {decode} decoding: {row.images_per_s} img/s "
            f"(steady {row.steady_images_per_s}, start-up {row.startup_s} s, "
            f"GPU {na(row.gpu_util_pct)}%, device peak {na(row.device_peak_mb)} MB)"
        )
    check.sections["end_to_end"] = rows


def failures(check: Check, device: str) -> None:
    from convnext_cli.engine.device import resolve_device
    from convnext_cli.errors import DeviceError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = f"cuda:{count}"
    try:
        resolve_device(name)
        refused = False
    except DeviceError:
        refused = True
    check.parity(f"{name} refused ({count} GPU(s) present)", refused)


def run_subprocess(check: Check, name: str, command: list[str], timeout: int) -> None:
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        ok, tail = done.returncode == 0, (done.stdout + done.stderr)[-400:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout} s"
    check.parity(name, ok, seconds=round(time.monotonic() - start, 1), tail=tail.strip()[-200:])


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# gpu_check on {report['device_name']} ({report['device']})", ""]
    lines += ["| check | ok | figures |", "|---|---|---|"]
    for p in report["sections"].get("parity", []):
        figures = ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("check", "ok", "tail"))
        lines.append(f"| {p['check']} | {'yes' if p['ok'] else '**no**'} | {figures} |")
    lines += ["", "| model | mode | dtype | compile | batch | img/s | p50 ms | peak MB | "
              "device peak MB | GPU % | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["sections"].get("model_rows", []):
        label = "timm-comparable" if timm_comparable(r) else ""
        lines.append(f"| {r['model']} | {r['mode']} | {r['dtype']} | "
                     f"{r.get('compile_mode', r['compiled'])} | {r['batch_size']} | "
                     f"{r['images_per_s']} | {r['p50_ms']} | {r['peak_memory_mb']} | "
                     f"{na(r.get('device_peak_mb'))} | {na(r.get('gpu_util_pct'))} | "
                     f"{label} |")  # fmt: skip
    lines += [
        "",
        "timm-comparable: batch 256, bfloat16, channels_last, model only (the sweep "
        "of timm's benchmark.py); p50 from CUDA events on CUDA, img/s from the wall clock; "
        "device peak MB: the GPU's used memory (CUDA context, allocator cache, nvjpeg).",
    ]
    lines += ["", "| decode | img/s | steady img/s | start-up s | device peak MB | GPU % |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["sections"].get("end_to_end", []):
        lines.append(f"| {r['decode']} | {r['images_per_s']} | {r['steady_images_per_s']} | "
                     f"{r['startup_s']} | {na(r.get('device_peak_mb'))} | "
                     f"{na(r.get('gpu_util_pct'))} |")  # fmt: skip
    if report.get("targets"):
        lines += ["", "| target | wanted | got |", "|---|---|---|"]
        for t in report["targets"]:
            lines.append(f"| {t['target']} | {t['wanted']} | {t['got']} |")
    return "\n".join(lines) + "\n"


def targets(check: Check) -> list[dict[str, Any]]:
    rows = check.sections.get("model_rows", [])
    best = max((r["images_per_s"] for r in rows if r["model"] == "convnext-t" and r["compiled"]
                and r["dtype"] == "bfloat16" and r["batch_size"] == 256
                and r["mode"] == "model"), default=None)  # fmt: skip
    e2e = {r["decode"]: r["steady_images_per_s"] for r in check.sections.get("end_to_end", [])}
    got = [best, e2e.get("gpu"), e2e.get("cpu")]
    pairs = zip(TARGETS.items(), got, strict=True)
    out = [{"target": t, "wanted": w, "got": g} for (t, w), g in pairs]
    for t in out:
        print(f"  target {t['target']}: wanted {t['wanted']}, got {t['got']}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the CPU, small sizes")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "gpu_check")
    parser.add_argument("--compile", action="store_true", help="compiled rows on the CPU too")
    parser.add_argument("--ray", action="store_true", help="also Ray with one replica")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    args.batches = [1, 32, 256] if cuda else [1, 4]
    args.warmup, args.iters = (5, 20) if cuda else (0, 2)
    args.e2e_batch = 256 if cuda else 8
    count = 1000 if cuda else 16
    started = time.monotonic()

    import assets

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    print(f"inputs in {work}", flush=True)
    # ConvNeXt-T shapes on CUDA; in smoke mode the atto shape (same blocks, 2-2-6-2 x 40-320),
    # so that every step runs on 2 CPU cores in minutes
    size = "tiny" if cuda else "atto"
    models = {
        "convnext-t": assets.make_checkpoint(work / "convnext-t", size),
        "convnextv2-t": assets.make_checkpoint(work / "convnextv2-t", size, v2=True, seed=1),
    }
    print(f"checkpoints: {size} shapes, random weights", flush=True)
    photos = sorted(assets.make_photos(work / "photos", count).glob("*.jpg"))
    hard = hard_jpegs(work / "hard", photos[0])
    check = Check()
    parity_photos = photos[: 32 if cuda else 6]
    for name, ckpt in models.items():
        print(f"parity, {name}", flush=True)
        check_parity(check, name, ckpt, device, parity_photos)
    print("decoders", flush=True)
    check_decoders(check, device, photos, hard, models["convnext-t"])
    for name, ckpt in models.items():
        print(f"throughput, {name}", flush=True)
        throughput(check, name, ckpt, device, args)
    print("end to end", flush=True)
    end_to_end(check, models["convnext-t"], device, photos, args)
    failures(check, device)
    if cuda:
        pytest = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/engine/test_cuda.py"]
        run_subprocess(check, "CUDA-marked tests", pytest, 240)
    if args.ray:
        ray = [sys.executable, "-m", "convnext_cli", "classify", *map(str, photos[:16]), "-m",
               str(models["convnext-t"]), "--engine", "ray", "--replicas", "1",
               "--device", device, "-o", str(work / "ray.jsonl")]  # fmt: skip
        run_subprocess(check, "Ray, one replica", ray, 180)
    report = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else "CPU (smoke mode)",
        "torch": torch.__version__,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "seconds": round(time.monotonic() - started, 1),
        "sections": check.sections,
        "failures": check.failures,
        "targets": targets(check) if cuda else [],
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(f"report: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'} "
          f"({report['seconds']} s)")  # fmt: skip
    if check.failures:
        print(f"FAILED: {', '.join(check.failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
