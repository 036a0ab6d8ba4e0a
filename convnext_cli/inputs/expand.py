"""Expanding command-line INPUTS (files, folders, globs, ``-`` for stdin) into ordered inputs.

The inputs come as a stream (:func:`iter_inputs`): a run starts on the first folder's images
while the rest of a huge tree is still being listed, and memory never holds the whole listing.

- A file named explicitly is always tried, whatever its extension, and whatever it is: a
  FIFO, a device, a socket, a broken symlink or a symlink loop named explicitly gets an
  error record (see :func:`convnext_cli.reading.read_file`, which refuses them without
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
  or row (see :mod:`convnext_cli.inputs.datasets`), in stored order.
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

import collections
import dataclasses
import glob
import itertools
import operator
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, cast

from convnext_cli.errors import NoInputsError, UsageError
from convnext_cli.inputs.datasets import (
    PARQUET_SUFFIXES,
    TAR_SUFFIXES,
    Item,
    check_braces,
    dataset_items,
    expand_braces,
    is_dataset_file,
    read_item,
)
from convnext_cli.outputs.names import visible
from convnext_cli.reading import (
    IMAGE_EXTENSIONS,
    MAX_LIST_LINE_BYTES,
    max_file_bytes,
    read_file,
)

InputRef = str | Item  # a file path, or a member/row of a dataset file

GLOB_CHARS = frozenset("*?[")


LISTED_EXTENSIONS = IMAGE_EXTENSIONS | frozenset(TAR_SUFFIXES + PARQUET_SUFFIXES)


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
    return list(iter_folder_images(folder, recursive, warn))


def iter_folder_images(
    folder: Path | str, recursive: bool, warn: Callable[[str], None] | None = None
) -> Iterator[str]:
    """:func:`folder_images`, one folder at a time: a folder's files (sorted) come as soon as
    that folder is read, then each sub-folder's, depth first, as ``os.walk`` orders them."""
    chunks = folder_chunks(str(folder), recursive, warn)
    return itertools.chain.from_iterable(paths for paths, _datasets in chunks)


Chunk = tuple[list[str], bool]  # listed paths, and whether any may be a dataset file


def folder_chunks(top: str, recursive: bool, warn: Callable[[str], None] | None) -> Iterator[Chunk]:
    """:func:`iter_folder_images` as lists: each folder's listed paths, sorted, in lists of
    at most :data:`SCAN_BLOCK`, each with whether it names dataset files.

    Memory holds the names of the folder being read and the sub-folders still to visit on
    the way down, never the whole tree; an explicit stack, so depth is not a recursion limit.
    """
    say = warn or (lambda _msg: None)
    try:
        files, folders, datasets = _scan(top, recursive, say)
    except OSError:
        yield [top], False  # unreadable folder named explicitly: reported as an error record
        return
    prefix = _as_prefix(top)
    yield from _paths(prefix, files, datasets)
    # (folder as a prefix, its sub-folders' names still to visit), deepest last
    stack: list[tuple[str, Iterator[str]]] = [(prefix, iter(folders))]
    while stack:
        parent, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        path = parent + name
        try:
            files, folders, datasets = _scan(path, recursive, say)
        except OSError as exc:
            say(f"{path}: cannot list this folder ({exc.strerror or exc}), skipped")
            continue
        prefix = _as_prefix(path)
        yield from _paths(prefix, files, datasets)
        if folders:
            stack.append((prefix, iter(folders)))


def _paths(prefix: str, names: list[str], datasets: bool) -> Iterator[Chunk]:
    """The paths of a folder's names, :data:`SCAN_BLOCK` at a time (what a path adds to
    its name is held for one block only)."""
    for start in range(0, len(names), SCAN_BLOCK):
        # prefix + name = os.path.join(folder, name), as DirEntry.path is
        yield list(map(prefix.__add__, names[start : start + SCAN_BLOCK])), datasets


