"""The GPU check: what matters most first, each section on disk as soon as it ends.

    python benchmarks/gpu_check.py                      # on a CUDA machine, 480 s budget
    python benchmarks/gpu_check.py --budget 300         # a shorter window
    python benchmarks/gpu_check.py --max-autotune       # also the max-autotune row (minutes)
    python benchmarks/gpu_check.py --smoke --budget 90  # the same code on the CPU, small sizes

A GPU window is short (about 15 minutes of device time, start-up included), so the check
runs its sections in order of value and never past ``--budget`` seconds (counted from the
script's start):

1. environment (device, driver, versions; ``cuda:N`` refused) and, on CUDA, the CUDA-marked
   tests (seconds);
2. parity: device float32 against CPU float32 (top-5), bfloat16 and float16 against float32
   (logit cosine, top-1 agreement), ConvNeXt-T;
3. ConvNeXt-T bfloat16 batch 256 model-only, eager (timm-comparable);
4. end to end from JPEG files: CPU decoding, then GPU decoding (on the CPU, torchvision's
   decoder stands in), each over a steady window of 20 batches after the pipeline's fill;
5. one default-compiled ConvNeXt-T bfloat16 batch 256 row;
6. then, while the budget lasts: the device decoder's pixels and the hard JPEGs, ConvNeXt V2-T
   (parity, eager and compiled), the dtype x batch-size sweep, model+copy rows,
   reduce-overhead (CUDA graphs); max-autotune only with ``--max-autotune``; Ray only with
   ``--ray``.

A section whose estimate does not fit the time left is skipped with its reason; one that
runs past the budget is stopped there (recorded as such).  After every section the JSON and
the Markdown report are rewritten whole (``--out``: ``gpu_check.json``, ``gpu_check.md``),
so a window that closes at any minute leaves every finished section on disk.  Output is
unbuffered.  The Markdown starts with the block to copy into the README (also printed at the
end).  Every compiled row carries ``compile_status`` (see ``engine/benchmark.py``
``CompileWatch``): a row that fell back to eager says so and is never compared with a
target.  Exit status 1 when a parity check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STARTED = time.monotonic()
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]

import torch  # noqa: E402
from PIL import Image  # noqa: E402

TARGETS = {  # issue 18, on an H100/H200
    "model bf16 compiled batch 256 img/s": 25_000,
    "end-to-end gpu decode img/s": 6_000,
    "end-to-end cpu decode (16 cores) img/s": 3_000,
    "V2-T / V1-T eager bf16 b256": 0.8,
}
DEFAULT_BUDGET = 480.0
README_MARK = "<!-- gpu_check: copy this block into the README's GPU section -->"


class BudgetReached(Exception):
    """The budget ran out while a section was running."""


@dataclass
class Section:
    name: str
    run: Callable[[Context], dict[str, Any]]
    seconds: tuple[float, float]  # its estimate: (on CUDA, in smoke mode)
    when: Callable[[Context], str | None] = lambda ctx: None  # a reason not to run, or None


class Context:
    """What the sections share: the options, the device, the inputs (made when first
    asked for), the report so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.device = "cuda" if self.cuda else "cpu"
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.batch = 256 if self.cuda else 8  # the timm-comparable batch (smaller in smoke)
        self.warmup, self.iters = (5, 20) if self.cuda else (1, 3)
        self.failures: list[str] = []
        self.entry: dict[str, Any] = {}  # the running section's record, filled as it goes
        self._models: dict[str, Path] = {}
        self._photos: list[Path] | None = None

    def checkpoint(self, name: str) -> Path:
        """convnext-t or convnextv2-t: ConvNeXt-T shapes on CUDA, atto in smoke mode."""
        import assets

        if name not in self._models:
            size = "tiny" if self.cuda else "atto"
            v2 = name.startswith("convnextv2")
            seed = 1 if v2 else 0
            self._models[name] = assets.make_checkpoint(self.work / name, size, v2=v2, seed=seed)
        return self._models[name]

    def photos(self) -> list[Path]:
        """JPEGs cut from the sample photos (the benchmark cycles them as it needs)."""
        import assets

        if self._photos is None:
            count = 96 if self.cuda else 12
            self._photos = sorted(assets.make_photos(self.work / "photos", count).glob("*.jpg"))
        return self._photos

    def left(self) -> float:
        """Seconds left for sections (a few kept for writing the report and exiting)."""
        return self.args.budget - (time.monotonic() - STARTED) - (10 if self.cuda else 5)

    def rows(self, rows: list[dict[str, Any]]) -> None:
        self.entry.setdefault("rows", []).extend(rows)

    def parity(self, name: str, ok: bool, **figures: Any) -> None:
        self.entry.setdefault("checks", []).append({"check": name, "ok": ok, **figures})
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {figures}")
        if not ok:
            self.failures.append(name)


