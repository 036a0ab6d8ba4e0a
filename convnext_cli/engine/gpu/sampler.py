"""The device's used memory and utilisation during a benchmark row (CUDA only)."""

from __future__ import annotations

import statistics
import threading
import time
from types import TracebackType
from typing import Any

import torch

UTILISATION_WINDOW_S = 1.0  # NVML's longest sample period: readings after it cover the row


class DeviceSampler:
    """The device's used memory and utilisation, sampled on a background thread while a
    row is timed (``with sampler:``); on anything but CUDA it samples nothing.

    Used memory is NVML's (``torch.cuda.device_memory_used``) where it can be read, else
    ``torch.cuda.mem_get_info``'s total minus free: both are the whole device's, so they
    include the CUDA context, the caching allocator's reserve, nvjpeg's buffers and other
    processes.  Utilisation is ``torch.cuda.utilization`` (NVML; needs ``nvidia-ml-py``):
    after its first failure it is not asked again and reads ``None``.  One reading is
    taken on entering and one on leaving, so that a row shorter than the interval still
    has its memory figure.

    NVML's utilisation is the share of time a kernel ran over its own last sample period
    (1/6 s to 1 s, depending on the GPU), so a reading taken early in a row describes what
    ran before it.  The mean utilisation is taken over the readings made at least
    :data:`UTILISATION_WINDOW_S` after the row started (each then covers the row only); a
    row too short to have any reads ``None``, never the previous row's activity."""

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.device = device
        self.active = device.type == "cuda"
        self.interval_s = interval_s
        self.memory_source: str | None = None  # "nvml" or "mem_get_info", once read
        self._memory: list[float] = []
        self._utilisation: list[tuple[float, float]] = []  # (when, percent)
        self.clock = time.monotonic  # a test can put a fake clock here
        self.started = 0.0
        self._utilisation_ok = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def used_mb(self) -> float | None:
        """The device's used memory now, in MiB (None when it cannot be read)."""
        if not self.active:
            return None
        if self.memory_source in (None, "nvml") and hasattr(torch.cuda, "device_memory_used"):
            try:
                used = torch.cuda.device_memory_used(self.device)
                self.memory_source = "nvml"
                return used / 2**20
            except Exception:
                pass
        try:
            free, total = torch.cuda.mem_get_info(self.device)
        except Exception:
            return None
        self.memory_source = "mem_get_info"
        return (total - free) / 2**20

    def utilisation(self) -> float | None:
        """The GPU's utilisation now, in percent (None without NVML)."""
        if not (self.active and self._utilisation_ok):
            return None
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # no nvidia-ml-py, no NVML, a driver that does not say
            self._utilisation_ok = False
            return None

    def sample(self) -> None:
        used, busy = self.used_mb(), self.utilisation()
        if used is not None:
            self._memory.append(used)
        if busy is not None:
            self._utilisation.append((self.clock(), busy))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> DeviceSampler:
        self._memory.clear()
        self._utilisation.clear()
        self.started = self.clock()
        if self.active:
            self.sample()
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="device-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()

    @property
    def peak_mb(self) -> float | None:
        return round(max(self._memory), 1) if self._memory else None

    @property
    def mean_utilisation(self) -> float | None:
        settled = self.started + UTILISATION_WINDOW_S
        readings = [busy for when, busy in self._utilisation if when >= settled]
        if not readings:
            return None
        return round(statistics.fmean(readings), 1)

    def fill(self, row: Any) -> Any:
        """The row with this sampling's device peak and mean utilisation."""
        row.device_peak_mb = self.peak_mb
        row.gpu_util_pct = self.mean_utilisation
        return row
