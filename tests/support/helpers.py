"""What many test files need, defined once: running the CLI in-process, reading its JSON
lines, saving weights, giving every parameter of a model real values, and running the CLI
in a subprocess with its peak memory (:func:`run_with_peak`).

(Checkpoint builders live in :mod:`factories` and :mod:`layout_sources`; terminal runs in
:mod:`pty_helpers`.)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from convnext_cli.cli import app


def invoke(*args: object, stdin: str | bytes | None = None, workers: int | None = None) -> Any:
    """``convnext ARGS`` in this process (``--workers N`` appended when given)."""
    extra = [] if workers is None else ["--workers", str(workers)]
    return CliRunner().invoke(app, [str(a) for a in args] + extra, input=stdin)


def jsonl(text: str | bytes) -> list[dict]:
    """The records of JSON-lines output (bytes: names that are not UTF-8 kept as escapes)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# Two runs whose batch composition or thread count may differ (another -b, --workers, -r
# adding an image to a batch, the thread tuner, another processor) agree on labels, indices,
# paths and counts exactly, and on scores and embeddings to the last float32 digits only.
SCORE_ABS = 1e-6
SCORE_REL = 1e-5


def assert_records_close(
    got: Any, want: Any, abs: float = SCORE_ABS, rel: float = SCORE_REL, where: str = "records"
) -> None:
    """``got`` equals ``want`` (records, lists of them, dicts, JSON) with floats compared
    within ``abs`` / ``rel``; every other value (labels, indices, paths, errors, keys,
    lengths) exactly.  The one comparison for results of two runs."""
    if isinstance(want, bool) or isinstance(got, bool):
        assert got == want, f"{where}: {got!r} != {want!r}"
    elif isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and isinstance(want, (int, float)), where
        assert got == pytest.approx(want, abs=abs, rel=rel), f"{where}: {got!r} != {want!r}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys differ"
        for key in want:
            assert_records_close(got[key], want[key], abs, rel, f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)), f"{where}: {type(got).__name__}"
        assert len(got) == len(want), f"{where}: {len(got)} items, want {len(want)}"
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_records_close(a, b, abs, rel, f"{where}[{index}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def save_pth(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def save_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (a fresh init leaves layer scale at 1e-6 and GRN at 0,
    so blocks would vanish and parity would prove nothing).

    LayerNorm weights ~1, layer scale / GRN ~0.5, other weights ~1/sqrt(fan_in).
    """
    gen = torch.Generator().manual_seed(seed)
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.LayerNorm)
        for p in (m.weight, m.bias)
        if p is not None
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if id(p) in norm_params or ("norm" in name and leaf == "weight" and p.ndim == 1):
                p.copy_(1.0 + 0.2 * noise if leaf == "weight" else 0.1 * noise)
            elif "grn" in name or "layer_scale" in name or leaf == "gamma":
                p.copy_(0.5 + 0.3 * noise)
            elif leaf == "bias" or p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / max(1, p[0].numel()) ** 0.5)
    return model.eval()


def relative_error(got: Any, want: Any) -> float:
    """max |got - want| / max |want| (NumPy arrays)."""
    return float(np.abs(got - want).max() / np.abs(want).max())


# ----------------------------------------------------------------------- image builders


def png_bytes(
    array: np.ndarray, color_type: int, bit_depth: int = 16, claim: tuple[int, int] | None = None
) -> bytes:
    """A minimal PNG writer (Pillow cannot write 16-bit colour PNGs).

    `claim` writes another (width, height) into the header than the data holds.
    """
    height, width = array.shape[:2]
    raw = array.astype(">u2" if bit_depth == 16 else "u1").reshape(height, -1).view(np.uint8)
    scanlines = b"".join(b"\x00" + row.tobytes() for row in raw)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    width, height = claim or (width, height)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines))
        + chunk(b"IEND", b"")
    )


def composite_over_white(rgba: np.ndarray) -> np.ndarray:
    color = rgba[..., :3].astype(np.float64)
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    return np.rint(color * alpha + 255.0 * (1.0 - alpha))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height, with almost no data behind it."""
    return png_bytes(np.zeros((1, 1), dtype=np.uint8), 0, 8, claim=(width, height))


# ----------------------------------------------------------------------- the Hub cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache: Path, repo_id: str, source: Path, files: list[str]) -> Path:
    """Lay out a checkpoint exactly as huggingface_hub caches it (refs/main -> snapshot)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in files:
        shutil.copy(source / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def record_ids(listing: list[str]) -> list[str]:
    """The record ids of inputs listed in this order: an input whose id an earlier one has
    is recorded as ``ID#2``, ``ID#3``, ... (the one-id-per-input rule of inputs/expand.py)."""
    seen: dict[str, int] = {}
    ids = []
    for item in listing:
        seen[item] = seen.get(item, 0) + 1
        ids.append(item if seen[item] == 1 else f"{item}#{seen[item]}")
    return ids