def _as_prefix(folder: str) -> str:
    return folder if folder.endswith(os.sep) else folder + os.sep


_NAME = operator.attrgetter("name")
_IS_DIR = os.DirEntry.is_dir
_LISTED_SUFFIXES = tuple(LISTED_EXTENSIONS)


# entries held at once: a folder of a million holds its names only (public: the listing
# tests set it small to mix every kind of block)
SCAN_BLOCK = 4096


def _scan(
    folder: str, recursive: bool, say: Callable[[str], None]
) -> tuple[list[str], list[str], bool]:
    """(names of the listed files, names of the sub-folders to descend into, whether any
    file may be a dataset file) of one folder, each sorted; raises OSError when the folder
    cannot be read.

    A listing's cost is per entry, so entries are taken a block at a time and a block
    without sub-folders (the common case) is done as a whole: ``map`` over the entries, the
    extensions checked on the joined names.  A block with a sub-folder, or whose entries
    cannot all be typed, is done entry by entry.
    """
    files: list[str] = []
    folders: list[str] = []
    skipped: list[str] = []
    datasets = False
    with os.scandir(folder) as listing:
        while entries := list(itertools.islice(listing, SCAN_BLOCK)):
            names = list(map(_NAME, entries))
            try:
                kinds: list[bool] | None = list(map(_IS_DIR, entries))  # from the listing
            except OSError:  # a symlink loop, a permission: decided entry by entry
                kinds = None
            if kinds is not None and True not in kinds:
                listed, some = _listed_names(names)
                files += listed
                datasets = datasets or some
                continue
            plain: list[str] = []
            types = kinds or map(_is_dir, entries)
            for entry, name, is_dir in zip(entries, names, types, strict=True):
                if not is_dir:
                    plain.append(name)
                elif recursive and not entry.is_symlink():
                    folders.append(name)
                elif not recursive and _extension(name) in IMAGE_EXTENSIONS:
                    skipped.append(entry.path)
            listed, some = _listed_names(plain)
            files += listed
            datasets = datasets or some
    files.sort()
    folders.sort()
    for path in sorted(skipped):
        say(f"{path}: a folder named like an image, not descended (try -r)")
    return files, folders, datasets


def _listed_names(names: list[str]) -> tuple[list[str], bool]:
    """(The names, of files in one folder, that end in a listed extension, as
    :func:`is_listed` decides; whether any may be a dataset file), for all the names at
    once where it can: each name ends in a NUL in ``joined``, and only names (none holds
    one), so a name's extension followed by a NUL is found at its end only."""
    if not names:
        return names, False
    joined = "\0".join(names).lower() + "\0"
    if joined[0] == "." or "\0." in joined:  # a dot file: ".jpg" has no extension
        listed = [name for name in names if _extension(name) in LISTED_EXTENSIONS]
        return listed, _names_datasets(joined)
    # no name starts with a dot, so a name's last dot starts its extension
    first = names[0]
    extension = first[first.rfind(".") :].lower()
    if extension in LISTED_EXTENSIONS and joined.count(extension + "\0") == len(names):
        return names, extension not in IMAGE_EXTENSIONS  # all alike
    suffixes = _LISTED_SUFFIXES
    listed = [name for name in names if name.lower().endswith(suffixes)]
    return listed, _names_datasets(joined)


_DATASET_ENDINGS = tuple(suffix + "\0" for suffix in TAR_SUFFIXES + PARQUET_SUFFIXES)


def _names_datasets(joined: str) -> bool:
    """Whether lower-cased names, each ended by a NUL, hold a dataset file's."""
    return any(ending in joined for ending in _DATASET_ENDINGS)


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
    return list(iter_paths(stream, null_separated))


