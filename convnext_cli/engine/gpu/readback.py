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


class Readback:
    """A batch's outputs on their way to the host: copied with ``non_blocking`` into pinned
    memory after the batch is queued, waited for (:meth:`finish`) only once the next batch
    is queued too, so that the device never waits for the host."""

    def __init__(self, parts: Parts, head: Stores):
        self.head = head
        self.event: Any = None
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
        if any(out.device.type == "cuda" for _, outputs in parts for out in outputs):
            self.event = torch.cuda.Event()
            self.event.record()

    def finish(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        for results, outputs in self.parts:
            self.head.store(outputs, results)
