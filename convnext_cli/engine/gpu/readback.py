"""A batch's outputs on their way back to the host.

On CUDA the outputs are copied with ``non_blocking`` into pinned buffers after the batch
is queued, and waited for (:meth:`Readback.finish`) only once the next batch is queued too,
so that the device never waits for the host.  Elsewhere the outputs are on the host
already and :meth:`Readback.finish` only stores them.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from convnext_cli.results import Result

Parts = list[tuple[list[Result], tuple[torch.Tensor, ...]]]


class Stores(Protocol):
    """What a command does with a batch's outputs on the host (``pipeline.Head``)."""

    def store(self, outputs: tuple[torch.Tensor, ...], results: list[Result]) -> None: ...


def unpinned(out: torch.Tensor) -> torch.Tensor:
    """`out` in pageable memory: a result a caller keeps (an embedding, a feature map) must
    not be a view of a pinned readback buffer, which would keep page-locked memory alive
    for as long as the caller holds the result.  Pageable tensors are returned as they are."""
    if not out.is_pinned():
        return out
    return torch.empty(out.shape, dtype=out.dtype).copy_(out)


class Readback:
    """A batch's outputs on their way to the host: copied with ``non_blocking`` into pinned
    memory after the batch is queued, waited for (:meth:`finish`) only once later batches
    are queued too, so that the device never waits for the host.  The outputs are copied
    out of the pinned buffers before the results get them (:func:`unpinned`).

    With `begin` (a timing CUDA event recorded where the batch's work began), the event
    after the copy is a timing one too and :attr:`seconds` is the batch's device time once
    finished; without it, None."""

    def __init__(self, parts: Parts, head: Stores, begin: Any = None):
        self.head = head
        self.begin = begin
        self.event: Any = None
        self.seconds: float | None = None
        self.parts: list[tuple[list[Result], tuple[torch.Tensor, ...]]] = []
        for results, outputs in parts:
            host = []
            for out in outputs:
                if out.device.type == "cuda":
                    buffer = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                    buffer.copy_(out, non_blocking=True)
                    host.append(buffer)
                else:
                    host.append(out)
            self.parts.append((results, tuple(host)))
        on_device = any(out.device.type == "cuda" for _, outputs in parts for out in outputs)
        if on_device or begin is not None:
            self.event = torch.cuda.Event(enable_timing=begin is not None)
            self.event.record()

    def finish(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            if self.begin is not None:
                self.seconds = self.begin.elapsed_time(self.event) / 1000
        for results, outputs in self.parts:
            self.head.store(tuple(unpinned(out) for out in outputs), results)
