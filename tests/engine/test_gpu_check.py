"""benchmarks/gpu_check.py --smoke: every step of the GPU check runs on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == []
    sections = report["sections"]
    checks = [p["check"] for p in sections["parity"]]
    assert any("hard JPEGs" in c for c in checks) and any("refused" in c for c in checks)
    modes = {(r["model"], r["mode"]) for r in sections["model_rows"]}
    assert modes >= {("convnext-t", "model"), ("convnextv2-t", "model+copy")}
    assert sections["end_to_end"][0]["images_per_s"] > 0
    # the benchmark's device figures: None on the CPU (n/a in the Markdown), never a failure
    assert sections["end_to_end"][0]["device_peak_mb"] is None
    assert all(r["compile_mode"] == "eager" for r in sections["model_rows"])
    assert "max-autotune and reduce-overhead rows: CUDA only, skipped in smoke mode" in done.stdout
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| check | ok |" in text and "| device peak MB | GPU % |" in text
    assert "timm-comparable: batch 256, bfloat16, channels_last" in text