def repeated_paths(photos: Sequence[object], count: int) -> list[str]:
    """``count`` paths cycling through ``photos``, each repeat spelled differently
    (``dir/./x``, ``dir/././x``, ...): the same files as distinct inputs, so that no two share
    a record id and no collision warning is said."""
    paths = []
    for n in range(count):
        photo = Path(str(photos[n % len(photos)]))
        paths.append(f"{photo.parent}/{'./' * (n // len(photos))}{photo.name}")
    return paths


# ------------------------------------------------------------------ CLI subprocess, peak memory

REPO = Path(__file__).resolve().parents[2]

# Runs the command given after the limit, as a child, and writes the children's peak RSS
# (ru_maxrss: KiB on Linux) in bytes to the file named first; an address-space limit (bytes,
# 0 for none) makes a regression fail with MemoryError instead of swapping.
PEAK_WRAPPER = (
    "import resource, subprocess, sys\n"
    "limit = int(sys.argv[2])\n"
    "def cap():\n"
    "    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    "code = subprocess.run(sys.argv[3:], preexec_fn=cap if limit else None).returncode\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
    "open(sys.argv[1], 'w').write(str(peak))\n"
    "sys.exit(code)\n"
)


class PeakRun:
    """A finished ``python -m convnext_cli`` subprocess: its exit code, output, wall seconds
    and peak resident memory in bytes."""

    def __init__(self, done: subprocess.CompletedProcess[Any], seconds: float, peak: float):
        self.done = done
        self.code = done.returncode
        self.stdout = done.stdout
        self.stderr = done.stderr
        self.seconds = seconds
        self.peak = peak

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines()]


def cli_env(**extra: str) -> dict[str, str]:
    """This environment with the checkout on PYTHONPATH (and ``extra``)."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def run_with_peak(
    *args: object,
    timeout: float = 300,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    stdin: Any = subprocess.DEVNULL,
    text: bool = True,
    limit: int = 0,
) -> PeakRun:
    """``python -m convnext_cli ARGS`` in a subprocess of a small wrapper that reports the
    peak RSS of its children (Linux), with an optional address-space ``limit`` in bytes."""
    with tempfile.TemporaryDirectory(prefix="peak-") as folder:
        peak_file = Path(folder) / "peak"
        command = [sys.executable, "-m", "convnext_cli", *map(str, args)]
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", PEAK_WRAPPER, str(peak_file), str(limit), *command],
            capture_output=True,
            text=text,
            timeout=timeout,
            cwd=cwd,
            stdin=stdin,
            env=cli_env() if env is None else env,
        )
        seconds = time.monotonic() - start
        return PeakRun(done, seconds, float(peak_file.read_text()))


def start_with_stdin(
    command: Sequence[object], data: bytes, stdout: Any = subprocess.PIPE, **popen: Any
) -> subprocess.Popen[bytes]:
    """Start ``command`` with ``data`` written to its stdin, which is then closed (stderr is
    a pipe unless given); ``communicate()`` later reads only its output."""
    popen.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen(list(map(str, command)), stdin=subprocess.PIPE, stdout=stdout, **popen)
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    proc.stdin = None
    return proc


def assert_pixels_match(
    spec: Any, photos: Sequence[Path], reference: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """``spec``'s pixels for each photo (decoded by the tool) equal ``reference``'s
    (transformers' processor on the same decoded image) to 1e-5."""
    from convnext_cli.imaging.decoding import decode_file

    for photo in photos:
        image = decode_file(photo)
        expected = reference(image)
        got = spec.normalize(spec.resize_and_crop(image)[None])[0]
        assert got.shape == expected.shape, photo.name
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=photo.name)


# A decoder for the decode workers that misbehaves on cue, by the first bytes of a file:
# SLOW (hangs), KILL (SIGKILL), SEGV, NAP\n (0.3 s, then decodes the rest), ONCE:FLAG\n
# (SIGKILL the first time, while FLAG does not exist). exec() it, or prepend it to a
# subprocess's script, and put `hostile` in place of imaging.decoding.decode_bytes.
HOSTILE_DECODER = r"""
import os, signal, sys, time
from convnext_cli.imaging import decoding as images

real = images.decode_bytes

def hostile(data):
    if data.startswith(b"SLOW"):
        time.sleep(600)
    if data.startswith(b"KILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    if data.startswith(b"SEGV"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if data.startswith(b"NAP\n"):  # a slow but honest decoder
        time.sleep(0.3)
        data = data[4:]
    if data.startswith(b"ONCE:"):  # dies the first time only
        marker, _, data = data.partition(b"\n")
        flag = marker[5:].decode()
        if not os.path.exists(flag):
            open(flag, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    return real(data)
"""
