"""Writing results: a rich table for people; json, jsonl, csv, npy and safetensors for scripts.

Every writer has the same life cycle (:mod:`convnext_cli.outputs.files`): it is opened on its
target (stdout, or a locked ``.NAME.partial`` beside ``-o NAME``), takes one list of results
per batch and writes and flushes it at once, and ends with ``close`` (complete the file --
close the JSON array, write the matrix -- and move it into place) or ``abort`` (drop it;
the target is untouched).  Memory stays bounded by the batch: the matrix formats append
their rows to the partial file as they come.

File names are written so that any name survives exactly (see :mod:`convnext_cli.outputs.names`):
JSON strings with ``\\udcXX`` escapes for undecodable bytes; in CSV and the ``.paths.txt``
sidecar the name itself, or a JSON string when the name is not plain; in the table
(:mod:`convnext_cli.outputs.table`) the name as text (never markup) with control characters
made visible.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cli.choices import CLASSIFY_FORMATS, EMBED_FORMATS
from convnext_cli.errors import OutputError, UsageError
from convnext_cli.outputs.base import TextWriter, Writer
from convnext_cli.outputs.embed_table import EmbedTableWriter
from convnext_cli.outputs.files import OutputFile, StdoutFile, TextSink, is_stdout
from convnext_cli.outputs.names import json_text, path_field, utf8_text
from convnext_cli.outputs.table import TableWriter

if TYPE_CHECKING:
    import torch

    from convnext_cli.results import Result

BINARY_FORMATS = ("npy", "safetensors", "parquet")

# The -o extension picks the format when --format is not given (or is auto).  One table for
# every command; a command refuses a format it does not write.
FORMAT_BY_EXTENSION = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".npy": "npy",
    ".safetensors": "safetensors",
    ".parquet": "parquet",
    ".html": "html",
    ".htm": "html",
}


def format_for_extension(output: Path | None) -> str | None:
    if is_stdout(output):
        return None
    return FORMAT_BY_EXTENSION.get(Path(str(output)).suffix.lower())


def choose_format(
    command: str, fmt: str | None, output: Path | None, stdout_is_terminal: bool
) -> str:
    """The format to write: --format, else the -o extension, else the command's default.

    ``auto`` (or no --format) is the -o extension, which must then be a known one (``-o
    out.txt`` is a usage error: say --format); without -o, a table on a terminal (embed's
    shows the first values only) and JSON lines everywhere else.  An explicit format
    that contradicts the -o extension is a usage error, so is a format the command lacks.
    """
    formats = CLASSIFY_FORMATS if command == "classify" else EMBED_FORMATS
    fmt = (fmt or "auto").lower()
    if fmt not in formats:
        raise UsageError(f"unknown --format {fmt!r} (use {', '.join(formats)})")
    by_extension = format_for_extension(output)
    if fmt == "auto":
        if by_extension is not None:
            if by_extension not in formats:
                raise UsageError(
                    f"-o {output}: {command} cannot write {by_extension} "
                    f"(use {', '.join(f for f in formats if f != 'auto')})"
                )
            return by_extension
        if output is not None and not is_stdout(output) and _names_a_file(output):
            known = ", ".join(f".{f}" for f in formats if f not in ("auto", "table"))
            what = (
                f"the extension {output.suffix!r} names no format"
                if output.suffix
                else "the name has no extension to pick a format"
            )
            raise UsageError(
                f"-o {output}: {what}; name the file {known}, or say which with --format"
            )
        if is_stdout(output) and stdout_is_terminal:
            return "table"  # embed's is a short one (convnext_cli.outputs.embed_table)
        return "jsonl"
    if by_extension is not None and by_extension != fmt:
        raise UsageError(
            f"--format {fmt} contradicts -o {output} (a .{by_extension} name); change one of them"
        )
    if fmt in BINARY_FORMATS and is_stdout(output):
        raise UsageError(f"--format {fmt} writes a binary file: name it with -o FILE")
    if fmt == "html" and is_stdout(output) and stdout_is_terminal:
        raise UsageError("--format html writes a page: name it with -o report.html")
    return fmt


def _names_a_file(output: Path) -> bool:
    """``-o`` names a regular file (or one to create): not a folder (refused later, as
    such), not a device or pipe (``/dev/null``, ``/dev/full``, a FIFO: written as is)."""
    import stat

    try:
        return stat.S_ISREG(output.stat().st_mode)
    except OSError:
        return True  # to be created


DEFAULT_SCORES = "probs"
# the CSV column that holds the scores, by what they are (classify --scores)
SCORE_COLUMN = {"probs": "score", "logits": "logit", "log-probs": "log_prob"}


def classify_record(result: Result, scores: str = DEFAULT_SCORES) -> dict[str, Any]:
    """One classify record; with ``--scores logits`` or ``log-probs`` it says so in a
    ``scores`` field (a record without one holds probabilities, as every earlier file does)."""
    if result.error is not None:
        return {"path": result.path, "error": result.error}
    marker = {} if scores == DEFAULT_SCORES else {"scores": scores}
    return {
        "path": result.path,
        **marker,
        "predictions": [
            {"label": p.label, "index": p.index, "score": float(p.score)}
            for p in result.predictions
        ],
    }


def classify_record_json(result: Result, scores: str = DEFAULT_SCORES) -> str:
    return json_text(classify_record(result, scores))


def _floats_json(values: list[float]) -> str:
    """float32 values, 9 significant digits: exact round-trip, compact text."""
    return "[" + ",".join(f"{v:.9g}" for v in values) + "]"


def embed_record_json(result: Result) -> str:
    if result.error is not None:
        return json_text({"path": result.path, "error": result.error})
    path = json_text(result.path)
    if result.features is not None:  # --stage / --backbone: one key per stage, pooled
        parts = [
            f"{json_text(name)}: {_floats_json(value.tolist())}"
            for name, value in result.features.items()
        ]
        return f'{{"path": {path}, {", ".join(parts)}}}'
    assert result.embedding is not None
    return f'{{"path": {path}, "embedding": {_floats_json(result.embedding.tolist())}}}'


# ----------------------------------------------------------------------------- text formats


class JsonLinesWriter(TextWriter):
    """One JSON object per line, flushed after every batch."""

    def __init__(self, raw: OutputFile | StdoutFile, render: Any) -> None:
        self.render_one = render
        super().__init__(raw)

    def render(self, results: list[Result]) -> str:
        return "".join(self.render_one(r) + "\n" for r in results)


class JsonArrayWriter(TextWriter):
    """One JSON array, streamed element by element."""

    def __init__(self, raw: OutputFile | StdoutFile, render: Any) -> None:
        self.render_one = render
        super().__init__(raw)

    def render(self, results: list[Result]) -> str:
        parts = []
        for n, result in enumerate(results, start=self.records):
            parts.append(("[\n  " if n == 0 else ",\n  ") + self.render_one(result))
        return "".join(parts)

    def footer(self) -> str:
        return "[]\n" if self.records == 0 else "\n]\n"


def _csv_text(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


class ClassifyCsvWriter(TextWriter):
    """``path,rank,label,index,score,error``: one row per prediction, one per failed input
    (the ``score`` column is ``logit`` or ``log_prob`` with ``--scores``)."""

    def __init__(self, raw: OutputFile | StdoutFile, scores: str = DEFAULT_SCORES) -> None:
        self.score_column = SCORE_COLUMN[scores]
        super().__init__(raw)

    def header(self) -> str:
        return _csv_text([["path", "rank", "label", "index", self.score_column, "error"]])

    def render(self, results: list[Result]) -> str:
        rows: list[list[Any]] = []
        for r in results:
            path = path_field(r.path)
            if r.error is not None:
                rows.append([path, "", "", "", "", utf8_text(r.error)])
            for rank, p in enumerate(r.predictions, start=1):
                rows.append([path, rank, p.label, p.index, float(p.score), ""])
        return _csv_text(rows)


class EmbedCsvWriter(TextWriter):
    """``path,error,f0,...,f{D-1}``; the header waits for the first embedding to know D."""

    def __init__(self, raw: OutputFile | StdoutFile) -> None:
        self.pending: list[Result] = []
        self.dim: int | None = None
        super().__init__(raw)

    def _rows(self, results: list[Result]) -> list[list[Any]]:
        rows: list[list[Any]] = []
        for r in results:
            path = path_field(r.path)
            row = flat_features(r)
            if r.error is not None or row is None:
                rows.append([path, utf8_text(r.error or ""), *([""] * (self.dim or 0))])
            elif self.dim is not None and row.numel() != self.dim:  # never a ragged file
                raise OutputError(
                    f"{self.raw.display}: {r.path}: {row.numel()} values after rows of "
                    f"{self.dim}; one CSV holds one width (write a new file)"
                )
            else:
                rows.append([path, "", *(f"{v:.9g}" for v in row.tolist())])
        return rows

    def render(self, results: list[Result]) -> str:
        if self.dim is None:
            first = next((r for r in results if flat_features(r) is not None), None)
            if first is None:
                self.pending.extend(results)
                return ""
            self.dim = flat_features(first).numel()  # type: ignore[union-attr]
            if first.features is not None:  # stage1_0 .. stage1_{C-1}, stage2_0 ..
                names = [
                    f"{name}_{i}" for name, v in first.features.items() for i in range(v.numel())
                ]
            else:
                names = [f"f{i}" for i in range(self.dim)]
            header = [["path", "error", *names]]
            results, self.pending = self.pending + results, []
            return _csv_text(header + self._rows(results))
        return _csv_text(self._rows(results))

    def footer(self) -> str:
        if self.dim is None:
            return _csv_text([["path", "error"], *self._rows(self.pending)])
        return ""

    def preserve(self, records: list[bytes], header: bytes = b"") -> None:
        """Earlier rows come with their header, which fixes the width of the rows to come."""
        width = len(header.rstrip(b"\r\n").split(b",")) - 2
        if records and width > 0 and self.dim is None:
            self.dim = width
            self._put(header.decode("utf-8", "surrogateescape"))
        super().preserve(records)


# ----------------------------------------------------------------------------- matrices

NPY_HEADER_SIZE = 128  # magic, version, length and a space-padded dict: rewritten per batch


def flat_features(result: Result) -> torch.Tensor | None:
    """A result's embedding, or its stage features one after the other, as one 1-D row."""
    if result.features is not None:
        import torch

        return torch.cat([v.reshape(-1) for v in result.features.values()])
    return result.embedding


