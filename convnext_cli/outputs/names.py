"""File names in records: any name the file system allows, valid UTF-8 out, bytes recoverable.

Python hands us a non-UTF-8 file name as a ``str`` holding lone surrogates
(``surrogateescape``: byte 0x80 becomes U+DC80).  Such a string cannot be written as UTF-8,
and names may also hold newlines, tabs, escape sequences or line separators that break a
line-based reader or a terminal.  The forms below keep every name exact and every output
valid UTF-8:

- **JSON** (json, jsonl, safetensors metadata): a JSON string.  Lone surrogates are written as
  ``\\udcXX`` escapes, and so are DEL, the C1 controls and U+2028/U+2029 (C0 controls are
  escaped by JSON itself), so that a record never spans two lines for any line splitter.
  ``os.fsencode(json.loads(line)["path"])`` gives the original bytes back.
- **CSV and the npy ``.paths.txt`` sidecar** (:func:`path_field`): a plain name is written as
  is; a name that is not plain -- it holds a control character, a line or paragraph
  separator, a non-UTF-8 byte, begins with ``"`` or begins or ends with white space -- is
  written as the JSON string above, quotes included.  A field that starts with ``"`` is
  therefore JSON; read it back with :func:`read_path_field`, then ``os.fsencode``.  A sidecar
  has exactly one line per row, whatever the names.
- **Tables, stderr and the HTML report** (:func:`visible`, :func:`escape_char`): for people;
  control characters, bidirectional-text controls and undecodable bytes are shown as escapes
  (``\\n``, ``\\t``, ``\\x1b``, ``\\x80``, ``\\u202e``), never interpreted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import unicodedata
from typing import Any

# Characters JSON may carry raw but a line splitter (str.splitlines, JavaScript) or a UTF-8
# encoder would trip on: DEL, the C1 controls, the line/paragraph separators, surrogates.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _unicode_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_text(value: Any) -> str:
    """``json.dumps`` whose output is always valid UTF-8 and always one line."""
    return _JSON_UNSAFE.sub(_unicode_escape, json.dumps(value, ensure_ascii=False))


def _is_plain(path: str) -> bool:
    if not path or path[0] == '"' or path != path.strip():
        return False
    return not any(unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") for ch in path)


def path_field(path: str) -> str:
    """A path for a CSV cell or a sidecar line: the name itself, or a JSON string if not plain."""
    return path if _is_plain(path) else json_text(path)


def read_path_field(field: str) -> str:
    """The inverse of :func:`path_field` (``os.fsencode`` of it gives the original bytes)."""
    return json.loads(field) if field.startswith('"') else field


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# bidirectional-text controls (embeddings, overrides, isolates, marks) and the byte-order mark:
# invisible, and they reorder what a terminal or a browser shows
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"
)


def escape_char(ch: str) -> str | None:
    """The visible escape for a character that must not be shown as itself, else None.

    The one rule for people-facing text: the terminal (:func:`visible`) and the HTML report
    agree on what is dangerous.
    """
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape carries it
        return f"\\x{code - 0xDC00:02x}"
    if ch in BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs"):
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return None


def visible(text: str) -> str:
    """Text for a terminal: control characters and undecodable bytes shown as escapes."""
    if text.isprintable():
        return text
    return "".join(escape_char(ch) or ch for ch in text)


def stderr_columns() -> int | None:
    """The width of the terminal stderr is, or None when stderr is not a terminal (a file or
    a pipe gets each line whole, for grep and logs)."""
    try:
        if sys.stderr is None or not sys.stderr.isatty():
            return None
        return os.get_terminal_size(sys.stderr.fileno()).columns or None
    except (AttributeError, OSError, ValueError):
        return None


def _fold(word: str, first: int, width: int) -> list[str]:
    """A word wider than a whole line (a long path): ``first`` cells of it, then pieces of
    ``width`` cells."""
    from rich.cells import cell_len

    pieces, piece, room = [], "", first
    for ch in word:
        if cell_len(piece + ch) > room:
            pieces.append(piece)
            piece, room = "", width
        piece += ch
    return [*pieces, piece]


def wrap_words(line: str, width: int) -> list[str]:
    """``line`` wrapped at spaces into lines of at most ``width`` cells (wide characters
    count two), never inside a word (``--resume``, ``float32`` and ``cannot`` stay whole);
    the lines after the first are indented two spaces more than ``line`` itself.  Only a
    word wider than a whole line is cut, where the terminal would have cut it anyway."""
    from rich.cells import cell_len

    if cell_len(line) <= width:
        return [line]
    indent = line[: len(line) - len(line.lstrip(" "))]
    hanging = indent + "  "
    room = width - cell_len(hanging)
    if room < 12:  # too narrow to wrap usefully: the terminal's way
        return [line]
    lines: list[str] = []
    current = indent
    for word in line.split():
        used = cell_len(current)
        gap = " " if current.strip() else ""
        if used + len(gap) + cell_len(word) <= width:
            current += gap + word
        elif cell_len(word) <= room:
            lines.append(current)
            current = hanging + word
        else:  # no line holds it whole: cut, from where this line stands
            pieces = _fold(word, width - used - len(gap), room)
            current += gap + pieces[0]
            for piece in pieces[1:]:
                lines.append(current)
                current = hanging + piece
    lines.append(current)
    return [one for one in lines if one.strip()]


def say(message: str) -> None:
    """A line on stderr, control characters in it made visible; a closed or broken stderr
    is not an error (the CLI's and the job engine's one way of saying a line).

    On a terminal the line is wrapped at spaces to the terminal's width (:func:`wrap_words`):
    a terminal would break it inside a word.  A file or a pipe gets it whole."""
    text = visible(message)
    with contextlib.suppress(OSError, ValueError):
        width = stderr_columns()
        if width is not None:
            text = "\n".join(wrap_words(text, width))
        print(text, file=sys.stderr, flush=True)


def utf8_text(text: str) -> str:
    """Free text (an error message) made safe for a UTF-8 file: undecodable bytes escaped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
