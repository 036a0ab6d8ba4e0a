"""Page-locking host memory that torch did not allocate (the staging ring's mapping).

``cudaHostRegister`` with ``cudaHostRegisterPortable`` (flags 1, as torch's own
``pin_memory`` registers), called with the run's device current: the registration is then
made in that device's context (``cuda:N``, N > 0, included) and counts as pinned for every
context.  A refusal leaves the memory pageable (the caller copies through ``pin_memory``)
and clears the CUDA runtime's last error, so that torch's next launch check does not
report it.
"""

from __future__ import annotations

import contextlib
import ctypes

import torch

HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable


def register(address: int, nbytes: int, device: torch.device | None = None) -> bool:
    """Page-lock ``nbytes`` at ``address`` for CUDA; False when CUDA is absent or refuses."""
    if not torch.cuda.is_available():
        return False
    chosen = device is not None and device.type == "cuda" and device.index is not None
    try:
        with torch.cuda.device(device) if chosen else contextlib.nullcontext():
            code = torch.cuda.cudart().cudaHostRegister(address, nbytes, HOST_REGISTER_PORTABLE)
    except Exception:
        return False
    if int(code) != 0:
        clear_cuda_error()
        return False
    return True


def unregister(address: int) -> None:
    """Undo :func:`register` once the device is done with the memory (best effort)."""
    with contextlib.suppress(Exception):
        torch.cuda.synchronize()
    with contextlib.suppress(Exception):
        torch.cuda.cudart().cudaHostUnregister(address)


def clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a refused registration (best effort)."""
    with contextlib.suppress(Exception):
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