# --- building blocks ----------------------------------------------------------------------


def runner_for(ckpt: Path, device: str, dtype: str, decode: str = "cpu", mode: str | None = None):
    from convnext_cli.engine.loading import RunOptions, load_runner

    options = RunOptions(device=device, dtype=dtype, decode=decode, compile=mode is not None,
                         compile_mode=mode or "default")  # fmt: skip
    return load_runner(str(ckpt), options, on_note=lambda n: print("  note:", n)).runner


def classify(runner, paths: list[Path], batch: int, workers: int | None = 0) -> list:
    return [r for b in runner.classify([str(p) for p in paths], top_k=5, batch_size=batch,
                                       workers=workers) for r in b]  # fmt: skip


def logits(runner, paths: list[Path]) -> torch.Tensor:
    from convnext_cli.imaging.decoding import decode_file

    pixels = torch.stack([runner.spec.resize_and_crop(decode_file(str(p))) for p in paths])
    with torch.inference_mode():
        return runner.logits_fn(runner._to_input(pixels)).float().cpu()


def row_dict(model: str, row: Any, **extra: Any) -> dict[str, Any]:
    figures = {"model": model, **extra, **asdict(row), "comparable": row.comparable}
    print(
        f"  {model} {row.mode} {row.dtype} b{row.batch_size} {row.compile_mode}: "
        f"{row.images_per_s} img/s (p50 {row.p50_ms} ms, {row.compile_status}"
        + (f", {row.compiles} compiled" if row.compile_mode != "eager" else "")
        + (
            f", steady {row.steady_images_per_s} over {row.steady_batches} batches"
            if row.mode == "end-to-end"
            else ""
        )  # fmt: skip
        + f", GPU {na(row.gpu_util_pct)}%)"
    )
    return figures


