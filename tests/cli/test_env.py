"""`convnext env` and `--version`: what a bug report needs, for people and as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from convnext_cli import __version__

CLI = [sys.executable, "-m", "convnext_cli"]


def test_version_long_and_short() -> None:
    for flag in ("--version", "-V"):
        out = subprocess.run([*CLI, flag], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0
        assert out.stdout.strip() == f"convnext-cli {__version__}"


def test_env_json_names_versions_devices_and_auto_choices() -> None:
    out = subprocess.run([*CLI, "env", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["tool"] == __version__
    assert report["packages"]["torch"] == torch.__version__.split("+")[0] or report["packages"][
        "torch"
    ].startswith(torch.__version__.split("+")[0])
    names = [d["name"] for d in report["devices"]]
    assert names[0] == "cpu"
    assert len([n for n in names if n.startswith("cuda")]) == torch.cuda.device_count()
    assert all(d["auto_dtype"] in ("float32", "bfloat16", "float16") for d in report["devices"])
    assert report["auto_device"] in names or report["auto_device"] in ("cuda", "mps")


def test_env_text_for_people() -> None:
    out = subprocess.run([*CLI, "env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"convnext-cli {__version__}" in out.stdout
    assert "--dtype auto" in out.stdout and "cpu" in out.stdout
