"""Capture the screens issues 21 and 30 changed, as plain text, into docs/screens/:

    PYTHONPATH=$PWD python scripts/capture_first_run.py docs/screens

``convnext --help`` and ``convnext classify --help`` on an 80-column pseudo-terminal, and
``convnext embed`` of the sample photos (and a missing file) on one (the short table, then
the summary on the same terminal); the README's first command, ``convnext classify
sample_images/``, with a stand-in for facebook/convnext-tiny-224 (no Hub here: a tiny
random model with ImageNet-1k's class names, so the labels and scores mean nothing), at 80
and 120 columns; ``embed --stage`` on a terminal; a run over a mistyped folder.  The HTML
report captures (``html-report-1280.png``, ``html-report-400.png``) come from
``CONVNEXT_CAPTURE_SCREENS=1 pytest tests/outputs/test_html_layout.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

import factories  # noqa: E402
from pty_helpers import run_attached, screen  # noqa: E402


def capture(args: list[str], out: Path, cwd: Path | None = None) -> None:
    run = run_attached(args, stdout="tty", stderr="same", columns=80, cwd=cwd)
    lines = screen(run.stdout)
    while lines and not lines[-1]:
        lines.pop()
    out.write_text(f"$ convnext {' '.join(args)}\n" + "\n".join(lines) + "\n")
    print(f"{out.name}: exit {run.returncode}, {len(lines)} lines")


def stand_in(folder: Path) -> Path:
    """A tiny random V1 classifier with ImageNet-1k's 1000 class names, its head sharpened
    so that, as a trained model's, its top scores stand out: the README's stand-in."""
    import json

    import torch

    from convnext_cli.model.labels import labels_for

    model = factories.hf_model(num_labels=1000, seed=1)
    with torch.no_grad():
        model.classifier.weight.mul_(4.0)
    factories.save_hf(model, folder)
    config = json.loads((folder / "config.json").read_text())
    names = labels_for(1000)
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def capture_at(args: list[str], out: Path, columns: int, cwd: Path) -> None:
    run = run_attached(args, stdout="tty", stderr="same", columns=columns, cwd=cwd)
    lines = screen(run.stdout)
    while lines and not lines[-1]:
        lines.pop()
    out.write_text(f"$ convnext {' '.join(args)}\n" + "\n".join(lines) + "\n")
    print(f"{out.name}: exit {run.returncode}, {len(lines)} lines")


def first_run(folder: Path) -> None:
    """Issue 30: the README's first command (a stand-in model), embed --stage, a typo."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stand_in(root / "convnext-tiny-stand-in")
        (root / "sample_images").symlink_to(HERE.parent / "sample_images")
        model = ["-m", "convnext-tiny-stand-in", "--device", "cpu"]
        for columns in (80, 120):
            out = folder / f"first-run-{columns}.txt"
            capture_at(["classify", "sample_images/", *model], out, columns, root)
        stages = ["embed", "sample_images/", *model, "--stage", "stage2", "--stage", "stage4"]
        capture_at(stages, folder / "embed-stages-80.txt", 80, root)
        capture_at(["classify", "sampel_images/", *model], folder / "typo-80.txt", 80, root)


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    first_run(folder)
    capture(["--help"], folder / "help-convnext-80.txt")
    capture(["classify", "--help"], folder / "help-classify-80.txt")
    capture(["benchmark", "--help"], folder / "help-benchmark-80.txt")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = factories.save_hf(factories.hf_model(num_labels=1000, seed=1), root / "tiny")
        (root / "photos").symlink_to(HERE.parent / "sample_images")
        photos = sorted(f"photos/{p.name}" for p in (root / "photos").glob("*.[jp][pn]g"))
        args = ["embed", *photos, "missing.jpg", "-m", model.name, "--device", "cpu"]
        capture([*args, "--dtype", "float32"], folder / "embed-table-80.txt", cwd=root)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
