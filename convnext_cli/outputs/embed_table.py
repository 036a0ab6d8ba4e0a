"""``convnext embed`` on a terminal: a short table, not 768 floats per image.

One line per input: its path (as given, shortened in the middle only when it does not fit),
the embedding's dimension, its L2 norm and its first values, as many as the width allows.
Above the table one line says that these are the first values only and how to get them all
(``-o feats.npy``; ``.jsonl``, ``.safetensors``, ``.parquet`` too).  Only when stdout is a
terminal and no format is asked for: piped or with ``-o``, the machine formats are as they
were.  A failed input: ``✗ error: reason``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from convnext_cli.outputs.base import TextWriter
from convnext_cli.outputs.files import OutputFile, StdoutFile
from convnext_cli.outputs.names import visible
from convnext_cli.outputs.table import (
    ERROR_MARK,
    GAP,
    cells,
    fit,
    shorten_path,
    shown_path,
    terminal_width,
)

if TYPE_CHECKING:
    from rich.text import Text

    from convnext_cli.results import Result

DIM_WIDTH = 5  # "dim" up to 99999
NORM_WIDTH = 8  # 1234.567
VALUE_WIDTH = 7  # +12.345 (each value, a space between)
MIN_VALUES = 3
HINT = "-o feats.npy writes them all"


class EmbedTableWriter(TextWriter):
    """The embed table (see the module docstring), with the text writers' life cycle."""

    def __init__(self, raw: OutputFile | StdoutFile) -> None:
        from rich.console import Console

        super().__init__(raw)
        self.width = max(40, terminal_width(self.sink))
        self.console = Console(
            file=self.sink,  # type: ignore[arg-type]
            width=self.width,
            highlight=False,
            markup=False,
            emoji=False,
        )
        self.image = 0  # decided with the first batch
        self.header_done = False

    def _layout(self, results: list[Result]) -> None:
        longest = max(cells(shown_path(r.path)) for r in results)
        fixed = 3 * len(GAP) + DIM_WIDTH + NORM_WIDTH
        room = min((self.width - fixed) * 9 // 20, self.width - fixed - MIN_VALUES * 8 - 2)
        self.image = max(len("image"), min(longest, max(12, room)))

    @property
    def values_width(self) -> int:
        return self.width - self.image - 3 * len(GAP) - DIM_WIDTH - NORM_WIDTH

    def _count(self, dimension: int) -> int:
        """How many values fit (room kept for `` …`` when some are left out)."""
        fits = (self.values_width + 1) // (VALUE_WIDTH + 1)
        if dimension > fits:
            fits = (self.values_width - 1) // (VALUE_WIDTH + 1)
        return max(1, min(fits, dimension))

    def _line(self, image: str, dim: str, norm: str, values: str) -> Text:
        from rich.text import Text

        line = Text(no_wrap=True, overflow="crop")
        line.append(image.ljust(self.image + len(image) - cells(image)))
        line.append(GAP + dim.rjust(DIM_WIDTH))
        line.append(GAP + norm.rjust(NORM_WIDTH))
        line.append(GAP + values)
        line.rstrip()
        return line

    def _header_lines(self, dimension: int | None) -> list[Text]:
        from rich.text import Text

        count = self._count(dimension or 0)
        first = f"first {count} of {dimension} values" if dimension else "first values"
        note = Text(fit(f"{first} shown; {HINT}", self.width), style="dim")
        head = self._line("image", "dim", "norm", "values")
        head.stylize("bold")
        return [note, head, Text("─" * self.width, style="dim")]

    def _row(self, result: Result) -> Text:
        from rich.text import Text

        image = shorten_path(shown_path(result.path), self.image)
        if result.error is not None or result.embedding is None:
            line = Text(no_wrap=True, overflow="crop")
            line.append(image.ljust(self.image + len(image) - cells(image)) + GAP)
            room = self.width - self.image - len(GAP)
            line.append(fit(visible(f"{ERROR_MARK} error: {result.error}"), room), "red")
            return line
        values = result.embedding.tolist()
        norm = math.sqrt(sum(v * v for v in values))
        count = self._count(len(values))
        shown = " ".join(f"{v:+.3f}".rjust(VALUE_WIDTH) for v in values[:count])
        if len(values) > count:
            shown += " …"
        return self._line(image, str(len(values)), f"{norm:.3f}", shown)

    def write(self, results: list[Result]) -> None:
        lines = []
        if not self.header_done and results:
            self._layout(results)
            dims = [len(r.embedding) for r in results if r.embedding is not None]
            lines = self._header_lines(dims[0] if dims else None)
            self.header_done = True
        for line in lines + [self._row(r) for r in results]:
            self.console.print(line, crop=True, soft_wrap=False)
        self.sink.flush()
        self.records += len(results)
