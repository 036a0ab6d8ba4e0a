"""Reading weight files from disk: safetensors, pickles loaded with ``weights_only=True``,
and Keras HDF5 weights (``tf_model.h5``, through h5py: the optional ``tf`` extra).

Nothing here executes code from a checkpoint: safetensors holds bare tensors,
``torch.load(weights_only=True)`` refuses any pickle that would construct an
arbitrary object, and an HDF5 file is read as datasets of floats only (its superblock's
end-of-file address checked against the file's size first; links, external storage and
virtual datasets, which would read other files, refused; datasets behind filters, which
would inflate or load a plugin library, refused; libhdf5's plugin search path emptied).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from convnext_cli.errors import CheckpointError, ImageError, one_line
from convnext_cli.reading import open_regular_binary, parse_json

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".tar")
H5_SUFFIXES = (".h5", ".hdf5")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
MAX_H5_OBJECTS = 100_000  # groups and datasets in one HDF5 weights file (a model has ~500)
MAX_H5_DEPTH = 64  # groups nested (Keras nests about 10)

# Weight dtypes the model can be loaded from (cast to the run's dtype when built).
FLOAT_DTYPES_SAFETENSORS = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}
_ITEM_SIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# safetensors' own limit on the JSON header (100 MB); ours is the same.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy format)


def read_weights_file(path: Path) -> dict[str, Any]:
    """Return the top-level mapping stored in a weights file (tensors or nested dicts)."""
    if not path.is_file():
        _open(path).close()  # the reason, one line: no such file, a FIFO, a folder ...
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if path.suffix.lower() in H5_SUFFIXES:
        return read_h5_weights(path)
    return _read_pickle(path)


def check_h5_superblock(path: Path, handle: IO[bytes]) -> int:
    """An HDF5 file's signature and superblock, before h5py (libhdf5) parses it: the
    signature at offset 0, a known superblock version, 4- or 8-byte offsets, and an
    end-of-file address inside the file (a truncated file is refused).  Read from ``handle``
    (the file h5py then reads, left at offset 0); returns the file's size."""
    try:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(0)
        head = handle.read(96)
        handle.seek(0)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({one_line(exc)})") from exc
    if not head.startswith(HDF5_MAGIC):
        raise CheckpointError(f"{path}: not an HDF5 file (no HDF5 signature at its start)")
    if len(head) < 12:
        raise CheckpointError(f"{path}: not an HDF5 file (only {size} bytes)")
    version = head[8]
    if version in (0, 1):
        offsets, eof_at = head[13], 24 + (4 if version == 1 else 0)
        eof_at += 2 * (head[13] if head[13] in (4, 8) else 0)
    elif version in (2, 3):
        offsets = head[9]
        eof_at = 12 + 2 * (offsets if offsets in (4, 8) else 0)
    else:
        raise CheckpointError(f"{path}: unknown HDF5 superblock version {version}")
    if offsets not in (4, 8) or len(head) < eof_at + offsets:
        raise CheckpointError(f"{path}: malformed HDF5 superblock")
    eof = int.from_bytes(head[eof_at : eof_at + offsets], "little")
    if eof > size:
        raise CheckpointError(
            f"{path}: HDF5 superblock says the file ends at byte {eof}, the file has only "
            f"{size} bytes (truncated?)"
        )
    return size


def _h5py() -> Any:
    """h5py, with libhdf5's plugin loading off: no folder on its plugin search path (the
    built-in ``/usr/local/hdf5/lib/plugin`` and ``HDF5_PLUGIN_PATH``'s), so that no
    checkpoint can make it ``dlopen`` a shared library (datasets with filters are refused
    before they are read anyway)."""
    try:
        import h5py
    except ImportError:
        raise CheckpointError(
            "reading TensorFlow/Keras weights (.h5) needs h5py: pip install 'convnext-cli[tf]'"
        ) from None
    while h5py.h5pl.size():
        h5py.h5pl.remove(0)
    return h5py


