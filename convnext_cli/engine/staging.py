"""A shared-memory staging ring: decoded crops go from the decode workers straight into the
batch the model reads, without a pickle, a concatenation or a pinning copy.

The main process maps a ring of batch slots, ``(slots, batch, 3, H, W)`` uint8, before the
decode workers are forked; the workers inherit the mapping and write each crop into
``slot[position]``, sending only its position through their pipe.  A batch's pixels are then
a view of its slot.  The mapping is anonymous (``MAP_SHARED | MAP_ANONYMOUS``): there is no
file in /dev/shm to leak, and the kernel frees the memory with the last process that maps it,
whether the run ends, a worker is killed or the main process is.

The lifetime rule (a wrong one silently corrupts pixels):

- a slot belongs to one batch from :meth:`StagingRing.acquire` (before its inputs are sent
  to the workers) until the consumer releases it (:meth:`StagingRing.release`, through
  ``DecodedBatch.release``), optionally *after* an event (a CUDA event recorded once the
  batch's host-to-device copy has been consumed);
- a released slot is reused only once its event has completed (``query()``, or
  ``synchronize()`` when nothing else can go on);
- a batch that gets no slot (every slot held by batches the consumer has not released)
  takes the pickle path: a consumer that never releases is slower, never wrong.

On CUDA the whole ring is page-locked once (``cudaHostRegister``), so that the copies from it
are truly asynchronous and ``DecodedBatch.pin_memory`` leaves its groups alone; it is
unregistered when the ring closes.  ``CONVNEXT_STAGING=0`` turns the ring off (the pickle
path for everything: for comparisons and the benchmark).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
from collections import deque
from typing import Any

import numpy as np
import torch

from convnext_cli.engine.gpu import host_memory
from convnext_cli.imaging.preprocess import PreprocessSpec
from convnext_cli.limits import env_flag

STAGING_ENV = "CONVNEXT_STAGING"
# Slots beyond the batches being decoded: the batch the consumer uses, the two read back
# behind it (pipeline.READ_BEHIND), and the one whose asynchronous copy may still run.
SPARE_SLOTS = 4
MAX_RING_BYTES = 4 << 30  # beyond this, fewer slots (fewer batches decoded ahead)


def staging_enabled() -> bool:
    """False when ``CONVNEXT_STAGING`` is 0 (or false/no/off); see :func:`limits.env_flag`."""
    return env_flag(STAGING_ENV, True)


def fixed_shape(spec: PreprocessSpec) -> tuple[int, int, int] | None:
    """The (3, h, w) every decoded crop has under `spec`, or None when it depends on the
    image (resizing off, no centre crop)."""
    if spec.do_center_crop and spec.crop_size:
        return (3, *spec.crop_size)
    if spec.do_resize:
        return (3, spec.shortest_edge, spec.shortest_edge)
    return None


def ring_slots(ahead: int, batch_size: int, shape: tuple[int, ...]) -> int:
    """Slots for `ahead` batches in flight plus :data:`SPARE_SLOTS`, within
    :data:`MAX_RING_BYTES` (two at least)."""
    slot_bytes = max(1, batch_size * math.prod(shape))
    return max(2, min(max(0, ahead) + SPARE_SLOTS, MAX_RING_BYTES // slot_bytes))


class StagingRing:
    """`slots` batch slots of `batch_size` uint8 crops of `shape`, shared with forked children.

    :meth:`acquire` and :meth:`release` are the main process's (one thread); the workers
    only write into :meth:`slot` views of slots handed to them with a task.
    """

    def __init__(
        self,
        slots: int,
        batch_size: int,
        shape: tuple[int, ...],
        pin: bool = False,
        device: torch.device | None = None,
    ) -> None:
        self.slots = max(1, slots)
        self.batch_size = max(1, batch_size)
        self.shape = tuple(shape)
        self.nbytes = self.slots * self.batch_size * math.prod(self.shape)
        # MAP_SHARED | MAP_ANONYMOUS (mmap's default for -1): no file, inherited through fork
        self._map: mmap.mmap | None = mmap.mmap(-1, self.nbytes)
        # through NumPy: its buffer export keeps the mapping alive while any view is
        # (torch.frombuffer would not, and closing the map would leave views dangling)
        flat = np.frombuffer(self._map, dtype=np.uint8)
        self.pixels = torch.from_numpy(flat).view(self.slots, self.batch_size, *self.shape)
        self.address = self.pixels.data_ptr()
        self.pinned = False
        self._free: deque[int] = deque(range(self.slots))
        self._held: dict[int, int] = {}  # slot -> token of the batch that has it
        self._released: dict[int, Any] = {}  # slot -> what its reuse waits for (or None)
        self._tokens = itertools.count(1)
        if pin:
            self._pin(device)

    # the slots

    def slot(self, index: int) -> torch.Tensor:
        """Slot `index`: a (batch_size, *shape) uint8 view of the ring."""
        return self.pixels[index]

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor`'s data lie inside the ring (a view of it, not a copy)."""
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        return self.address <= start and end <= self.address + self.nbytes

    def acquire(self, wait: bool = False) -> tuple[int, int] | None:
        """(slot, token) for a new batch, or None when no slot can be had now.

        A released slot whose event has completed is free; with `wait` (nothing else can
        go on) the oldest released slot's event is waited for.  Slots the consumer has not
        released are never taken.
        """
        for index, after in list(self._released.items()):
            if after is None or after.query():
                del self._released[index]
                self._free.append(index)
        if not self._free and wait and self._released:
            index, after = next(iter(self._released.items()))
            after.synchronize()
            del self._released[index]
            self._free.append(index)
        if not self._free:
            return None
        index = self._free.popleft()
        token = next(self._tokens)
        self._held[index] = token
        return index, token

    def release(self, index: int, token: int, after: Any = None) -> None:
        """The batch with `token` is done with slot `index` once `after` (an event with
        ``query()`` and ``synchronize()``, or None: now) has completed.  Idempotent."""
        if self._held.get(index) != token:
            return
        del self._held[index]
        self._released[index] = after

    def mapped_here(self) -> bool:
        """Whether this process maps the ring (a forked child does, unless a driver marked
        the range not to be inherited: then the child uses the pickle path)."""
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    start, _, end = line.split(" ", 1)[0].partition("-")
                    if int(start, 16) <= self.address < int(end, 16):
                        return True
        except (OSError, ValueError):
            return True  # no /proc: fork shares the mapping
        return False

    # page-locking

    def _pin(self, device: torch.device | None) -> None:
        """Page-lock the ring for CUDA once (:mod:`convnext_cli.engine.gpu.host_memory`); left
        unpinned (``pin_memory`` copies then) when CUDA is absent or refuses."""
        if not host_memory.register(self.address, self.nbytes, device):
            return
        self.pinned = True
        if self._map is not None:  # the workers forked after this must still see it
            with contextlib.suppress(AttributeError, OSError, ValueError):
                self._map.madvise(mmap.MADV_DOFORK)

    def close(self) -> None:
        """Unregister the pinning (after the device is done with the ring) and drop the
        mapping; views still held keep it alive (unpinned) until they go."""
        if self.pinned:
            self.pinned = False
            host_memory.unregister(self.address)
        self._free.clear()
        self._held.clear()
        self._released.clear()
        self.pixels = torch.empty((0, self.batch_size, *self.shape), dtype=torch.uint8)
        if self._map is not None:
            with contextlib.suppress(BufferError):  # views alive: freed with the last one
                self._map.close()
            self._map = None

    # the ring travels to the workers through fork, never by pickle
    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a StagingRing is shared through fork only")
