"""Capture the screens issue 21 changed, as plain text, into docs/screens/:

    PYTHONPATH=$PWD python scripts/capture_first_run.py docs/screens

``convnext --help`` and ``convnext classify --help`` on an 80-column pseudo-terminal, and
``convnext embed`` of the sample photos (and a missing file) on one (the short table, then
the summary on the same terminal).  The HTML report captures (``html-report-1280.png``,
``html-report-400.png``) come from ``CONVNEXT_CAPTURE_SCREENS=1 pytest
tests/outputs/test_html_layout.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import factories  # noqa: E402
from pty_helpers import run_attached, screen  # noqa: E402


def capture(args: list[str], out: Path, cwd: Path | None = None) -> None:
    run = run_attached(args, stdout="tty", stderr="same", columns=80, cwd=cwd)
    lines = screen(run.stdout)
    while lines and not lines[-1]:
        lines.pop()
    out.write_text(f"$ convnext {' '.join(args)}\n" + "\n".join(lines) + "\n")
    print(f"{out.name}: exit {run.returncode}, {len(lines)} lines")


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    capture(["--help"], folder / "help-convnext-80.txt")
    capture(["classify", "--help"], folder / "help-classify-80.txt")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = factories.save_hf(factories.hf_model(num_labels=1000, seed=1), root / "tiny")
        (root / "photos").symlink_to(HERE.parent / "sample_images")
        photos = sorted(f"photos/{p.name}" for p in (root / "photos").glob("*.[jp][pn]g"))
        args = ["embed", *photos, "missing.jpg", "-m", model.name, "--device", "cpu"]
        capture([*args, "--dtype", "float32"], folder / "embed-table-80.txt", cwd=root)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