def feature_shapes(result: Result) -> dict[str, tuple[int, ...]]:
    """The name and per-input shape of every tensor a result holds (``embeddings``: (D,))."""
    if result.features is not None:
        return {name: tuple(v.shape) for name, v in result.features.items()}
    assert result.embedding is not None
    return {"embeddings": (result.embedding.numel(),)}


def npy_header(rows: int, dim: int | tuple[int, ...]) -> bytes:
    tail = ", ".join(str(n) for n in ((dim,) if isinstance(dim, int) else dim))
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {tail}), }}"
    body_size = NPY_HEADER_SIZE - 10
    body = text.ljust(body_size - 1) + "\n"
    if len(body) != body_size:
        raise OutputError(f"matrix too large for its header ({rows} x {dim})")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body_size) + body.encode("latin1")


def sidecar_path(target: Path) -> Path:
    """``NAME.npy`` -> ``NAME.paths.txt`` beside it (any other name: ``NAME.paths.txt`` added)."""
    name = target.name
    stem = name[: -len(".npy")] if name.lower().endswith(".npy") else name
    return target.with_name(stem + ".paths.txt")


class MatrixWriter:
    """npy (+ ``.paths.txt``) or safetensors (``embeddings`` + ``paths`` metadata).

    Rows go straight into the partial file as a valid ``.npy`` whose header is rewritten after
    every batch (after a kill -9 it holds every finished row); the npy sidecar is written the
    same way, one :func:`~convnext_cli.outputs.names.path_field` per line.  At close the npy partial
    is moved into place; safetensors is assembled from it beside the target.  Failed inputs
    are left out of the matrix; the caller reports them on stderr, and safetensors keeps them
    in an ``errors`` metadata entry.
    """

    names_errors_on_stderr = True

    def __init__(self, output: Path, kind: str) -> None:
        self.kind = kind
        self.rows = 0
        self.records = 0
        self.dim: int | None = None
        self.shapes: dict[str, tuple[int, ...]] | None = None  # each tensor's row shape
        self.paths: list[str] = []
        self.errors: dict[str, str] = {}
        self.matrix = OutputFile(output)
        self.sidecar: OutputFile | None = None
        try:
            if self.matrix.direct:
                raise OutputError(f"{output}: cannot write output ({kind} needs a regular file)")
            self.matrix.write(npy_header(0, 0))
            if kind == "npy":
                self.sidecar = OutputFile(sidecar_path(self.matrix.target))
        except BaseException:
            self.matrix.abort()
            raise

    def write(self, results: list[Result]) -> None:
        lines = []
        for r in results:
            row = flat_features(r)
            if row is None:
                self.errors[r.path] = r.error or "no embedding"
                continue
            if self.shapes is None:
                self.shapes = feature_shapes(r)
                self.dim = row.numel()
            elif feature_shapes(r) != self.shapes:
                raise OutputError(
                    f"{self.matrix.display}: {r.path}: features of shape "
                    f"{list(feature_shapes(r).values())} after {list(self.shapes.values())}; "
                    "one matrix needs one shape (resize the images, or use --pool avg)"
                )
            self.matrix.write(row.float().contiguous().numpy().tobytes())
            self.rows += 1
            if self.sidecar is not None:
                lines.append(path_field(r.path) + "\n")
            else:
                self.paths.append(r.path)
        if self.sidecar is not None:
            self.sidecar.write("".join(lines).encode("utf-8", "backslashreplace"))
            self.sidecar.flush()
        self.matrix.pwrite(npy_header(self.rows, self._npy_shape()), 0)
        self.records += len(results)

    def _npy_shape(self) -> int | tuple[int, ...]:
        """The npy's shape past the rows: (D,), or the one stage's (C,) / (C, H, W)."""
        if self.shapes is None or len(self.shapes) != 1:
            return self.dim or 0
        return next(iter(self.shapes.values()))

    def close(self) -> None:
        if self.sidecar is not None:
            self.sidecar.commit()
            self.matrix.commit()
        else:
            self._close_safetensors()

    def abort(self, keep: bool = False) -> None:
        if self.sidecar is not None:
            self.sidecar.abort(keep)
        self.matrix.abort(keep)

    def _close_safetensors(self) -> None:
        import shutil

        self.matrix.flush()
        dim = self.dim or 0
        metadata = {"paths": json_text(self.paths)}
        if self.errors:
            metadata["errors"] = json_text(self.errors)
        shapes = self.shapes or {"embeddings": (dim,)}
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        segments: list[
            tuple[int, int]
        ] = []  # (start within a row, length) in bytes, per tensor in file order
        for name, shape in shapes.items():
            size = math.prod(shape) * 4
            header[name] = {
                "dtype": "F32",
                "shape": [self.rows, *shape],
                "data_offsets": [offset, offset + self.rows * size],
            }
            segments.append((sum(s for _, s in segments), size))
            offset += self.rows * size
        text = json_text(header).encode("utf-8")
        text += b" " * (-len(text) % 8)
        built = self.matrix.partial.with_name(self.matrix.partial.name + ".tmp")
        try:
            with open(built, "wb") as out, open(self.matrix.partial, "rb") as rows:
                out.write(struct.pack("<Q", len(text)) + text)
                if len(segments) == 1:
                    rows.seek(NPY_HEADER_SIZE)
                    shutil.copyfileobj(rows, out, 1 << 20)
                else:  # one tensor after the other: a pass over the rows per stage
                    for start, size in segments:
                        for n in range(self.rows):
                            rows.seek(NPY_HEADER_SIZE + n * dim * 4 + start)
                            out.write(rows.read(size))
                out.flush()
        except OSError as exc:
            built.unlink(missing_ok=True)
            self.matrix.abort()
            raise OutputError(
                f"{self.matrix.display}: cannot write output ({exc.strerror})"
            ) from exc
        self.matrix.replace_with(built)


