"""Batches of results that say where they were computed (light: no torch import)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from convnext_cli.results import Result

__all__ = ["Batches"]


class Batches(Iterator["list[Result]"]):
    """Batches of results (an iterator of them) that say where they were computed and what
    was done to them.

    ``Batches(runner.classify(...), "classified", runner.device, runner.dtype)``: the
    summary then ends ``on cpu float32``.
    """

    def __init__(
        self,
        batches: Iterable[list[Result]],
        verb: str = "processed",
        device: Any = None,
        dtype: Any = None,
        times: Any = None,
        served: str | None = None,
    ) -> None:
        self.batches = iter(batches)
        self.verb = verb
        self.device = device
        self.dtype = dtype
        self.times = times  # a pipeline.RunTimes, or None (Ray: the actors time themselves)
        self.served = served  # "convnext serve, pid N" when a server ran the model

    def __next__(self) -> list[Result]:
        return next(self.batches)

    def close(self) -> None:
        """Close the batches' generator (its decode workers stop) if it has one."""
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()

    def where(self) -> str | None:
        """``cpu float32``, ``cuda:0 bfloat16``, or None when not known (with ``(convnext
        serve, pid N)`` when a server ran the model)."""
        parts = [str(v).removeprefix("torch.") for v in (self.device, self.dtype) if v]
        if self.served:
            parts.append(f"({self.served})")
        return " ".join(parts) or None
