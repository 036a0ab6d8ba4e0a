"""What a bug report needs: versions, the devices this machine has, and what ``auto`` picks."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from dataclasses import asdict, dataclass, field

import torch

from convnext_cli import __version__
from convnext_cli.engine.device import cpu_has_fast_bfloat16, resolve_device, resolve_dtype

PACKAGES = (
    "torch",
    "torchvision",
    "pillow",
    "numpy",
    "safetensors",
    "huggingface_hub",
    "typer",
    "rich",
    "pyarrow",
    "ray",
)


@dataclass
class DeviceInfo:
    name: str  # what --device takes: cpu, cuda:N, mps
    description: str
    auto_dtype: str  # what --dtype auto runs on it
    memory_gib: float | None = None
    capability: str | None = None


@dataclass
class Environment:
    tool: str
    python: str
    platform: str
    packages: dict[str, str | None]
    cuda: str | None
    cudnn: str | None
    auto_device: str
    devices: list[DeviceInfo] = field(default_factory=list)
    cpu_threads: int = 1
    hub: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # installed but broken (torchvision)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _auto_dtype(device: torch.device) -> str:
    dtype, _ = resolve_dtype("auto", device)
    return str(dtype).removeprefix("torch.")


def _devices() -> list[DeviceInfo]:
    cpu = torch.device("cpu")
    cpu_name = cpu_model() or platform.processor() or platform.machine()
    amx = " (AMX bfloat16)" if cpu_has_fast_bfloat16() else ""
    found = [
        DeviceInfo("cpu", f"{cpu_name}, {os.cpu_count()} logical cores{amx}", _auto_dtype(cpu))
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            device = torch.device("cuda", index)
            found.append(
                DeviceInfo(
                    f"cuda:{index}",
                    props.name,
                    _auto_dtype(device),
                    round(props.total_memory / 2**30, 1),
                    f"{props.major}.{props.minor}",
                )
            )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append(DeviceInfo("mps", "Apple Metal", _auto_dtype(torch.device("mps"))))
    return found


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``), or None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _hub_settings() -> dict[str, str]:
    names = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT")
    settings = {name: os.environ[name] for name in names if name in os.environ}
    if os.environ.get("HF_TOKEN"):
        settings["HF_TOKEN"] = "set"
    return settings


def cudnn_version(number: int) -> str:
    """torch's cuDNN version number as cuDNN writes it: 92400 -> ``9.24.0`` (cuDNN 9 and
    later: major * 10000 + minor * 100 + patch), 8902 -> ``8.9.2`` (earlier: major * 1000)."""
    major_unit = 10000 if number >= 90000 else 1000
    major, rest = divmod(number, major_unit)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def torchvision_problem() -> str | None:
    """Why the installed torchvision does not work, or None (also when it is not installed).

    A torchvision built for another torch imports, then fails on its first operator
    (``operator torchvision::nms does not exist``); one tiny ``nms`` call finds that out,
    as ``--decode gpu`` (nvjpeg through torchvision) would meet it mid-run."""
    if _version("torchvision") is None:
        return None
    try:
        import torchvision

        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        torchvision.ops.nms(boxes, torch.tensor([1.0]), 0.5)
    except Exception as exc:  # an import error, a missing operator, a symbol clash
        message = " ".join(str(exc).split()) or type(exc).__name__
        return (
            f"torchvision {_version('torchvision')} does not work with torch "
            f"{torch.__version__}: {message[:200]} (install the torchvision built for this "
            "torch)"
        )
    return None


def collect() -> Environment:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return Environment(
        tool=__version__,
        python=sys.version.split()[0],
        platform=platform.platform(),
        packages={name: _version(name) for name in PACKAGES},
        cuda=torch.version.cuda,
        cudnn=cudnn_version(cudnn) if cudnn else None,
        auto_device=str(resolve_device("auto")),
        devices=_devices(),
        cpu_threads=torch.get_num_threads(),
        hub=_hub_settings(),
        problems=[problem for problem in (torchvision_problem(),) if problem],
    )
