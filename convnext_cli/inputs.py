"""Expanding command-line INPUTS (files, folders, globs, ``-`` for stdin) into an ordered path list.

- A file named explicitly is always tried, whatever its extension, and whatever it is: a
  FIFO, a device, a socket, a broken symlink or a symlink loop named explicitly gets an
  error record (see :func:`convnext_cli.images.read_file`, which refuses them without
  blocking).  A folder named explicitly contributes its images; one named like an image
  (``x.jpg/``) that holds none gets an error record ("is a directory, not an image").
- A folder contributes the entries in it whose names end in an image extension
  (case-insensitive), sorted; with ``recursive`` it descends into sub-folders (sorted by
  relative path; symlinked sub-folders are not followed, so a symlink loop cannot recurse).
  Policy for what a listing meets, the same with or without ``recursive``:

  - an entry named like an image that is not a regular file (FIFO, device, socket, broken
    symlink, symlink loop, unreadable file) is listed, so it gets an error record saying
    what it is: nothing that looks like an image is silently skipped;
  - a sub-folder is a folder whatever its name (``x.jpg/`` too): descended with
    ``recursive``, skipped without it (a warning names a sub-folder named like an image);
  - a sub-folder that cannot be listed (permissions) gets a warning on stderr, as does a
    folder with no images; a folder named explicitly that cannot be listed gets an error
    record.
- A glob contributes the matching image files, sorted.  Brace patterns are expanded first,
  as a shell would (``shards/{00000..00099}.tar``, ``{train,val}/``), for shells and
  scripts that pass them quoted.
- Dataset files (``.tar`` WebDataset shards, ``.parquet`` files of image bytes), named
  explicitly, found in a folder or matched by a glob, contribute one input per image member
  or row (see :mod:`convnext_cli.dataset_inputs`), in stored order.
- ``-`` reads paths from standard input, one a line (only the line ending, ``\\n`` or
  ``\\r\\n``, is removed: spaces and every other character are kept; empty lines are
  skipped), or NUL-separated with ``null_separated`` (``find -print0``).  Paths are read
  as bytes and decoded with :func:`os.fsdecode`, so names that are not valid UTF-8 survive
  (as surrogate escapes: ``os.fsencode(path)`` gives the original bytes back).
- Names are kept exactly as the file system gives them (``os.listdir``'s str, surrogate
  escapes included): newlines, tabs, quotes, commas, backslashes, a leading dash, ``[bold]``.
- A path that does not exist is kept: it gets an error record, so nothing is silently lost.
"""

from __future__ import annotations

import glob
import operator
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from convnext_cli.dataset_inputs import (
    PARQUET_SUFFIXES,
    TAR_SUFFIXES,
    Item,
    dataset_items,
    expand_braces,
    is_dataset_file,
    read_item,
)
from convnext_cli.errors import NoInputsError
from convnext_cli.images import IMAGE_EXTENSIONS, max_file_bytes, read_file

InputRef = str | Item  # a file path, or a member/row of a dataset file

GLOB_CHARS = frozenset("*?[")


LISTED_EXTENSIONS = IMAGE_EXTENSIONS | frozenset(TAR_SUFFIXES + PARQUET_SUFFIXES)
_BY_NAME = operator.attrgetter("name")


def _extension(name: str) -> str:
    """``os.path.splitext(name)[1].lower()``, for the name of a folder entry, but cheaper
    (a listing calls it once per file)."""
    dot = name.rfind(".")
    if dot <= 0 or not name[:dot].strip("."):
        return ""
    return name[dot:].lower()


def is_image_name(name: str) -> bool:
    return _extension(os.path.basename(name)) in IMAGE_EXTENSIONS


def is_listed(name: str) -> bool:
    """What a folder listing or a glob contributes: images and dataset files."""
    return _extension(os.path.basename(name)) in LISTED_EXTENSIONS


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def folder_images(
    folder: Path | str, recursive: bool, warn: Callable[[str], None] | None = None
) -> list[str]:
    """Entries named like images in a folder (optionally its sub-folders), sorted by relative
    path; see the module docstring for what is listed."""
    say = warn or (lambda _msg: None)
    top = str(folder)
    try:
        entries = sorted(os.scandir(top), key=_BY_NAME)
    except OSError:
        return [top]  # unreadable folder named explicitly: reported as an error record
    found: list[str] = []
    _list_entries(entries, recursive, say, found)
    return found