class HtmlWriter:
    """The HTML report (:mod:`convnext_cli.outputs.html`) with the common life cycle."""

    names_errors_on_stderr = False

    def __init__(
        self, raw: OutputFile | StdoutFile, top_k: int, scores: str = DEFAULT_SCORES
    ) -> None:
        from convnext_cli.outputs.html import HtmlReportWriter

        self.raw = raw
        self.records = 0
        try:
            self.report = HtmlReportWriter(TextSink(raw), top_k, scores=scores)  # type: ignore[arg-type]
        except BaseException:
            raw.abort()
            raise

    def set_run_info(self, info: dict[str, str]) -> None:
        """What made the report (shown on the page): see HtmlReportWriter.set_run_info."""
        self.report.set_run_info(info)

    def write(self, results: list[Result]) -> None:
        self.report.write(results)
        self.records += len(results)

    def close(self) -> None:
        self.report.close()
        self.raw.commit()

    def abort(self, keep: bool = False) -> None:
        if keep:
            self.report.abort()  # the page ends with what it has, marked incomplete
        self.raw.abort(keep)


# ----------------------------------------------------------------------------- opening


def open_writer(
    command: str,
    fmt: str,
    output: Path | None,
    top_k: int = 5,
    provenance: dict[str, Any] | None = None,
    resume: bool = False,
    retry_errors: bool = False,
    scores: str = DEFAULT_SCORES,
) -> Writer:
    """The writer for a command and format, opened on stdout or beside ``-o``.

    ``scores`` (classify) says what the scores are: ``probs``, ``logits`` or ``log-probs``.

    ``provenance`` (what wrote the file) goes into Parquet's metadata; ``resume`` keeps
    the rows an earlier run of a Parquet output left (text formats get them through
    ``preserve``).
    """
    if fmt == "parquet":
        from convnext_cli.outputs.parquet import ParquetRecordWriter

        if is_stdout(output):
            raise UsageError("--format parquet writes a binary file: name it with -o FILE")
        raw_file = OutputFile(output)  # type: ignore[arg-type]
        return ParquetRecordWriter(raw_file, command, provenance, resume, retry_errors)
    if fmt in BINARY_FORMATS:
        if is_stdout(output):
            raise UsageError(f"--format {fmt} writes a binary file: name it with -o FILE")
        return MatrixWriter(output, fmt)  # type: ignore[arg-type]
    raw: OutputFile | StdoutFile = StdoutFile() if is_stdout(output) else OutputFile(output)  # type: ignore[arg-type]
    render: Any = embed_record_json
    if command == "classify":
        render = classify_record_json
        if scores != DEFAULT_SCORES:
            render = functools.partial(classify_record_json, scores=scores)
    if fmt == "table" and command == "embed":
        return EmbedTableWriter(raw)
    if fmt == "table":
        return TableWriter(raw, top_k, scores)
    if fmt == "json":
        return JsonArrayWriter(raw, render)
    if fmt == "jsonl":
        return JsonLinesWriter(raw, render)
    if fmt == "csv":
        return ClassifyCsvWriter(raw, scores) if command == "classify" else EmbedCsvWriter(raw)
    if fmt == "html":
        return HtmlWriter(raw, top_k, scores)
    raw.abort()
    raise UsageError(f"unknown format {fmt!r}")


def output_targets(fmt: str, output: Path | None) -> list[Path]:
    """The files a run would write (for the check that none is an input or a checkpoint)."""
    if is_stdout(output):
        return []
    assert output is not None
    targets = [output]
    if fmt == "npy":
        import os

        targets.append(sidecar_path(Path(os.path.realpath(output))))
    return targets
