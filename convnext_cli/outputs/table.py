"""``--format table``: one table for any number of images, streamed as batches finish.

The table is plain aligned lines, not a box per batch: one header, printed with the first
batch, then one line per prediction (``-k 1``: one line per image).  Its column widths are
decided once, with the first batch, from the width of the terminal it is printed on (a
file or a pipe: ``COLUMNS``, else 80) and the first batch's paths (an image column no
wider than they need leaves the labels more room), so every row lines up with the header
and no line is wider than the terminal:

- **image**: the path in the form it was given (or listed from a folder given), shortened in
  the middle only when too long (``photos/2024-summer…/IMG_0001.jpg``: the file name is kept
  whole while it fits, else its end); never wrapped.
- **label**: cut with ``…`` when too long (ImageNet-22k names are comma lists of up to 175
  characters); the top label in bold.
- **#** (rank, not with ``-k 1``), **index** (only from 110 columns), **score** (4
  decimals: the table is the one place scores are rounded) and a **bar** of the score.
- A failed input: ``✗`` and the red ``error: reason`` across the label, score and bar
  columns (wrapped over up to three lines there, then cut).

Names and labels are shown as text, never read as markup, with control characters and
undecodable bytes made visible (:func:`convnext_cli.outputs.names.visible`).  Colours and bold only
when the output is a terminal (and ``NO_COLOR`` is unset); the layout is the same without.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

from convnext_cli.outputs.base import TextWriter
from convnext_cli.outputs.files import OutputFile, StdoutFile
from convnext_cli.outputs.names import visible

if TYPE_CHECKING:
    from rich.text import Text

    from convnext_cli.results import Prediction, Result

ELLIPSIS = "…"
ERROR_MARK = "✗"
GAP = "  "
SCORE_WIDTH = 6  # 0.1234
INDEX_WIDTH = 5  # up to 21840 (ImageNet-22k)
MIN_WIDTH = 40
ERROR_LINES = 3
_BAR_EIGHTHS = " ▏▎▍▌▋▊▉"


def cells(text: str) -> int:
    from rich.cells import cell_len

    return cell_len(text)


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` cells, ending in ``…`` when cut."""
    from rich.cells import set_cell_size

    if width <= 0:
        return ""
    if cells(text) <= width:
        return text
    return set_cell_size(text, width - 1).rstrip() + ELLIPSIS


def _head(text: str, width: int) -> str:
    """The first characters of ``text`` that fill at most ``width`` cells."""
    out, used = [], 0
    for ch in text:
        size = cells(ch)
        if used + size > width:
            break
        out.append(ch)
        used += size
    return "".join(out)


def _tail(text: str, width: int) -> str:
    """The last characters of ``text`` that fill at most ``width`` cells."""
    return _head(text[::-1], width)[::-1]


