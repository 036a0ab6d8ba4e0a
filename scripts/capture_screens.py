"""Capture what `convnext classify` leaves on a terminal, as plain text (docs/screens/).

    python scripts/capture_screens.py docs/screens after

runs, in a pseudo-terminal 80 columns wide (stdout and stderr on the same terminal, as a
person sees them), on a folder of 200 photos with two broken files and a checkpoint whose
labels are as long as ImageNet-22k's: the default top-5 table, and ``-k 1``.  Writes
``NAME-k5-80.txt`` and ``NAME-k1-80.txt``, each cut to its first 60 and last 25 lines.  The
code run is the ``convnext_cli`` that ``PYTHONPATH`` (or the installed package) gives.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import demo_data  # noqa: E402
from pty_helpers import run_attached, screen  # noqa: E402


def shorten(lines: list[str], head: int = 60, tail: int = 25) -> list[str]:
    while lines and not lines[-1]:
        lines = lines[:-1]
    if len(lines) <= head + tail + 1:
        return lines
    cut = len(lines) - head - tail
    return [*lines[:head], f"[... {cut} lines left out of this capture ...]", *lines[-tail:]]


def capture(out_dir: Path, name: str, columns: int = 80) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = demo_data.long_label_checkpoint(root / "convnext-22k-names")
        demo_data.photo_folder(root)
        common = ["-m", checkpoint.name, "--device", "cpu", "--dtype", "float32"]
        for label, extra in (("k5", []), ("k1", ["-k", "1"])):
            args = ["classify", demo_data.PHOTO_DIR, *common, *extra]
            run = run_attached(args, stdout="tty", stderr="same", columns=columns, cwd=root)
            lines = shorten(screen(run.stdout))
            text = f"$ convnext {' '.join(args)}\n" + "\n".join(lines).rstrip() + "\n"
            (out_dir / f"{name}-{label}-{columns}.txt").write_text(text)
            print(f"{name}-{label}: exit {run.returncode}, {len(lines)} lines")


if __name__ == "__main__":
    capture(Path(sys.argv[1]), sys.argv[2])