def model_rows(ctx: Context, model: str, dtype: str, sizes: tuple[int, ...], mode: str | None,
               copy_rows: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Model-only rows of one runner (one sweep: dynamo reset for it)."""
    from convnext_cli.engine.benchmark import BenchmarkRunner, SweepOptions

    runner = runner_for(ctx.checkpoint(model), ctx.device, dtype, mode=mode)
    options = SweepOptions(batch_sizes=sizes, warmup=ctx.warmup, iters=ctx.iters,
                           copy_rows=copy_rows)  # fmt: skip
    bench = BenchmarkRunner(runner, options)
    bench.watch.reset(len(sizes) + 2)  # as sweep() does; rows recorded one by one
    rows = []
    for size in sizes:
        rows.append(row_dict(model, bench.time_model(size)))
        ctx.rows(rows[-1:])
        if copy_rows:
            rows.append(row_dict(model, bench.time_model(size, with_copy=True)))
            ctx.rows(rows[-1:])
    return rows


def na(value: Any) -> Any:
    return "n/a" if value is None else value


# --- the sections, in order of value ---------------------------------------------------------


def environment(ctx: Context) -> dict[str, Any]:
    from convnext_cli.engine.device import resolve_device
    from convnext_cli.errors import DeviceError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info: dict[str, Any] = {
        "device": ctx.device,
        "device_name": torch.cuda.get_device_name() if ctx.cuda else "CPU (smoke mode)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if ctx.cuda else None,
        "gpus": count,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "nvml": _has_nvml(),
    }
    with contextlib.suppress(Exception):
        import torchvision

        info["torchvision"] = torchvision.__version__
    try:
        resolve_device(f"cuda:{count}")
        refused = False
    except DeviceError:
        refused = True
    ctx.parity(f"cuda:{count} refused ({count} GPU(s) present)", refused)
    print(f"  {info}")
    return {"info": info}


def _has_nvml() -> bool:
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_tests(ctx: Context) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "cuda",
               "tests/engine/test_cuda.py"]  # fmt: skip
    run_subprocess(ctx, "CUDA-marked tests", command, int(min(120, ctx.left() - 5)))
    return {}


def parity(model: str) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        ckpt, photos = ctx.checkpoint(model), ctx.photos()[: 16 if ctx.cuda else 4]
        cpu, dev = runner_for(ckpt, "cpu", "float32"), runner_for(ckpt, ctx.device, "float32")
        a, b = classify(cpu, photos, 8), classify(dev, photos, 8)
        same = sum([p.index for p in x.predictions] == [p.index for p in y.predictions]
                   for x, y in zip(a, b, strict=True))  # fmt: skip
        ctx.parity(f"{model}: {ctx.device} float32 top-5 == cpu float32",
                   same == len(a), equal=same, photos=len(a))  # fmt: skip
        reference = logits(cpu, photos)
        for dtype in ("bfloat16", "float16") if ctx.cuda else ("bfloat16",):
            got = logits(runner_for(ckpt, ctx.device, dtype), photos)
            cos = float(torch.nn.functional.cosine_similarity(got, reference, dim=1).min())
            top1 = float((got.argmax(1) == reference.argmax(1)).float().mean())
            ctx.parity(f"{model}: {ctx.device} {dtype} logits vs float32", cos > 0.99,
                       min_cosine=round(cos, 5), top1_agreement=round(top1, 4))  # fmt: skip
        return {}

    return run


def eager_row(model: str) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        model_rows(ctx, model, "bfloat16", (ctx.batch,), None)
        return {}

    return run


def compiled_row(model: str, mode: str = "default") -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        model_rows(ctx, model, "bfloat16", (ctx.batch,), mode)
        return {}

    return run


def end_to_end(decode: str) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        from convnext_cli.engine.benchmark import BenchmarkRunner, SweepOptions

        runner = runner_for(ctx.checkpoint("convnext-t"), ctx.device, "auto",
                            decode=decode if ctx.cuda else "cpu")  # fmt: skip
        if decode == "gpu" and not ctx.cuda:
            runner.jpeg_on_device = True  # torchvision's CPU decoder stands in for nvjpeg
        steady = 20 if ctx.cuda else 6
        options = SweepOptions(batch_sizes=(ctx.batch,), warmup=0, iters=1, steady_batches=steady,
                               images=tuple(map(str, ctx.photos())))  # fmt: skip
        row = BenchmarkRunner(runner, options).time_end_to_end(ctx.batch)
        ctx.rows([row_dict("convnext-t", row, decode=decode)])
        return {}

    return run


def decoders(ctx: Context) -> dict[str, Any]:
    """The device decoder's pixels against Pillow (decode, then resize); hard JPEGs give the
    same records through both decoders."""
    from convnext_cli.imaging import gpu_jpeg
    from convnext_cli.imaging.decoding import decode_file

    ckpt, photos = ctx.checkpoint("convnext-t"), ctx.photos()
    spec = runner_for(ckpt, "cpu", "float32").spec
    dev = torch.device(ctx.device)
    decoder_diff = resize_diff = 0
    for path in photos[: 16 if ctx.cuda else 4]:
        pil = decode_file(str(path))
        (ours,) = gpu_jpeg.decode([gpu_jpeg.EncodedJpeg(path.read_bytes())], dev)
        if ours is None:
            continue
        decoder_diff = max(decoder_diff, int((ours.cpu().int() - pil.int()).abs().max()))
        batch = spec.resize_and_crop_batch([pil.to(dev)])
        on_device = (batch[0] if batch is not None else spec.resize_and_crop(pil.to(dev))).cpu()
        resize_diff = max(resize_diff, int((on_device.int() - spec.resize_and_crop(pil).int())
                                           .abs().max()))  # fmt: skip
    print(f"  device decoder vs Pillow: decoder {decoder_diff}, resize {resize_diff} grey levels")
    hard = hard_jpegs(ctx.work / "hard", photos[0])
    cpu = runner_for(ckpt, ctx.device, "float32", decode="cpu")
    on_dev = runner_for(ckpt, ctx.device, "float32", decode="gpu" if ctx.cuda else "cpu")
    on_dev.jpeg_on_device = True
    a, b = classify(cpu, hard, 4, workers=1), classify(on_dev, hard, 4, workers=1)
    same = all((x.error is None) == (y.error is None)
               and [p.index for p in x.predictions][:1] == [p.index for p in y.predictions][:1]
               for x, y in zip(a, b, strict=True))  # fmt: skip
    ctx.parity("hard JPEGs: same records through both decoders", same,
               files=len(hard), errors=sum(x.error is not None for x in a))  # fmt: skip
    pixels = {"decoder_max_abs": decoder_diff, "resize_max_abs": resize_diff}
    return {"decoder_pixels": pixels}


def sweep_rows(ctx: Context) -> dict[str, Any]:
    """ConvNeXt-T over dtypes x batch sizes, eager, with model+copy rows."""
    sizes = (1, 32, 256) if ctx.cuda else (1, 4)
    for dtype in ("float32", "bfloat16", "float16") if ctx.cuda else ("float32", "bfloat16"):
        model_rows(ctx, "convnext-t", dtype, sizes, None, copy_rows=True)
    return {}


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


def ray_replica(ctx: Context) -> dict[str, Any]:
    photos = ctx.photos()[:16]
    command = [sys.executable, "-m", "convnext_cli", "classify", *map(str, photos), "-m",
               str(ctx.checkpoint("convnext-t")), "--engine", "ray", "--replicas", "1",
               "--device", ctx.device, "-o", str(ctx.work / "ray.jsonl")]  # fmt: skip
    run_subprocess(ctx, "Ray, one replica", command, int(min(180, ctx.left() - 5)))
    return {}


def run_subprocess(ctx: Context, name: str, command: list[str], timeout: int) -> None:
    start = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=max(1, timeout), env=env)  # fmt: skip
        ok, tail = done.returncode == 0, (done.stdout + done.stderr)[-400:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout} s"
    ctx.parity(name, ok, seconds=round(time.monotonic() - start, 1),
               tail=tail.strip()[-200:])  # fmt: skip


def cuda_only(ctx: Context) -> str | None:
    return None if ctx.cuda else "CUDA only"


def flag(name: str, why: str) -> Callable[[Context], str | None]:
    return lambda ctx: None if getattr(ctx.args, name) else why


SECTIONS = [
    Section("environment", environment, (5, 1)),
    Section("CUDA tests", cuda_tests, (60, 0), cuda_only),
    Section("parity, convnext-t", parity("convnext-t"), (40, 10)),
    Section("model, convnext-t bf16 eager", eager_row("convnext-t"), (25, 8)),
    Section("end to end, CPU decode", end_to_end("cpu"), (60, 20)),
    Section("end to end, GPU decode", end_to_end("gpu"), (60, 20)),
    Section("model, convnext-t bf16 compiled", compiled_row("convnext-t"), (120, 60)),
    Section("decoders", decoders, (30, 15)),
    Section("model, convnextv2-t bf16 eager", eager_row("convnextv2-t"), (25, 8)),
    Section("parity, convnextv2-t", parity("convnextv2-t"), (40, 10)),
    Section("model, convnextv2-t bf16 compiled", compiled_row("convnextv2-t"), (120, 60)),
    Section("model sweep, convnext-t (dtypes x batch sizes, eager, model+copy)", sweep_rows,
            (90, 30)),  # fmt: skip
    Section("model, convnext-t bf16 reduce-overhead", compiled_row("convnext-t", "reduce-overhead"),
            (120, 0), cuda_only),  # fmt: skip
    Section("model, convnext-t bf16 max-autotune", compiled_row("convnext-t", "max-autotune"),
            (400, 600), flag("max_autotune", "max-autotune takes minutes: --max-autotune")),
    Section("Ray, one replica", ray_replica, (90, 60), flag("ray", "--ray runs it")),
]  # fmt: skip


# --- running within the budget, writing as it goes ------------------------------------------


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise BudgetReached in this (the main) thread once `seconds` have passed."""

    def expired(signum: int, frame: Any) -> None:
        raise BudgetReached

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(ctx: Context, section: Section) -> dict[str, Any]:
    estimate = section.seconds[0 if ctx.cuda else 1]
    entry: dict[str, Any] = {"section": section.name, "estimate_s": estimate}
    ctx.entry = entry
    reason = section.when(ctx)
    left = ctx.left()
    left = max(0.0, left)
    if reason is None and estimate > left:
        reason = f"would overrun the budget: needs about {estimate:.0f} s, {left:.0f} s left"
    if reason is not None:
        print(f"[skip] {section.name}: {reason}")
        return {**entry, "status": "skipped", "reason": reason}
    print(f"[{time.monotonic() - STARTED:5.0f} s] {section.name} (about {estimate:.0f} s)")
    start = time.monotonic()
    try:
        with deadline(left):
            entry.update(section.run(ctx))
        entry["status"] = "done"
    except BudgetReached:
        entry.update(status="stopped", reason="the budget ran out while it ran")
    except Exception as exc:  # one section's failure is its record, not the check's end
        entry.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
        ctx.failures.append(f"{section.name}: {type(exc).__name__}")
    entry["seconds"] = round(time.monotonic() - start, 1)
    print(f"  -> {entry['status']} in {entry['seconds']} s")
    return entry


def all_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for s in report["sections"] for row in s.get("rows", [])]