def _list_entries(
    entries: list[os.DirEntry[str]], recursive: bool, say: Callable[[str], None], found: list[str]
) -> None:
    # files of this folder first, then each sub-folder's, as os.walk orders them
    folders = []
    for entry in entries:
        name = entry.name  # _extension(name), inlined: this loop runs once per file
        dot = name.rfind(".")
        ext = name[dot:].lower() if dot > 0 and (name[0] != "." or name[:dot].strip(".")) else ""
        if _is_dir(entry):
            if recursive and not entry.is_symlink():
                folders.append(entry)
            elif not recursive and ext in IMAGE_EXTENSIONS:
                say(f"{entry.path}: a folder named like an image, not descended (try -r)")
        elif ext in LISTED_EXTENSIONS:
            found.append(entry.path)
    for sub in folders:
        try:
            children = sorted(os.scandir(sub.path), key=_BY_NAME)
        except OSError as exc:
            say(f"{sub.path}: cannot list this folder ({exc.strerror or exc}), skipped")
            continue
        _list_entries(children, recursive, say, found)


def read_input(ref: InputRef) -> bytes:
    """An input's encoded bytes: a file (within the size cap) or a dataset member or row."""
    if isinstance(ref, Item):
        return read_item(ref, max_file_bytes())
    return read_file(ref)


def input_id(ref: InputRef) -> str:
    """What an input's record says as ``path``: the path itself, or the dataset id."""
    return ref.id if isinstance(ref, Item) else ref


def read_paths(stream: IO[Any], null_separated: bool = False) -> list[str]:
    """Paths from a stream: one a line (only ``\\n`` / ``\\r\\n`` removed) or NUL-separated.

    Binary streams (or text streams with a ``buffer``, like ``sys.stdin``) are read as bytes
    and decoded with :func:`os.fsdecode`, so non-UTF-8 names survive.
    """
    binary = getattr(stream, "buffer", stream)
    data = binary.read()
    raw = data if isinstance(data, bytes) else os.fsencode(data)
    if null_separated:
        items = raw.split(b"\0")
    else:
        items = [line[:-1] if line.endswith(b"\r") else line for line in raw.split(b"\n")]
    return [os.fsdecode(item) for item in items if item]


def expand_inputs(
    inputs: Iterable[str],
    recursive: bool = False,
    stdin: IO[Any] | None = None,
    warn: Callable[[str], None] | None = None,
    null_separated: bool = False,
    image_column: str | None = None,
    id_column: str | None = None,
) -> list[InputRef]:
    """Turn INPUTS into the ordered list of inputs to process; raise NoInputsError if empty.

    `stdin` (default ``sys.stdin``) is read when an input is ``-``: newline-separated paths,
    or NUL-separated ones with `null_separated`.  Dataset files become their members/rows;
    `image_column` and `id_column` choose a Parquet file's columns.
    """
    found: list[InputRef] = []
    say = warn or (lambda _msg: None)
    for path in _expand(inputs, recursive, stdin or sys.stdin, say, null_separated):
        # .tar, .parquet, .pq end in r, t, q: a cheap test first (once per input)
        if path[-1:] in "rRtTqQ" and is_dataset_file(path):
            found.extend(dataset_items(path, IMAGE_EXTENSIONS, image_column, id_column))
        else:
            found.append(path)
    if not found:
        raise NoInputsError("no input images found")
    return found


def _expand(
    inputs: Iterable[str],
    recursive: bool,
    stdin: IO[Any],
    warn: Callable[[str], None],
    null_separated: bool,
) -> Iterator[str]:
    for given in inputs:
        for item in [given] if given == "-" or os.path.lexists(given) else expand_braces(given):
            yield from _expand_one(item, recursive, stdin, warn, null_separated)


def _expand_one(
    item: str, recursive: bool, stdin: IO[Any], warn: Callable[[str], None], null_separated: bool
) -> Iterator[str]:
    if item == "-":
        yield from read_paths(stdin, null_separated)
        return
    path = Path(item).expanduser() if item.startswith("~") else Path(item)
    if path.is_dir():
        found = folder_images(path, recursive, warn)
        if not found and is_image_name(item.rstrip("/" + os.sep)):
            yield item  # x.jpg/ named explicitly, holding no image: an error record
            return
        if not found:
            warn(f"{item}: no images in this folder" + ("" if recursive else " (try -r)"))
        yield from found
    elif os.path.lexists(path) or not GLOB_CHARS.intersection(item):
        yield str(path) if item.startswith("~") else item
    else:
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        images = []
        for match in matches:
            if os.path.isdir(match):
                images.extend(folder_images(Path(match), recursive, warn))
            elif is_listed(match):
                images.append(match)
        if not images:
            warn(f"{item}: pattern matched no images")
        yield from images