def iter_paths(stream: IO[Any], null_separated: bool = False) -> Iterator[str]:
    """:func:`read_paths`, each path as soon as its separator arrives (a pipe that is still
    being written gives its first paths before it ends).  A path longer than
    MAX_LIST_LINE_BYTES (``/dev/zero``, a binary file) is a usage error before more of it
    is held."""
    separator = b"\0" if null_separated else b"\n"
    rest = b""
    for chunk in _chunks_of(stream):
        pieces = (rest + chunk).split(separator)
        rest = pieces.pop()
        if len(rest) > MAX_LIST_LINE_BYTES or any(len(p) > MAX_LIST_LINE_BYTES for p in pieces):
            raise UsageError(
                f"<stdin>: a path longer than {MAX_LIST_LINE_BYTES} bytes "
                "(not a list of paths, one a line)"
            )
        for piece in pieces:
            if not null_separated and piece.endswith(b"\r"):
                piece = piece[:-1]
            if piece:
                yield os.fsdecode(piece)
    if not null_separated and rest.endswith(b"\r"):
        rest = rest[:-1]
    if rest:
        yield os.fsdecode(rest)


def _chunks_of(stream: IO[Any]) -> Iterator[bytes]:
    """A stream's bytes as they come.

    A stream on a file descriptor (stdin) is read to its end by a thread, whatever the run
    takes from it: a caller that writes all the paths before it reads any result cannot
    deadlock against a run whose output pipe is full (memory holds what is read ahead, as
    it held all of stdin before the listing was streamed).  The thread reads the descriptor
    itself (``os.read``), so it holds no lock of ``sys.stdin`` that a forked decoding
    process would inherit.
    """
    binary = getattr(stream, "buffer", stream)
    try:
        fd = binary.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None:
        read = getattr(binary, "read1", None) or binary.read  # read1: what is there
        while chunk := read(1 << 16):
            yield chunk if isinstance(chunk, bytes) else os.fsencode(chunk)
        return
    import queue
    import threading

    chunks: queue.SimpleQueue[bytes | OSError] = queue.SimpleQueue()

    def pump() -> None:
        try:
            while data := os.read(fd, 1 << 16):
                chunks.put(data)
        except OSError as exc:
            chunks.put(exc)
        chunks.put(b"")

    threading.Thread(target=pump, name="convnext-paths", daemon=True).start()
    while chunk := chunks.get():
        if isinstance(chunk, OSError):
            raise chunk
        yield chunk


def expand_inputs(inputs: Iterable[str], **options: Any) -> list[InputRef]:
    """Turn INPUTS into the ordered list of inputs to process; raise NoInputsError if empty.

    The options are :func:`iter_inputs`'s: ``recursive``, ``stdin`` (default ``sys.stdin``,
    read when an input is ``-``: newline-separated paths, or NUL-separated ones with
    ``null_separated``), ``warn``, and ``image_column``/``id_column`` for Parquet files.
    """
    return list(iter_inputs(inputs, **options))


def iter_inputs(
    inputs: Iterable[str],
    recursive: bool = False,
    stdin: IO[Any] | None = None,
    warn: Callable[[str], None] | None = None,
    null_separated: bool = False,
    image_column: str | None = None,
    id_column: str | None = None,
) -> Iterator[InputRef]:
    """:func:`expand_inputs` as a stream, in the same order: each folder is read when the
    listing reaches it, each dataset file's members or rows as they are read, stdin as it
    arrives.  Brace patterns naming too many files are refused here, before anything is
    listed; NoInputsError comes when the stream ends having given nothing."""
    given = list(inputs)
    for pattern in given:
        if pattern != "-" and not os.path.lexists(pattern):
            check_braces(pattern)
    chunks = _listed_chunks(given, recursive, stdin, warn, null_separated, image_column, id_column)
    return itertools.chain.from_iterable(chunks)