def best(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(found, key=lambda r: r["images_per_s"], default=None)


def targets(report: dict[str, Any], batch: int) -> list[dict[str, Any]]:
    """Each target against the comparable row that measures it (None where there is none:
    never a row that fell back to eager)."""
    rows = all_rows(report)
    model = dict(mode="model", dtype="bfloat16", batch_size=batch)
    compiled = best([r for r in rows if r["comparable"]], model="convnext-t",
                    compile_mode="default", **model)  # fmt: skip
    gpu = best(rows, mode="end-to-end", decode="gpu")
    cpu = best(rows, mode="end-to-end", decode="cpu")
    v1 = best(rows, model="convnext-t", compile_mode="eager", **model)
    v2 = best(rows, model="convnextv2-t", compile_mode="eager", **model)
    got = [
        compiled and compiled["images_per_s"],
        gpu and gpu["steady_images_per_s"],
        cpu and cpu["steady_images_per_s"],
        round(v2["images_per_s"] / v1["images_per_s"], 3) if v1 and v2 else None,
    ]
    return [{"target": t, "wanted": w, "got": g}
            for (t, w), g in zip(TARGETS.items(), got, strict=True)]  # fmt: skip


def readme_block(report: dict[str, Any]) -> list[str]:
    """The lines to copy into the README: the GPU, the versions, the figures that matter."""
    info = report.get("environment", {})
    lines = [
        README_MARK,
        f"GPU check ({report['date']}): {info.get('device_name', '?')}, torch "
        f"{info.get('torch', torch.__version__)}, CUDA {info.get('cuda')}, {info.get('cores')} "
        f"cores; budget {report['budget_s']:.0f} s, {report['elapsed_s']:.0f} s used.",
        "",
        "| figure | got | target |",
        "|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {na(t['got'])} | {t['wanted']} |")
    if not report["targets"]:
        lines.append("| (smoke mode on the CPU: no GPU figures, nothing compared) | | |")
    skipped = [s["section"] for s in report["sections"] if s["status"] != "done"]
    if skipped:
        lines.append("")
        lines.append(f"Not measured in this window: {', '.join(skipped)}.")
    return lines


def row_line(r: dict[str, Any]) -> str:
    mode = f"{r['mode']} {r['decode']}" if "decode" in r else r["mode"]
    steady = r["steady_images_per_s"] if r["mode"] == "end-to-end" else ""
    cells = [r["model"], mode, r["dtype"], r["compile_mode"], r["compile_status"],
             r["batch_size"], r["images_per_s"], steady, r["p50_ms"], na(r["device_peak_mb"]),
             na(r["gpu_util_pct"])]  # fmt: skip
    return "| " + " | ".join(map(str, cells)) + " |"


def markdown(report: dict[str, Any]) -> str:
    lines = [*readme_block(report), "", f"# gpu_check on {report['device']}", ""]
    lines += ["| section | status | seconds | note |", "|---|---|---|---|"]
    for s in report["sections"]:
        lines.append(f"| {s['section']} | {s['status']} | {s.get('seconds', '')} | "
                     f"{s.get('reason', '')} |")  # fmt: skip
    checks = [c for s in report["sections"] for c in s.get("checks", [])]
    if checks:
        lines += ["", "| check | ok | figures |", "|---|---|---|"]
        for c in checks:
            shown = {k: v for k, v in c.items() if k not in ("check", "ok", "tail")}
            figures = ", ".join(f"{k}={v}" for k, v in shown.items())
            lines.append(f"| {c['check']} | {'yes' if c['ok'] else '**no**'} | {figures} |")
    rows = all_rows(report)
    if rows:
        header = ["model", "mode", "dtype", "compile", "status", "batch", "img/s",
                  "steady img/s", "p50 ms", "device peak MB", "GPU %"]  # fmt: skip
        lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += [row_line(r) for r in rows]
    lines += [
        "",
        "Model-only rows at batch 256, bfloat16, channels_last are timm-comparable (the sweep of "
        "timm's benchmark.py); p50 from CUDA events on CUDA, img/s from the wall clock.  A "
        "compiled row whose status is not `compiled` ran eagerly and is compared with nothing.  "
        "End to end: steady img/s over the steady window after the pipeline's fill.  GPU %: "
        "NVML readings at least 1 s into the row (n/a for shorter rows or without NVML).",
    ]
    return "\n".join(lines) + "\n"


def write(ctx: Context, report: dict[str, Any]) -> None:
    """The JSON and the Markdown, rewritten whole (a file moved into place: never half)."""
    report["elapsed_s"] = round(time.monotonic() - STARTED, 1)
    report["failures"] = ctx.failures
    # the targets are a GPU's: in smoke mode (the CPU, atto shapes) nothing is compared
    report["targets"] = targets(report, ctx.batch) if ctx.cuda else []
    for name, text in (("gpu_check.json", json.dumps(report, indent=1)),
                       ("gpu_check.md", markdown(report))):  # fmt: skip
        part = ctx.args.out / f".{name}.part"
        part.write_text(text)
        os.replace(part, ctx.args.out / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET, help="seconds in all, from the start"
    )
    parser.add_argument("--smoke", action="store_true", help="on the CPU, small sizes")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "gpu_check")
    parser.add_argument("--max-autotune", action="store_true", help="also the max-autotune row")
    parser.add_argument("--ray", action="store_true", help="also Ray with one replica")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args)
    report: dict[str, Any] = {
        "device": ctx.device, "budget_s": args.budget, "sections": [],
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip
    print(f"README: the block at the top of {args.out / 'gpu_check.md'} (rewritten after every "
          "section, printed again at the end) goes into the README's GPU section")  # fmt: skip
    print(f"gpu_check on {ctx.device}, budget {args.budget:.0f} s; inputs in {ctx.work}")
    for section in SECTIONS:
        entry = run_section(ctx, section)
        report["sections"].append(entry)
        if section.run is environment and "info" in entry:
            report["environment"] = entry["info"]
        write(ctx, report)
    print("\n".join(readme_block(report)))
    print(f"report: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'} "
          f"({report['elapsed_s']} s)")  # fmt: skip
    if ctx.failures:
        print(f"FAILED: {', '.join(ctx.failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
