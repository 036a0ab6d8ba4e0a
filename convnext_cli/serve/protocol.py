"""The wire between ``convnext serve`` and its clients.

A frame is an 8-byte header (the JSON's length, then the blob's, big-endian), a JSON object
and a blob of raw bytes (the float32 embeddings of a batch of results).  Every size is
bounded before anything is read, and a frame once begun must arrive within
:data:`FRAME_SECONDS`.  The messages:

- ``{"op": "status"}``, ``{"op": "stop"}``: what the server holds; stop it.
- ``{"op": "load", "source": ..., "options": ..., "env": ...}``: the model (loaded, or from
  the server's cache) for this connection; the answer is its facts (config, preprocessing,
  labels, device, dtype, decoder, the loading notes).
- ``{"op": "run", "task": ..., "workers": N, "items": [...], "end": bool}``: the engine's
  :class:`~convnext_cli.engine.task.Task` on these inputs (file paths, absolute; dataset
  members).  The server answers ``{"results": [...]}`` per batch, ``{"more": true}`` when it
  needs the next inputs (the client answers ``{"items": [...], "end": bool}``), and
  ``{"done": N}`` at the end.  Any answer may be ``{"error": "one line"}`` instead.

Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import time
from array import array
from dataclasses import asdict
from typing import Any

from convnext_cli.inputs.datasets import Item
from convnext_cli.inputs.expand import InputRef

HEADER = struct.Struct(">II")
MAX_REQUEST_JSON = 4 << 20  # what a client may send in one frame
MAX_REQUEST_BLOB = 0  # requests carry paths, not bytes
MAX_RESPONSE_JSON = 1 << 30  # -k all on 21,841 classes at batch 256 is about 150 MB
MAX_RESPONSE_BLOB = 1 << 30
MAX_ITEMS = 1024  # inputs per frame
MAX_PATH_CHARS = 16_384
FRAME_SECONDS = 30.0  # a frame, once begun, arrives within this
IDLE_SECONDS = 600.0  # an open connection with no request for this long is closed
ITEM_FIELDS = ("id", "file", "offset", "length", "row_group", "row", "column", "error")
# environment variables that change what a run loads or computes: a server started with
# other values than the client has is not used (the client runs in-process instead)
ENV_PREFIXES = ("CONVNEXT_", "HF_", "HUGGINGFACE_", "PYTORCH_", "TORCH_")
ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
ENV_IGNORED = ("CONVNEXT_SERVER", "CONVNEXT_DEBUG")


class ProtocolError(Exception):
    """A frame or message that breaks the protocol (the connection is then closed)."""


def send(sock: socket.socket, message: dict[str, Any], blob: bytes = b"") -> None:
    """One frame: the message as JSON (no NaN or infinity), then the blob."""
    data = json.dumps(message, allow_nan=False, separators=(",", ":")).encode()
    sock.sendall(HEADER.pack(len(data), len(blob)) + data + blob)


def _exactly(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    chunks = []
    while size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError("frame not received in time")
            sock.settimeout(left)
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def receive(
    sock: socket.socket,
    max_json: int,
    max_blob: int,
    wait: float | None = IDLE_SECONDS,
    frame_seconds: float | None = FRAME_SECONDS,
) -> tuple[dict[str, Any], bytes]:
    """The next frame: its message and blob.  ``EOFError`` when the peer closed the
    connection; ``ProtocolError`` for a frame over the bounds, late, or not a JSON object;
    ``TimeoutError`` when nothing came within ``wait`` seconds (None: wait for ever)."""
    sock.settimeout(wait)
    first = sock.recv(1)
    if not first:
        raise EOFError("connection closed")
    deadline = None if frame_seconds is None else time.monotonic() + frame_seconds
    head = first + _exactly(sock, HEADER.size - 1, deadline)
    json_size, blob_size = HEADER.unpack(head)
    if json_size > max_json or blob_size > max_blob:
        raise ProtocolError(f"frame of {json_size} + {blob_size} bytes is over the limit")
    data = _exactly(sock, json_size, deadline)
    blob = _exactly(sock, blob_size, deadline)
    try:
        message = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("frame is not valid JSON") from exc
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message, blob


# ------------------------------------------------------------------------------ inputs


def absolute(path: str) -> str:
    """``path`` for a process with another working folder: joined to this one's, not
    normalised (``link/..`` resolves as the kernel would here)."""
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def pack_item(ref: InputRef) -> Any:
    """An input for the wire: a file path (absolute), or a dataset member's fields."""
    if isinstance(ref, str):
        return absolute(ref)
    fields = asdict(ref)
    if ref.file is not None:
        fields["file"] = absolute(ref.file)
    return fields