def read_h5_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every float dataset of a Keras HDF5 weights file, by its path in the file
    (``convnext/tf_conv_next_for_image_classification/convnext/.../kernel:0``), as tensors in
    the file's own layout (:mod:`convnext_cli.checkpoints.layouts` maps names and transposes).

    The file is opened once, through the one safe open (a regular file, never blocking); its
    superblock is checked and h5py reads it from that same handle.  Only hard links to groups
    and contiguous or chunked datasets of float16/32/64 stored in this file, without filters,
    are read; each object once (a group linked twice, or into itself, is refused), at most
    ``MAX_H5_DEPTH`` deep and ``MAX_H5_OBJECTS`` in all; each dataset's size is checked
    against the file's before it is read.
    """
    h5py = _h5py()
    with _open(path) as handle:
        size = check_h5_superblock(path, handle)
        try:
            with h5py.File(handle, "r") as f:
                tensors = _h5_walk(path, f, size, h5py)
        except CheckpointError:
            raise
        except Exception as exc:  # h5py raises OSError, KeyError, ValueError, TypeError ...
            raise CheckpointError(
                f"{path}: not a readable HDF5 weights file ({one_line(exc)})"
            ) from exc
    if not tensors:
        raise CheckpointError(f"{path}: no weights in the HDF5 file")
    return dict(sorted(tensors.items()))


def _h5_walk(path: Path, root: Any, size: int, h5py: Any) -> dict[str, torch.Tensor]:
    """The datasets under ``root``, each object visited once (by its address in the file)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    total = 0  # bytes read so far: all the datasets together fit in the file (no filters)
    pending: list[tuple[str, Any, int]] = [("", root, 0)]
    while pending:
        prefix, group, depth = pending.pop()
        if depth > MAX_H5_DEPTH:
            raise CheckpointError(f"{path}: {prefix} nests more than {MAX_H5_DEPTH} groups deep")
        for name in group:
            where = f"{prefix}{name}"
            if not isinstance(group.get(name, getlink=True), h5py.HardLink):
                raise CheckpointError(f"{path}: {where}: links to other objects or files")
            item = group[name]
            info = h5py.h5o.get_info(item.id)
            first = seen.setdefault((info.fileno, getattr(info, "addr", hash(item.id))), where)
            if first != where:
                raise CheckpointError(
                    f"{path}: {where} is {first} again (a group linked into itself or "
                    "twice): not a weights file"
                )
            if len(seen) > MAX_H5_OBJECTS:
                raise CheckpointError(f"{path}: more than {MAX_H5_OBJECTS} groups and datasets")
            if isinstance(item, h5py.Group):
                pending.append((where + "/", item, depth + 1))
                continue
            if not isinstance(item, h5py.Dataset):  # a named datatype
                raise CheckpointError(f"{path}: {where} is neither a group nor a dataset")
            tensors[where] = _h5_tensor(path, where, item, size, size - total)
            total += tensors[where].numel() * tensors[where].element_size()
    return tensors


def _h5_tensor(path: Path, where: str, dataset: Any, size: int, room: int) -> torch.Tensor:
    """One dataset as a tensor; `size`: the file's bytes, `room`: those not yet claimed by
    the datasets read before it."""
    import math

    import numpy as np

    if dataset.is_virtual or dataset.external:
        raise CheckpointError(f"{path}: {where}: data stored outside the file")
    filters = _h5_filters(dataset)
    if filters:  # compression (a gzip bomb), shuffle, or a filter from a plugin library
        raise CheckpointError(
            f"{path}: {where} is stored through HDF5 filters ({filters}); compressed or "
            "filtered HDF5 weights are not read"
        )
    if dataset.dtype.kind != "f" or dataset.dtype.itemsize not in (2, 4, 8):
        raise CheckpointError(
            f"{path}: {where} has dtype {dataset.dtype}; weights must be floating point"
        )
    nbytes = math.prod(int(n) for n in dataset.shape) * dataset.dtype.itemsize
    if nbytes > room:
        raise CheckpointError(
            f"{path}: {where} claims {nbytes} bytes of data, more than the file holds"
        )
    chunk = math.prod(dataset.chunks or ()) * dataset.dtype.itemsize
    if dataset.chunks is not None and chunk > size:  # unfiltered, each chunk is stored whole
        raise CheckpointError(
            f"{path}: {where} has chunks of {chunk} bytes, more than the file holds"
        )
    if dataset.chunks is None and nbytes:
        offset = dataset.id.get_offset()
        if offset is None or offset + nbytes > size:
            raise CheckpointError(f"{path}: {where} lies past the end of the file (truncated?)")
    array = np.asarray(dataset[()], dtype=dataset.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(array))


