"""What the head computes for each image: the one description both engines run.

A :class:`Task` is built once from a job (:meth:`convnext_cli.engine.job.Job.task`); the
local engine hands it its runner, and the Ray engine's model actors receive the same object
(pickled by Ray) and hand it theirs.  No torch import here: the job and the CLI stay light.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from convnext_cli.errors import UsageError
from convnext_cli.limits import MAX_BATCH_SIZE, parse_int

if TYPE_CHECKING:
    from convnext_cli.engine.pipeline import Runner
    from convnext_cli.results import Input, Result

COMMANDS = ("classify", "embed")


@dataclass(frozen=True)
class Task:
    """classify's top-k and score kind, or embed's normalisation and features; and the
    images per model call.

    - ``command``: ``"classify"`` or ``"embed"``.
    - ``top_k``: predictions per image (0: every class); ``scores``: ``probs``, ``logits``
      or ``log-probs``.
    - ``normalize``: unit-length embeddings; ``stages`` / ``pool`` / ``backbone``:
      ``embed --stage / --pool / --backbone`` (none of them: transformers' pooler_output).
    - ``batch_size``: images per model call (None: the default for the device).
    """

    command: str = "classify"
    top_k: int = 5
    scores: str = "probs"
    normalize: bool = False
    stages: tuple[str, ...] = ()
    pool: str = "avg"
    backbone: bool = False
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise UsageError(f"unknown command {self.command!r}: classify or embed")
        if self.batch_size is not None:  # the range -b has (limits.py), for API callers too
            parse_int(str(self.batch_size), "--batch-size", 1, MAX_BATCH_SIZE)

    @property
    def verb(self) -> str:
        """What the closing summary says was done: ``classified`` or ``embedded``."""
        return "classified" if self.command == "classify" else "embedded"

    @property
    def features(self) -> bool:
        """embed --stage / --backbone: feature maps of the backbone, not the pooled output."""
        return self.command == "embed" and bool(self.stages or self.backbone)

    def run(
        self,
        runner: Runner,
        items: Iterable[Input],
        workers: int | None = None,
        batch_size: int | None = None,
    ) -> Iterator[list[Result]]:
        """The runner's results for ``items``, batch by batch; ``workers``: decoding
        processes (0: none), ``batch_size``: this call's (None: the task's own)."""
        size = batch_size or self.batch_size
        if self.command == "classify":
            return runner.classify(
                items, top_k=self.top_k, batch_size=size, workers=workers, scores=self.scores
            )
        return runner.embed(
            items,
            normalize=self.normalize,
            batch_size=size,
            workers=workers,
            stages=list(self.stages) or None,
            pool=self.pool,
            backbone=self.backbone,
        )