def _path(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_PATH_CHARS:
        raise ProtocolError(f"{what}: not a path")
    if "\0" in value or not os.path.isabs(value):
        raise ProtocolError(f"{what}: not an absolute path")
    return value


def _optional(value: Any, kind: type, what: str) -> Any:
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ProtocolError(f"item {what}: not a {kind.__name__}")
    return value


def unpack_item(value: Any) -> InputRef:
    """An input from the wire, checked: an absolute path, or a dataset member."""
    if isinstance(value, str):
        return _path(value, "item")
    if not isinstance(value, dict) or set(value) - set(ITEM_FIELDS) or "id" not in value:
        raise ProtocolError("item: neither a path nor a dataset member")
    ident = value["id"]
    if not isinstance(ident, str) or len(ident) > MAX_PATH_CHARS:
        raise ProtocolError("item id: not a string")
    file = value.get("file")
    return Item(
        ident,
        file=None if file is None else _path(file, "item file"),
        offset=_optional(value.get("offset", 0), int, "offset") or 0,
        length=_optional(value.get("length"), int, "length"),
        row_group=_optional(value.get("row_group"), int, "row_group"),
        row=_optional(value.get("row", 0), int, "row") or 0,
        column=_optional(value.get("column"), str, "column"),
        error=_optional(value.get("error"), str, "error"),
    )


def unpack_items(value: Any) -> list[InputRef]:
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise ProtocolError(f"items: a list of at most {MAX_ITEMS} inputs")
    return [unpack_item(one) for one in value]


# ---------------------------------------------------------------- values and results


def pack_value(value: Any) -> Any:
    """A config's or preprocessing's dict for JSON, integer keys kept (``id2label``), so
    that the client's ``json.dumps(..., sort_keys=True)`` of it is the server's."""
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: pack_value(v) for k, v in value.items()}
        return {"__items__": [[k, pack_value(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [pack_value(v) for v in value]
    return value


def unpack_value(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__items__"}:
            return {k: unpack_value(v) for k, v in value["__items__"]}
        return {k: unpack_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unpack_value(v) for v in value]
    return value


class FloatRow:
    """A 1-D float32 vector the writers take as they take a CPU tensor (``tolist``,
    ``numel``, ``float``, ``contiguous``, ``numpy().tobytes()``, ``shape``), without torch."""

    def __init__(self, values: array) -> None:
        self.values = values
        self.shape = (len(values),)

    def tolist(self) -> list[float]:
        return self.values.tolist()

    def numel(self) -> int:
        return len(self.values)

    def float(self) -> FloatRow:
        return self

    def contiguous(self) -> FloatRow:
        return self

    def reshape(self, *_shape: Any) -> FloatRow:
        return self

    def numpy(self) -> FloatRow:
        return self

    def tobytes(self) -> bytes:
        return self.values.tobytes()


def float_row(blob: bytes, start: int, count: int) -> FloatRow:
    """``count`` little-endian float32 values of ``blob`` from float ``start``."""
    if start < 0 or count < 0 or 4 * (start + count) > len(blob):
        raise ProtocolError("embedding out of the frame's bytes")
    values = array("f")
    values.frombytes(blob[4 * start : 4 * (start + count)])
    if struct.pack("=f", 1.0) != struct.pack("<f", 1.0):
        values.byteswap()
    return FloatRow(values)


def environment_key() -> str:
    """A digest of what in this process's environment changes a run (see
    :data:`ENV_PREFIXES`), the package's location and version."""
    from convnext_cli import __version__

    chosen = sorted(
        (name, value)
        for name, value in os.environ.items()
        if (name.startswith(ENV_PREFIXES) or name in ENV_NAMES) and name not in ENV_IGNORED
    )
    where = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = json.dumps([__version__, where, chosen])
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
