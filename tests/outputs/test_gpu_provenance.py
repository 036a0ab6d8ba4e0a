"""The device, dtype and JPEG decoder are part of what a resumed run must share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convnext_cli.cli import app
from convnext_cli.errors import UsageError
from convnext_cli.outputs.resume import check_provenance, provenance_path


def test_a_resume_with_another_dtype_is_refused(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    args = ["classify", *map(str, photos[:3]), "-m", str(v1_checkpoint), "--device", "cpu",
            "-b", "2", "-o", str(output)]  # fmt: skip
    first = CliRunner().invoke(app, [*args, "--dtype", "float32"])
    assert first.exit_code == 0, first.stderr
    (recorded,) = json.loads(provenance_path(output.resolve()).read_text())["runs"].values()
    assert (recorded["device"], recorded["dtype"], recorded["decode"]) == ("cpu", "float32", "cpu")
    before = output.read_bytes()
    refused = CliRunner().invoke(app, [*args, "--dtype", "bfloat16", "--resume"])
    assert refused.exit_code == 2
    (message,) = refused.stderr.strip().splitlines()
    assert "(dtype differ)" in message
    assert output.read_bytes() == before
    same = CliRunner().invoke(app, [*args, "--dtype", "float32", "--resume"])
    assert same.exit_code == 0, same.stderr


def test_a_file_from_before_these_keys_still_resumes(tmp_path: Path) -> None:
    old = {"command": "classify", "model": "m", "config": "c", "top_k": 5, "normalize": None,
           "preprocess": {}}  # fmt: skip
    now = dict(old, device="cuda", dtype="bfloat16", decode="gpu")
    check_provenance(old, now, tmp_path / "out.jsonl", force=False)
    with pytest.raises(UsageError, match=r"\(device, decode differ\)"):
        check_provenance(dict(now, device="cpu", decode="cpu"), now, tmp_path / "x", False)
