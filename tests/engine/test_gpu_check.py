"""benchmarks/gpu_check.py --smoke --budget 90: the GPU check's own code on the CPU, within
its budget, every section it ran on disk with its figures, the rest skipped with a reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STATUSES = {"done", "skipped", "stopped"}


@pytest.mark.slow
def test_gpu_check_smoke_fits_its_budget(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--budget", "90",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=150, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first = done.stdout.splitlines()[0]
    assert first.startswith("README: the block at the top of") and "gpu_check.md" in first
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == [] and report["budget_s"] == 90
    assert report["elapsed_s"] <= 90
    sections = report["sections"]
    names = [s["section"] for s in sections]
    assert names[:4] == ["environment", "CUDA tests", "parity, convnext-t",
                         "model, convnext-t bf16 eager"]  # fmt: skip
    for section in sections:
        assert section["status"] in STATUSES, section
        if section["status"] == "skipped":
            assert section["reason"], section
    by_name = {s["section"]: s for s in sections}
    assert by_name["environment"]["status"] == "done"
    assert any("refused" in c["check"] for c in by_name["environment"]["checks"])
    assert by_name["CUDA tests"]["reason"] == "CUDA only"
    assert "--max-autotune" in by_name["model, convnext-t bf16 max-autotune"]["reason"]
    # whatever ran is in the report with its figures
    for section in sections:
        if section["status"] == "done" and section["section"].startswith(("model", "end to end")):
            assert section["rows"] and all(r["images_per_s"] > 0 for r in section["rows"])
        if section["status"] == "done" and section["section"].startswith("parity"):
            assert section["checks"] and all(c["ok"] for c in section["checks"])
    rows = [r for s in sections for r in s.get("rows", [])]
    assert all(r["device_peak_mb"] is None and r["gpu_util_pct"] is None for r in rows)
    text = (tmp_path / "gpu_check.md").read_text()
    assert text.startswith("<!-- gpu_check: copy this block into the README's GPU section -->")
    assert "| section | status | seconds | note |" in text
    for name in names:
        assert f"| {name} |" in text