def shorten_middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` cells with ``…`` in the middle, more of its end kept."""
    if cells(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    room = width - 1
    tail = _tail(text, room - room * 2 // 5)
    head = _head(text, room - cells(tail))
    return head + ELLIPSIS + tail


def shorten_path(path: str, width: int) -> str:
    """A path in at most ``width`` cells, shortened in the middle and never wrapped.

    The file name stays whole while it fits (``photos/2024-summer…/IMG_0001.jpg``,
    ``…/IMG_0001.jpg``); a name too long for the column keeps its start and its end.
    """
    if cells(path) <= width:
        return path
    head, sep, name = path.rpartition("/")
    if sep and cells(name) + 2 <= width:
        kept = _head(head, width - cells(name) - 2)  # 2: "…/"
        if "/" in kept and len(kept) - kept.rindex("/") <= 6:
            kept = kept[: kept.rindex("/")]  # no stub of a folder name: end at a whole one
            if cells(kept) + cells(name) + 3 <= width:
                return f"{kept}/{ELLIPSIS}/{name}"
        elif "/" not in kept and len(kept) < min(6, len(head)):
            kept = ""
        return f"{kept}{ELLIPSIS}/{name}"
    return shorten_middle(name if sep else path, width)


def shown_path(path: str, cwd: str | None = None) -> str:
    """The path as the table shows it: in the form the user gave it (an absolute path stays
    absolute, ``./x`` stays ``./x``), control characters made visible; only
    :func:`shorten_path` shortens it, when it does not fit.  (``cwd`` is not used.)"""
    return visible(path)


def bar(score: float, width: int) -> str:
    """``score`` (0..1) as a bar of ``width`` cells, in eighths of a cell."""
    if width <= 0:
        return ""
    eighths = round(min(max(score, 0.0), 1.0) * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + (_BAR_EIGHTHS[part] if part else "")
    return text.ljust(width)


def terminal_width(sink: object) -> int:
    """The width to lay the table out for: the terminal's when ``sink`` is one, else
    ``COLUMNS``, else 80."""
    try:
        if sink.isatty():  # type: ignore[attr-defined]
            return os.get_terminal_size(sink.fileno()).columns  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        pass
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else 80


@dataclass(frozen=True)
class ColumnLayout:
    """Column widths, decided once from the total width and top-k."""

    width: int
    compact: bool  # -k 1: no rank column
    image: int
    rank: int
    label: int
    index: int  # 0: no index column
    bar: int  # 0: no bar

    @classmethod
    def for_width(cls, width: int, top_k: int, longest_path: int | None = None) -> ColumnLayout:
        """The layout for ``width`` cells; the image column no wider than ``longest_path``
        (the first batch's longest, in cells) needs, the label column takes the rest."""
        width = max(width, MIN_WIDTH)
        compact = top_k == 1
        rank = 0 if compact else len(str(top_k))
        index = INDEX_WIDTH if width >= 110 else 0
        bar_cells = 12 if width >= 120 else 8 if width >= 70 else 0
        fixed = SCORE_WIDTH + (1 + bar_cells if bar_cells else 0)
        fixed += (len(GAP) + rank if rank else 0) + (len(GAP) + index if index else 0)
        rest = width - fixed - 2 * len(GAP)  # the gaps after image and after label
        image = min(56, max(12, rest * 9 // 20))
        if longest_path is not None:
            image = max(min(image, longest_path), len("image"))
        return cls(width, compact, image, rank, rest - image, index, bar_cells)

    @property
    def error_width(self) -> int:
        """The cells an error message spans: label, index, score and bar columns."""
        return self.width - self.image - len(GAP) - (self.rank + len(GAP) if self.rank else 0)


class TableWriter(TextWriter):
    """The table for people (see the module's docstring), with the text writers' life cycle."""

    def __init__(self, raw: OutputFile | StdoutFile, top_k: int, scores: str = "probs") -> None:
        from rich.console import Console

        super().__init__(raw)
        top_k = top_k if top_k > 0 else 1000  # -k all: room for a 4-digit rank
        self.top_k = top_k
        self.scores = scores  # probs, logits or log-probs (classify --scores)
        self.layout = ColumnLayout.for_width(terminal_width(self.sink), top_k)
        self.console = Console(
            file=self.sink,  # type: ignore[arg-type]
            width=self.layout.width,
            highlight=False,
            markup=False,
            emoji=False,
        )
        try:
            self.cwd: str | None = os.getcwd()
        except OSError:
            self.cwd = None
        self.header_done = False

    # ------------------------------------------------------------------ rows

    def _cells(self, image: str, rank: Text | str, *rest: Text | str) -> Text:
        """One line: the image column, the rank column (if any), then the rest as given."""
        from rich.text import Text

        line = Text(no_wrap=True, overflow="crop")
        line.append(image.ljust(self.layout.image + (len(image) - cells(image))))
        if self.layout.rank:
            line.append(GAP)
            line.append(rank if isinstance(rank, Text) else Text(rank.rjust(self.layout.rank)))
        for part in rest:
            line.append(part)
        line.rstrip()
        return line

    def header(self) -> str:
        return ""  # printed with the first batch, through the console (styles)

    def _header_lines(self) -> list[Text]:
        from rich.text import Text

        layout = self.layout
        label = Text(GAP + "label".ljust(layout.label))
        if layout.index:
            label.append(GAP + "index")
        heading = {"logits": "logit", "log-probs": "log-p"}.get(self.scores, "score")
        label.append(GAP + heading.rjust(SCORE_WIDTH))
        head = self._cells("image", "#", label)
        head.stylize("bold")
        rule = Text("─" * layout.width, style="dim")
        return [head, rule]

    def _prediction(self, image: str, rank: int, prediction: Prediction) -> Text:
        from rich.text import Text

        layout = self.layout
        label, index, score = prediction.label, prediction.index, prediction.score
        rest = Text(GAP)
        name = fit(visible(label), layout.label)
        rest.append(name.ljust(layout.label + len(name) - cells(name)), "bold" if rank == 1 else "")
        if layout.index:
            rest.append(GAP + str(index).rjust(layout.index), "dim")
        shown = f"{score:.4f}" if score == score else "n/a"  # NaN never reaches here
        rest.append(GAP + shown.rjust(SCORE_WIDTH))
        if layout.bar and self.scores != "logits":
            shown_as = math.exp(score) if self.scores == "log-probs" else score
            rest.append(" ")
            rest.append(bar(shown_as, layout.bar), "green")
        return self._cells(image, Text(str(rank).rjust(layout.rank), "dim"), rest)

    def _error(self, image: str, error: str) -> list[Text]:
        from rich.text import Text

        layout = self.layout
        width = layout.error_width - len(GAP)
        message = visible(f"error: {error}")
        if layout.compact:
            message = f"{ERROR_MARK} {message}"
        wrapped = textwrap.wrap(message, max(width, 10)) or [message]
        if len(wrapped) > ERROR_LINES:
            wrapped = wrapped[: ERROR_LINES - 1] + [
                fit(" ".join(wrapped[ERROR_LINES - 1 :]), width)
            ]
        lines = []
        for n, part in enumerate(wrapped):
            mark = Text(ERROR_MARK.rjust(layout.rank), "bold red") if n == 0 else ""
            rest = Text(GAP)
            rest.append(fit(part, width), "red")
            lines.append(self._cells(image if n == 0 else "", mark, rest))
        return lines

    def rows(self, results: list[Result]) -> list[Text]:
        lines: list[Text] = []
        for r in results:
            image = shorten_path(shown_path(r.path, self.cwd), self.layout.image)
            if r.error is not None:
                lines.extend(self._error(image, r.error))
                continue
            for rank, p in enumerate(r.predictions, start=1):
                lines.append(self._prediction(image if rank == 1 else "", rank, p))
            if not r.predictions:  # nothing to show, but the image has its line
                lines.append(self._cells(image, ""))
        return lines

    # ------------------------------------------------------------------ life cycle

    def write(self, results: list[Result]) -> None:
        lines = []
        if not self.header_done and results:
            # the widths are fixed now, the image column fitted to the first batch's paths
            longest = max(cells(shown_path(r.path, self.cwd)) for r in results)
            self.layout = ColumnLayout.for_width(self.layout.width, self.top_k, longest)
            lines = self._header_lines()
            self.header_done = True
        for line in lines + self.rows(results):
            self.console.print(line, crop=True, soft_wrap=False)
        self.sink.flush()
        self.records += len(results)
