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


def say(message: str) -> None:
    """One line on stderr, control characters in it made visible; a closed or broken stderr
    is not an error (the CLI's and the job engine's one way of saying a line)."""
    with contextlib.suppress(OSError, ValueError):
        print(visible(message), file=sys.stderr, flush=True)


def utf8_text(text: str) -> str:
    """Free text (an error message) made safe for a UTF-8 file: undecodable bytes escaped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
