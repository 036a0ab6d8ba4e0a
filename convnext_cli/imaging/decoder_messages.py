"""Pillow's error texts, worded in the tool's own terms with Pillow's detail kept.

Pillow says ``Truncated File Read`` or ``broken data stream when reading image file``; a
record then reads ``cannot read the image: the file ends too early (Pillow: Truncated File
Read)``.  A text not known here is kept as it is, after the tool's own words.
"""

from __future__ import annotations

import re

from convnext_cli.errors import one_line

# (pattern in Pillow's text, what it means for the user's file)
_MEANINGS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), meaning)
    for pattern, meaning in (
        (r"truncated|premature end|unexpected end|end of file|EOF", "the file ends too early"),
        (r"broken data stream|decoder error|bad (huffman|quantization)|corrupt",
         "its compressed data is damaged"),
        (r"unrecognized data stream", "its data is not what its format says"),
        (r"buffer is not large enough|not enough data", "the file ends too early"),
        (r"crc|checksum", "a checksum does not match (the file is damaged)"),
        (r"not a (png|jpeg|gif|bmp|tiff|webp)|invalid .*header|unsupported .*header|"
         r"syntax error|bad magic", "its header is damaged or not of its format"),
        (r"unsupported|unknown .*(mode|compression|format)|not supported",
         "it uses a variant this decoder does not support"),
    )
)  # fmt: skip


def pillow_words(exc: BaseException) -> str:
    """``the file ends too early (Pillow: Truncated File Read)``."""
    raw = one_line(exc)
    for pattern, meaning in _MEANINGS:
        if pattern.search(raw):
            return f"{meaning} (Pillow: {raw})"
    return f"Pillow: {raw}"
