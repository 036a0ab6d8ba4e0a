"""What a run produces, one record per input, and what it takes in: light types (torch only
for annotations), so that writers, the CLI's progress and the Python API's callers can use
them without importing the engine's machinery.

- :class:`Result`: one input's outcome (predictions, an embedding, stage features, or an
  error), with the input it is for;
- :class:`Prediction`: one label of a top-k;
- :class:`InMemoryImage` and :data:`Input`: pixels given in memory beside file and dataset
  references (:class:`convnext_cli.inputs.expand.InputRef`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from convnext_cli.inputs.expand import InputRef, input_id

if TYPE_CHECKING:
    import torch


@dataclass
class Prediction:
    label: str
    index: int
    score: float


@dataclass
class Result:
    """The outcome for one input: predictions (classify) or an embedding (embed), or an error."""

    path: str
    error: str | None = None
    predictions: list[Prediction] = field(default_factory=list)
    embedding: torch.Tensor | None = None  # 1-D float32 on the CPU
    # embed --stage / --backbone: each stage's feature, float32 on the CPU, in the order
    # asked: (C,) pooled, or the (C, H, W) map with --pool none
    features: dict[str, torch.Tensor] | None = None
    # the input it is for (a file path, a tar member or Parquet row), when known: the HTML
    # report embeds its bytes, never a file that the path (a dataset's id) may name
    source: InputRef | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class InMemoryImage:
    """An input that is already pixels (from the Python API): nothing to read or decode.

    `pixels` is an RGB uint8 (3, H, W) tensor, already converted per the decoding policy,
    or None with `error` saying why it could not be; `name` is what its result's ``path``
    says (``<image N>``).
    """

    name: str
    pixels: torch.Tensor | None
    error: str | None = None


Input = InputRef | InMemoryImage  # a file path, a dataset member or row, or pixels


def source_of(item: Input) -> InputRef | None:
    """The file or dataset member an input reads, None for pixels given in memory."""
    return None if isinstance(item, InMemoryImage) else item


def input_name(item: Input) -> str:
    """What the input's record says as ``path``."""
    return item.name if isinstance(item, InMemoryImage) else input_id(item)
