"""Expanding command-line INPUTS (files, folders, globs, ``-`` for stdin) into an ordered path list.

- A file named explicitly is always tried, whatever its extension.
- A folder contributes the images in it (by extension, case-insensitive), sorted; with
  ``recursive`` it descends into sub-folders (sorted by relative path).
- A glob contributes the matching image files, sorted.
- ``-`` reads newline-separated paths from standard input; each is a file named explicitly.
- A path that does not exist is kept: it gets an error record, so nothing is silently lost.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

from convnext_cli.errors import NoInputsError
from convnext_cli.images import IMAGE_EXTENSIONS

GLOB_CHARS = frozenset("*?[")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def folder_images(folder: Path, recursive: bool) -> list[str]:
    """Image files in a folder (optionally its sub-folders), sorted by relative path."""
    found: list[str] = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            found.extend(os.path.join(root, f) for f in sorted(files) if is_image_name(f))
        return found
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return [str(folder)]  # unreadable folder: reported as an error record
    return [e.path for e in entries if e.is_file() and is_image_name(e.name)]


def expand_inputs(
    inputs: Iterable[str],
    recursive: bool = False,
    stdin: TextIO | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[str]:
    """Turn INPUTS into the ordered list of paths to process; raise NoInputsError if empty."""
    paths: list[str] = []
    for item in _expand(inputs, recursive, stdin or sys.stdin, warn or (lambda _msg: None)):
        paths.append(item)
    if not paths:
        raise NoInputsError("no input images found")
    return paths


def _expand(
    inputs: Iterable[str], recursive: bool, stdin: TextIO, warn: Callable[[str], None]
) -> Iterator[str]:
    for item in inputs:
        if item == "-":
            yield from (line.strip() for line in stdin if line.strip())
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            found = folder_images(path, recursive)
            if not found:
                warn(f"{item}: no images in this folder" + ("" if recursive else " (try -r)"))
            yield from found
        elif path.exists() or not GLOB_CHARS.intersection(item):
            yield str(path) if item.startswith("~") else item
        else:
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            images = []
            for match in matches:
                if os.path.isdir(match):
                    images.extend(folder_images(Path(match), recursive))
                elif is_image_name(match):
                    images.append(match)
            if not images:
                warn(f"{item}: pattern matched no images")
            yield from images