def _h5_filters(dataset: Any) -> str:
    """The filters in a dataset's pipeline, by id (and name where libhdf5 knows it), read
    from its creation properties: no filter is looked up or run."""
    plist = dataset.id.get_create_plist()
    found = []
    for index in range(plist.get_nfilters()):
        code, _flags, _values, name = plist.get_filter(index)
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        found.append(f"id {code}" + (f" ({text})" if text else ""))
    return ", ".join(found)


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header before any tensor is read.

    Refuses (one line) a file too short for a header, a header length past the end of the
    file, a header that is not a JSON object, tensors of a non-float dtype, shapes that are
    not lists of non-negative integers, and data offsets that disagree with the shape or lie
    past the end of the file (a truncated file, or a header claiming huge tensors).
    """
    try:
        with _open(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            length = int.from_bytes(head, "little")
            if length > MAX_SAFETENSORS_HEADER or length > size - 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file (header length {length} does not fit "
                    f"the file's {size} bytes)"
                )
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({one_line(exc)})") from exc
    header = parse_json(raw, f"{path}: not a safetensors file (bad header)", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - length
    for name, info in header.items():
        if name != "__metadata__":
            _check_header_entry(f"{path}: tensor {name!r}", info, data_size)
    return header


def _check_header_entry(where: str, info: Any, data_size: int) -> None:
    """One tensor's header entry: a float dtype, a shape, and offsets inside the data."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: malformed header entry")
    dtype = info.get("dtype")
    if dtype not in FLOAT_DTYPES_SAFETENSORS:
        raise CheckpointError(
            f"{where} has dtype {dtype}; weights must be floating point "
            f"({', '.join(FLOAT_DTYPES_SAFETENSORS.values())})"
        )
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(f"{where}: malformed data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    begin, end = offsets
    if end < begin or end - begin != numel * _ITEM_SIZE[dtype]:
        raise CheckpointError(
            f"{where}: shape {shape} does not match its {end - begin} bytes of data"
        )
    if end > data_size:
        raise CheckpointError(
            f"{where} lies past the end of the file (truncated? it needs {end} bytes of "
            f"data, the file has {max(data_size, 0)})"
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _open(path: Path) -> IO[bytes]:
    """A weights file opened through the one safe open (a regular file, never blocking)."""
    try:
        return open_regular_binary(path)
    except ImageError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    check_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(exc)})") from exc


def _read_pickle(path: Path) -> dict[str, Any]:
    import argparse
    import pickle

    try:
        with _open(path) as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({one_line(exc)})") from exc
    if magic != ZIP_MAGIC and (not magic or magic[0] != PICKLE_PROTO):
        raise CheckpointError(
            f"{path}: not a weights file (neither safetensors nor a PyTorch zip or pickle file)"
        )
    try:
        # Training checkpoints (facebookresearch `checkpoint-*.pth`) carry their argparse
        # arguments beside the weights; a Namespace holds plain values and runs no code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors "
            f"(only weights_only pickles are read) ({one_line(exc)})"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable PyTorch weights file ({one_line(exc)})"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _is_zip(path: Path) -> bool:
    """torch's zip format can be memory-mapped; the legacy tar/pickle format cannot."""
    import zipfile

    return zipfile.is_zipfile(path)


def check_tensors(tensors: Mapping[str, Any], source: object) -> None:
    """Refuse (one line) weights of a non-float dtype, views larger than their data, or
    weights holding NaN or infinite values.

    One ``isfinite`` pass per tensor: cheap next to reading the file.
    """

    allowed = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for key, value in tensors.items():
        if value.dtype not in allowed:
            raise CheckpointError(
                f"{source}: tensor {key} has dtype {str(value.dtype).removeprefix('torch.')}; "
                "weights must be floating point (float16, bfloat16, float32 or float64)"
            )
        # A pickle can rebuild a tensor as a view far larger than its data (stride 0):
        # refused before anything touches its elements.
        held = value.untyped_storage().nbytes()
        if value.numel() * value.element_size() > held:
            raise CheckpointError(
                f"{source}: tensor {key} claims {value.numel()} elements but its data holds "
                f"{held // max(value.element_size(), 1)}; expanded or overlapping views are "
                "not weights"
            )
    bad = [k for k, v in tensors.items() if v.numel() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise CheckpointError(
            f"{source}: weights contain NaN or infinite values "
            f"({len(bad)} tensor{'s' if len(bad) > 1 else ''}: {shown})"
        )


def shape_problems(
    expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Any]
) -> str | None:
    """One line naming missing and unexpected keys and shape mismatches, or None if none."""
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(found[k])} vs expected {list(shape)}"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    problems = [
        f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    return "; ".join(problems) or None


def save_safetensors(
    state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Write a state dict as safetensors (contiguous, unshared tensors)."""
    # one contiguous, unshared copy of each tensor (safetensors refuses shared storage)
    tensors = {
        k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()
    }
    save_file(tensors, str(path), metadata=metadata)
