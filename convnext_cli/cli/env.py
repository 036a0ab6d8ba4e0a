"""`convnext env`: versions, devices and what auto would choose, for bug reports."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def env(
    as_json: Annotated[
        bool, typer.Option("--json", metavar="", help="One JSON object instead of text.")
    ] = False,
) -> None:
    """Print what a bug report needs: versions of the tool, Python, torch, torchvision,
    CUDA and cuDNN; the devices found and what --device auto / --dtype auto choose.

    Paste its output into a bug report; --json gives the same as one object.

    Examples:
      $ convnext env
      $ convnext env --json > env.json
    """
    from rich.console import Console
    from rich.table import Table

    from convnext_cli.engine._environment import collect

    report = collect()
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    console = Console(highlight=False)
    console.print(f"convnext-cli {report.tool}  (Python {report.python}, {report.platform})")
    versions = ", ".join(f"{k} {v}" for k, v in report.packages.items() if v)
    console.print(f"packages: {versions}", markup=False)
    missing = [k for k, v in report.packages.items() if v is None]
    if missing:
        console.print(f"not installed: {', '.join(missing)}", markup=False)
    for problem in report.problems:
        console.print(f"broken: {problem}", markup=False, style="bold red")
    gpus = sum(d.name.startswith("cuda") for d in report.devices)
    console.print(
        f"torch built with CUDA {report.cuda or 'none'}, cuDNN {report.cudnn or 'none'}; "
        f"CUDA GPUs found: {gpus}"
    )
    table = Table("device", "what", "memory", "--dtype auto", title=None, show_edge=False)
    for device in report.devices:
        memory = f"{device.memory_gib} GiB" if device.memory_gib else ""
        what = device.description + (f" (sm {device.capability})" if device.capability else "")
        table.add_row(device.name, what, memory, device.auto_dtype)
    console.print(table)
    console.print(f"--device auto: {report.auto_device}   torch threads: {report.cpu_threads}")
    if report.hub:
        hub = ", ".join(f"{k}={v}" for k, v in report.hub.items())
        console.print(f"hub settings: {hub}", markup=False)