def _listed_chunks(
    inputs: list[str],
    recursive: bool,
    stdin: IO[Any] | None,
    warn: Callable[[str], None] | None,
    null_separated: bool,
    image_column: str | None,
    id_column: str | None,
) -> Iterator[list[InputRef]]:
    say = warn or (lambda _msg: None)
    unique = UniqueIds(say)
    listed = False
    for paths, datasets in _expand(inputs, recursive, stdin or sys.stdin, say, null_separated):
        if not datasets:
            listed = listed or bool(paths)
            yield unique.paths(paths)
            continue
        for path in paths:
            if is_dataset_file(path):
                for item in dataset_items(path, IMAGE_EXTENSIONS, image_column, id_column):
                    listed = True
                    yield [unique.one(item)]
            else:
                listed = True
                yield [unique.one(path)]
    if not listed:
        raise NoInputsError("no input images found")


class UniqueIds:
    """Gives every input of a run an id (its record's ``path``) of its own, so that
    ``--resume`` matches each input with its own record and no other.

    An input's id is its path or dataset id, unless an earlier input of the run already has
    that id (the same file named twice, or reached through a folder and by name; two tar
    members of one name; duplicate Parquet ids; a null id's ``FILE#ROW`` that another row
    has as its id): the N-th input with an id ``X`` is then ``X#N`` (``X#2``, ``X#3`` ...; if
    that is taken too, the next free N).  The same inputs in the same order give the same
    ids, in every run.  The first collision is said once on stderr.

    Memory: the ids of the inputs listed so far (about 100 bytes each), as a resumed run
    holds the ids already done.
    """

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.seen: set[str] = set()
        self.counts: dict[str, int] = {}
        self.warn = warn
        self.collisions = 0

    def paths(self, paths: list[str]) -> list[InputRef]:
        """A listed chunk of file paths (a folder's: no two alike), each with its own id."""
        seen = self.seen
        new = set(paths)
        if len(new) == len(paths) and seen.isdisjoint(new):
            seen |= new
            return cast(list[InputRef], paths)
        return [self.one(path) for path in paths]

    def one(self, ref: InputRef) -> InputRef:
        ident = input_id(ref)
        if ident not in self.seen:
            self.seen.add(ident)
            return ref
        number = self.counts.get(ident, 1)
        while True:
            number += 1
            renamed = f"{ident}#{number}"
            if renamed not in self.seen:
                break
        self.counts[ident] = number
        self.seen.add(renamed)
        self.collisions += 1
        if self.collisions == 1:
            self.warn(
                f"{visible(ident)}: more than one input has this id; each later one is "
                f"recorded as ID#N (here {visible(renamed)}), as is any other id shared "
                "by two inputs"
            )
        if isinstance(ref, Item):
            return dataclasses.replace(ref, id=renamed)
        return Item(renamed, file=ref, length=None)  # the whole file, read as a file


LISTING_AHEAD = 250_000  # inputs listed ahead of the run (about 40 MB of names)


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


