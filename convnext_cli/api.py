"""The library face of the tool: the same core the CLI uses, for Python callers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from convnext_cli.checkpoints import DEFAULT_MODEL, build_model, load_checkpoint
from convnext_cli.device import resolve

if TYPE_CHECKING:
    from convnext_cli.pipeline import Result


class Classifier:
    """Load a ConvNeXt checkpoint once; classify or embed image files.

    >>> clf = Classifier("facebook/convnext-tiny-224", device="cpu", dtype="float32")
    >>> [r.predictions[0].label for r in clf.classify(["cat.jpg"])]
    ['tabby, tabby cat']
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        decode: str = "auto",
    ) -> None:
        from convnext_cli.jpeg_on_device import resolve_decode
        from convnext_cli.pipeline import Runner

        self.placement = resolve(device, dtype)
        jpeg_on_device = resolve_decode(decode, self.placement.device)
        self.checkpoint = load_checkpoint(model)
        self.model = build_model(self.checkpoint, self.placement.device, self.placement.dtype)
        self.runner = Runner(
            self.model,
            self.checkpoint.preprocess,
            self.placement.device,
            self.placement.dtype,
            jpeg_on_device=jpeg_on_device,
        )
        self.batch_size = batch_size
        self.workers = workers

    @property
    def labels(self) -> list[str]:
        return self.model.config.labels

    def classify(self, paths: Iterable[str], top_k: int = 5) -> list[Result]:
        """One result per path, in order: ``.predictions`` (label, index, score) or ``.error``."""
        batches = self.runner.classify(
            list(paths), top_k=top_k, batch_size=self.batch_size, workers=self.workers
        )
        return [r for batch in batches for r in batch]

    def embed(self, paths: Iterable[str], normalize: bool = False) -> list[Result]:
        """One result per path, in order: ``.embedding`` (pooler_output) or ``.error``."""
        batches = self.runner.embed(
            list(paths), normalize=normalize, batch_size=self.batch_size, workers=self.workers
        )
        return [r for batch in batches for r in batch]
