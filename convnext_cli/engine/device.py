"""Choosing the device and dtype a run uses, and refusing impossible requests clearly."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from convnext_cli.choices import DTYPES
from convnext_cli.errors import DeviceError

DTYPE_NAMES = DTYPES


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    reason: str  # why auto chose what it chose ("" when the user named both)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; named devices must exist."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but no CUDA GPU is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{name}: only {count} CUDA device(s) present")
    elif device.type == "mps":
        if not _mps_available():
            raise DeviceError("MPS was requested but is not available on this machine")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


@lru_cache(maxsize=1)
def cpu_has_fast_bfloat16() -> bool:
    """True when the CPU has AMX tiles for bfloat16 matrix work (oneDNN uses them)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            return False
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """Map a --dtype value to a torch dtype for this device; auto explains its choice."""
    name = name.strip().lower()
    if name not in DTYPE_NAMES:
        raise DeviceError(f"unknown dtype {name!r} (use {', '.join(DTYPE_NAMES)})")
    if name == "auto":
        if device.type == "cpu" and cpu_has_fast_bfloat16():
            return (
                torch.bfloat16,
                "the CPU has AMX bfloat16 units; --dtype float32 for exact numbers",
            )
        if device.type == "cuda":
            return cuda_auto_dtype(device)
        return torch.float32, ""
    dtype = getattr(torch, name)
    if dtype == torch.bfloat16 and device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise DeviceError(f"bfloat16 is not supported on {torch.cuda.get_device_name(device)}")
    if dtype == torch.float16 and device.type == "cpu" and not _cpu_half_supported():
        raise DeviceError("float16 is not supported on this CPU build of PyTorch")
    return dtype, ""


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability (major, minor)."""
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def cuda_auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """``--dtype auto`` on CUDA: bfloat16 where the GPU has bfloat16 tensor cores (compute
    capability 8.0+, Ampere and later), float16 before; never the emulated bfloat16 that
    ``torch.cuda.is_bf16_supported()`` reports by default on older GPUs."""
    major, minor = cuda_capability(device)
    if major >= 8:
        return (
            torch.bfloat16,
            f"the GPU (compute capability {major}.{minor}) has bfloat16 tensor cores; "
            "--dtype float32 for exact numbers",
        )
    return (
        torch.float16,
        f"the GPU (compute capability {major}.{minor}) has no native bfloat16; "
        "--dtype float32 for exact numbers",
    )


def configure_backend(placement: Placement) -> None:
    """Backend switches for a run on CUDA: cuDNN picks the fastest convolution for the
    (fixed) batch shape; float32 is the exact mode, so TF32 is explicitly off for it
    (matmuls and convolutions), and allowed for the other dtypes (where it is unused)."""
    if placement.device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    exact = placement.dtype == torch.float32
    torch.backends.cuda.matmul.allow_tf32 = not exact
    torch.backends.cudnn.allow_tf32 = not exact
    torch.set_float32_matmul_precision("highest" if exact else "high")


def default_batch_size(device: torch.device, image_size: int = 224) -> int:
    """The batch a run uses when ``-b`` is not given.

    - CPU: 8 (larger batches spill the activations out of cache; measured:
      ``benchmarks/README.md``, "The CPU batch size").
    - CUDA: 256 at 224 pixels on a GPU with at least 16 GiB (timm's benchmark batch; a
      data-centre GPU is not kept busy by less), 64 on smaller GPUs; divided by the pixel
      ratio for larger inputs (384 pixels: 256 -> 87 -> 64, a multiple of 8), never below
      8.  A batch that runs out of memory is halved during the run (see pipeline.Runner).
    - MPS: 32.
    """
    if device.type == "cpu":
        return 8
    if device.type != "cuda":
        return 32
    try:
        memory = torch.cuda.get_device_properties(device).total_memory
    except (RuntimeError, AssertionError):
        memory = 0
    base = 256 if memory >= 16 * 2**30 else 64
    scaled = int(base * (224 * 224) / max(1, image_size) ** 2)
    return max(8, min(base, scaled // 8 * 8))


def _cpu_half_supported() -> bool:
    try:
        torch.nn.functional.conv2d(
            torch.ones(1, 1, 2, 2, dtype=torch.float16), torch.ones(1, 1, 1, 1, dtype=torch.float16)
        )
    except RuntimeError:
        return False
    return True


def resolve(device: str = "auto", dtype: str = "auto") -> Placement:
    dev = resolve_device(device)
    torch_dtype, reason = resolve_dtype(dtype, dev)
    placement = Placement(dev, torch_dtype, reason)
    configure_backend(placement)
    return placement
