"""``convnext embed`` on a terminal: a short table, not 768 floats per image.

One line per input: its path (as given, shortened in the middle only when it does not fit),
the embedding's dimension, its L2 norm and its first values, as many as the width allows.
With ``--stage`` / ``--backbone`` (pooled features), one line per stage, its name in a
``stage`` column, the path on the first.  Above the table one line says that these are
the first values only and how to get them all (``-o feats.npy``; ``-o feats.safetensors``
for several stages, which one npy array cannot hold).  Only when stdout is a terminal and
no format is asked for: piped or with ``-o``, the machine formats are as they were.  A
failed input: ``✗ error: reason``.
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
STAGES_HINT = "-o feats.safetensors writes them all (an array a stage)"


def _vectors(result: Result) -> list[tuple[str, list[float]]]:
    """What a result's lines show: ("", its embedding), or (stage name, its feature) for
    each stage asked (``--stage`` / ``--backbone``), in order."""
    if result.features is not None:
        return [(name, value.reshape(-1).tolist()) for name, value in result.features.items()]
    if result.embedding is not None:
        return [("", result.embedding.tolist())]
    return []


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
        self.stage = 0  # the stage column's width (0: no stage column)
        self.several = False  # several stages: one npy array cannot hold them
        self.header_done = False

    def _layout(self, results: list[Result]) -> None:
        longest = max(cells(shown_path(r.path)) for r in results)
        stages = [name for r in results for name, _values in _vectors(r)]
        self.stage = max((len("stage"), *map(len, stages))) if any(stages) else 0
        fixed = 3 * len(GAP) + DIM_WIDTH + NORM_WIDTH + self._stage_cells
        room = min((self.width - fixed) * 9 // 20, self.width - fixed - MIN_VALUES * 8 - 2)
        self.image = max(len("image"), min(longest, max(12, room)))

    @property
    def _stage_cells(self) -> int:
        return self.stage + len(GAP) if self.stage else 0

    @property
    def values_width(self) -> int:
        fixed = 3 * len(GAP) + DIM_WIDTH + NORM_WIDTH + self._stage_cells
        return self.width - self.image - fixed

    def _count(self, dimension: int) -> int:
        """How many values fit (room kept for `` …`` when some are left out)."""
        fits = (self.values_width + 1) // (VALUE_WIDTH + 1)
        if dimension > fits:
            fits = (self.values_width - 1) // (VALUE_WIDTH + 1)
        return max(1, min(fits, dimension))

    def _line(self, image: str, stage: str, dim: str, norm: str, values: str) -> Text:
        from rich.text import Text

        line = Text(no_wrap=True, overflow="crop")
        line.append(image.ljust(self.image + len(image) - cells(image)))
        if self.stage:
            line.append(GAP + stage.ljust(self.stage))
        line.append(GAP + dim.rjust(DIM_WIDTH))
        line.append(GAP + norm.rjust(NORM_WIDTH))
        line.append(GAP + values)
        line.rstrip()
        return line

    def _header_lines(self, dimension: int | None) -> list[Text]:
        from rich.text import Text

        count = self._count(dimension or 0)
        several = self.stage and self.several  # stages of different sizes
        first = f"first {count} of {dimension} values" if dimension and not several else ""
        hint = STAGES_HINT if several else HINT
        first = first or "first values"
        note = Text(fit(f"{first} shown; {hint}", self.width), style="dim")
        head = self._line("image", "stage", "dim", "norm", "values")
        head.stylize("bold")
        return [note, head, Text("─" * self.width, style="dim")]

    def _rows(self, result: Result) -> list[Text]:
        from rich.text import Text

        image = shorten_path(shown_path(result.path), self.image)
        vectors = _vectors(result)
        if result.error is not None or not vectors:
            line = Text(no_wrap=True, overflow="crop")
            line.append(image.ljust(self.image + len(image) - cells(image)) + GAP)
            room = self.width - self.image - len(GAP)
            reason = result.error or "no embedding was computed"
            line.append(fit(visible(f"{ERROR_MARK} error: {reason}"), room), "red")
            return [line]
        lines = []
        for n, (stage, values) in enumerate(vectors):
            norm = math.sqrt(sum(v * v for v in values))
            count = self._count(len(values))
            shown = " ".join(f"{v:+.3f}".rjust(VALUE_WIDTH) for v in values[:count])
            if len(values) > count:
                shown += " …"
            row = self._line(image if n == 0 else "", stage, str(len(values)), f"{norm:.3f}", shown)
            lines.append(row)
        return lines

    def write(self, results: list[Result]) -> None:
        lines = []
        if not self.header_done and results:
            self._layout(results)
            shapes = [[len(values) for _stage, values in _vectors(r)] for r in results]
            shapes = [shape for shape in shapes if shape]
            self.several = bool(shapes) and len(shapes[0]) > 1
            lines = self._header_lines(shapes[0][0] if shapes else None)
            self.header_done = True
        for line in lines + [row for r in results for row in self._rows(r)]:
            self.console.print(line, crop=True, soft_wrap=False)
        self.sink.flush()
        self.records += len(results)
