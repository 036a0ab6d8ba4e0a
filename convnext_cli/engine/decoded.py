"""A batch as the decoders hand it over, and the batch being assembled from them.

:class:`DecodedBatch` is what :mod:`convnext_cli.engine.pipeline` and the device decoder
(:mod:`convnext_cli.engine.gpu.device_decode`) both pass around; :class:`PendingBatch`
collects a batch's outcomes from the decode workers, in any order.  Both modules import
this one, and neither imports the other's types from it the other way round (no circle).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from convnext_cli.engine.decode_pool import fits, group_by_shape, unpack_groups
from convnext_cli.engine.staging import StagingRing
from convnext_cli.imaging.gpu_jpeg import EncodedJpeg
from convnext_cli.results import Input

Groups = list[tuple[list[int], torch.Tensor]]  # positions in the batch, (n, 3, h, w) uint8


@dataclass
class DecodedBatch:
    """One batch as the decoders hand it over: per-input errors, and the pixels stacked by
    shape (one group unless resizing is off); with ``pin_memory`` the whole uint8 group is
    pinned once, so that its host-to-device copy can run asynchronously.

    With a staging ring (:mod:`convnext_cli.engine.staging`) the group of the run's crop
    shape is a view of the batch's slot, written by the decode workers (no copy here; on
    CUDA already page-locked).  The consumer calls :meth:`release` once it no longer reads
    the pixels: after their host-to-device copy has been queued, with an event recorded
    after it, which the ring waits for before reusing the slot.
    """

    indices: list[int]  # the inputs' numbers in the whole run
    inputs: list[Input]
    errors: list[str | None]
    groups: list[tuple[list[int], torch.Tensor]]  # positions in the batch, (n, 3, h, w) uint8
    encoded: list[tuple[int, EncodedJpeg]] = field(default_factory=list)  # for the device
    decoding: float = 0.0  # seconds the decoding processes spent on it (reading included)
    ring: StagingRing | None = field(default=None, repr=False, compare=False)
    slot: tuple[int, int] | None = field(default=None, repr=False, compare=False)

    def pin_memory(self) -> DecodedBatch:
        groups = [
            (positions, pixels if self._pinned(pixels) else pixels.pin_memory())
            for positions, pixels in self.groups
        ]
        return replace(self, groups=groups)

    def _pinned(self, pixels: torch.Tensor) -> bool:
        return self.ring is not None and self.ring.pinned and self.ring.holds(pixels)

    def release(self, after: Any = None) -> None:
        """The consumer is done with this batch's pixels once `after` (a CUDA event, or
        None: now) has completed: its slot may then take another batch.  Idempotent; a
        batch without a slot has nothing to release."""
        if self.ring is not None and self.slot is not None:
            self.ring.release(*self.slot, after)


class PendingBatch:
    """A batch being assembled from what the decoders return, in any order; with a slot,
    every crop of the slot's shape lands in it at its position."""

    def __init__(
        self,
        start: int,
        inputs: list[Input],
        ring: StagingRing | None = None,
        slot: tuple[int, int] | None = None,
    ) -> None:
        self.indices = list(range(start, start + len(inputs)))
        self.inputs = inputs
        self.errors: list[str | None] = [None] * len(inputs)
        self.waiting = len(inputs)
        self.parts: list[tuple[list[int], torch.Tensor]] = []
        self.encoded: list[tuple[int, EncodedJpeg]] = []
        self.decoding = 0.0
        self.ring = ring if slot is not None else None
        self.slot = slot
        self.stage = ring.slot(slot[0]) if ring is not None and slot is not None else None
        self.staged: list[int] = []  # positions whose crop is in the slot

    @property
    def slot_index(self) -> int:
        return -1 if self.slot is None else self.slot[0]

    def add(self, position: int, outcome: Any) -> None:
        if isinstance(outcome, str):
            self.errors[position] = outcome
        elif isinstance(outcome, EncodedJpeg):
            self.encoded.append((position, outcome))
        elif self.stage is not None and fits(self.stage, outcome):
            self.stage[position].copy_(outcome)
            self.staged.append(position)
        else:
            self.parts.append(([position], outcome[None]))
        self.waiting -= 1

    def add_packed(self, packed: dict[str, Any]) -> None:
        for position, error in packed["errors"]:
            self.errors[position] = error
        self.encoded += packed["encoded"]
        self.decoding += packed.get("seconds", 0.0)
        staged = packed.get("staged", [])
        self.staged += staged
        groups = unpack_groups(packed)
        for positions, pixels in groups:
            if self.stage is not None and fits(self.stage, pixels[0]):
                # a worker that could not write the slot: into it here, instead of a cat
                for row, position in enumerate(positions):
                    self.stage[position].copy_(pixels[row])
                self.staged += positions
            else:
                self.parts.append((positions, pixels))
        self.waiting -= len(packed["errors"]) + len(packed["encoded"]) + len(staged)
        self.waiting -= sum(len(positions) for positions, _ in groups)

    def _staged_group(self) -> tuple[list[int], torch.Tensor] | None:
        """The slot's crops as one view: rows moved up over the positions that have none
        (errors, device JPEGs), in place, so that the view stays in the (pinned) ring."""
        if self.stage is None or not self.staged:
            return None
        positions = sorted(self.staged)
        for row, position in enumerate(positions):
            if row != position:  # row < position: moving up never overwrites a later crop
                self.stage[row].copy_(self.stage[position])
        return positions, self.stage[: len(positions)]

    def finish(self) -> DecodedBatch:
        groups = []
        staged = self._staged_group()
        if staged is not None:
            groups.append(staged)
        for parts in group_by_shape(self.parts, lambda part: tuple(part[1].shape[1:])):
            if len(parts) == 1:
                groups.append(parts[0])
            else:
                positions = [p for part, _ in parts for p in part]
                groups.append((positions, torch.cat([pixels for _, pixels in parts])))
        self.encoded.sort(key=lambda item: item[0])
        batch = DecodedBatch(
            self.indices, self.inputs, self.errors, groups, self.encoded, self.decoding,
            self.ring, self.slot,
        )  # fmt: skip
        if staged is None:
            batch.release()  # nothing in the slot: free at once
        return batch
