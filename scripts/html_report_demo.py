"""Real classify results as an HTML report: run the CLI (``--format jsonl``), rebuild the
Results from its JSON lines, and write them with HtmlReportWriter.

Used by tests/outputs/test_html_report.py, and by hand for a screenshot::

    python scripts/html_report_demo.py /tmp/report.html [--screenshot /tmp/report.png]

(without ``-m`` it makes a tiny randomised checkpoint with ImageNet-1k labels whose head
is scaled up so the scores are not all 0.001).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def results_from_jsonl(text: str) -> list:
    """The Result objects behind classify's JSON lines (paths recovered exactly)."""
    from convnext_cli.results import Prediction, Result

    results = []
    for line in text.splitlines():
        record = json.loads(line)
        if "error" in record:
            results.append(Result(path=record["path"], error=record["error"]))
        else:
            predictions = [
                Prediction(p["label"], p["index"], p["score"]) for p in record["predictions"]
            ]
            results.append(Result(path=record["path"], predictions=predictions))
    return results


def classify_jsonl(inputs: list[str], model: str, top_k: int = 5, cwd: Path = REPO) -> str:
    """Run ``convnext classify ... --format jsonl`` and return its stdout."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "convnext_cli", "classify", *inputs, "-m", model]
        + ["-k", str(top_k), "--format", "jsonl"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=600,
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"classify failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def demo_checkpoint(folder: Path) -> Path:
    """A tiny ConvNeXt with ImageNet-1k label names and a sharpened (scaled) head."""
    import torch

    sys.path.insert(0, str(REPO / "tests" / "support"))
    import factories

    from convnext_cli.model.labels import labels_for

    model = factories.hf_model(num_labels=1000, seed=3)
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)
    names = labels_for(1000)
    model.config.id2label = {i: name for i, name in enumerate(names)}
    model.config.label2id = {name: i for i, name in enumerate(names)}
    return factories.save_hf(model, folder)


def write_report(results: list, out: Path, top_k: int, title: str) -> None:
    from convnext_cli.outputs.html import HtmlReportWriter

    with open(out, "w", encoding="utf-8", newline="\n") as stream:
        writer = HtmlReportWriter(stream, top_k, title=title)
        for start in range(0, len(results), 4):  # batches, as classify delivers them
            writer.write(results[start : start + 4])
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("-m", "--model")
    parser.add_argument("-k", "--top-k", type=int, default=5)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(demo_checkpoint(Path(tmp) / "tiny"))
        missing = "sample_images/missing.jpg"
        text = classify_jsonl(["sample_images", missing], model, args.top_k)
        results = results_from_jsonl(text)
        write_report(results, args.out, args.top_k, "sample_images · tiny ConvNeXt (random)")
    print(f"{args.out}: {len(results)} results, {args.out.stat().st_size} bytes")
    if args.screenshot:
        from chromium_cdp import find_chromium

        binary = find_chromium()
        if binary is None:
            sys.exit("no chromium found")
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars"]
                + [f"--user-data-dir={profile}", f"--screenshot={args.screenshot}"]
                + ["--window-size=1200,900", args.out.resolve().as_uri()],
                check=True,
                capture_output=True,
                timeout=120,
            )
        print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests" / "support"))
    main()