class InputStream(Iterator[InputRef]):
    """The inputs a run processes, handed out once, in order, as they are listed.

    A thread lists (and filters) ahead of the run, at most :data:`LISTING_AHEAD` inputs
    ahead, so the first batch starts at once while ``total`` becomes known as soon as the
    listing ends (for runs of up to LISTING_AHEAD inputs, almost at once: the progress bar
    gets its ETA); ``count`` is how many it has given so far.  An error while listing (a
    refused -o, no inputs at all) is raised here, in order, after the inputs before it.

    The inputs pass through a ``deque`` (its ``append`` and ``popleft`` are atomic), not a
    ``queue.Queue``, whose locks cost more than the listing itself: each side only waits,
    on an event, when the deque is empty (the run) or full (the listing), after saying so
    and looking once more, so neither can miss the other's wake-up.
    """

    def __init__(self, source: Iterable[InputRef]) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._filled = threading.Event()  # set by the listing for a run waiting on it
        self._drained = threading.Event()  # set by the run for a listing waiting on it
        self._run_waits = False
        self._listing_waits = False
        self.count = 0
        self.total: int | None = None
        self._done = False
        thread = threading.Thread(target=self._list, args=(iter(source),), daemon=True)
        thread.start()

    def _list(self, source: Iterator[InputRef]) -> None:
        items, append, filled = self._items, self._items.append, self._filled
        listed = 0
        try:
            for item in source:  # once per input: _put, inlined
                if len(items) >= LISTING_AHEAD:
                    self._wait_for_room()
                append(item)
                listed += 1
                if self._run_waits:
                    filled.set()
        except BaseException as exc:  # handed to the run, which raises it in order
            self._put(_Failed(exc))
            return
        self.total = listed
        self._put(_END)

    def _put(self, item: Any) -> None:
        if len(self._items) >= LISTING_AHEAD:
            self._wait_for_room()
        self._items.append(item)
        if self._run_waits:
            self._filled.set()

    def _wait_for_room(self) -> None:
        self._drained.clear()
        self._listing_waits = True
        while len(self._items) >= LISTING_AHEAD:
            self._drained.wait()
            self._drained.clear()
        self._listing_waits = False

    def __iter__(self) -> InputStream:
        return self

    def __next__(self) -> InputRef:
        if self._done:
            raise StopIteration
        try:
            item = self._items.popleft()
        except IndexError:
            item = self._wait()
        if self._listing_waits:
            self._drained.set()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.exc
        self.count += 1
        return cast(InputRef, item)

    def _wait(self) -> Any:
        """The next item, once the listing has put it."""
        while True:
            self._filled.clear()
            self._run_waits = True
            try:
                return self._items.popleft()  # put before the listing saw _run_waits
            except IndexError:
                self._filled.wait()
            finally:
                self._run_waits = False


def _expand(
    inputs: Iterable[str],
    recursive: bool,
    stdin: IO[Any],
    warn: Callable[[str], None],
    null_separated: bool,
) -> Iterator[Chunk]:
    for given in inputs:
        for item in [given] if given == "-" or os.path.lexists(given) else expand_braces(given):
            yield from _expand_one(item, recursive, stdin, warn, null_separated)


def _expand_one(
    item: str, recursive: bool, stdin: IO[Any], warn: Callable[[str], None], null_separated: bool
) -> Iterator[Chunk]:
    """The paths one INPUT names, in lists (a folder's at a time, or one by one), each with
    whether it may name a dataset file."""
    if item == "-":
        yield from (([path], True) for path in iter_paths(stdin, null_separated))
        return
    path = Path(item).expanduser() if item.startswith("~") else Path(item)
    if path.is_dir():
        found = False
        for paths in folder_chunks(str(path), recursive, warn):
            found = True
            yield paths
        if not found and is_image_name(item.rstrip("/" + os.sep)):
            yield [item], False  # x.jpg/ named explicitly, holding no image: an error record
        elif not found:
            warn(f"{item}: no images in this folder" + ("" if recursive else " (try -r)"))
    elif os.path.lexists(path) or not GLOB_CHARS.intersection(item):
        yield [str(path) if item.startswith("~") else item], True
    else:
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        found = False
        for match in matches:
            if os.path.isdir(match):
                for paths in folder_chunks(str(Path(match)), recursive, warn):
                    found = True
                    yield paths
            elif is_listed(match):
                found = True
                yield [match], True
        if not found:
            warn(f"{item}: pattern matched no images")


def listed_chunks(
    inputs: Iterable[str],
    recursive: bool = False,
    stdin: IO[Any] | None = None,
    warn: Callable[[str], None] | None = None,
    null_separated: bool = False,
) -> Iterator[Chunk]:
    """The paths INPUTS name, as they are listed (a folder's, a block at a time), each list
    with whether it may name dataset files, whose members are *not* listed here: what a
    distributed run hands out as units of work (``engine/ray/units.py``).  Brace patterns
    naming too many files are refused before anything is listed."""
    given = list(inputs)
    for pattern in given:
        if pattern != "-" and not os.path.lexists(pattern):
            check_braces(pattern)
    say = warn or (lambda _msg: None)
    return _expand(given, recursive, stdin or sys.stdin, say, null_separated)
