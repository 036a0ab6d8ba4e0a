"""Writing results: a rich table for people; json, jsonl, csv, npy and safetensors for scripts.

Every writer takes one list of results per batch and writes it at once (jsonl and csv are
flushed per batch), so output streams and memory stays bounded by the batch.  The binary
embedding formats spool rows to a temporary file and assemble the matrix at the end.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from convnext_cli.errors import UsageError

if TYPE_CHECKING:
    from convnext_cli.pipeline import Result

CLASSIFY_FORMATS = ("auto", "table", "json", "jsonl", "csv")
EMBED_FORMATS = ("jsonl", "json", "csv", "npy", "safetensors")
BINARY_FORMATS = ("npy", "safetensors")


class Writer(Protocol):
    def write(self, results: list[Result]) -> None: ...

    def close(self) -> None: ...


def _score(value: float) -> float:
    return round(float(value), 6)


def classify_record(result: Result) -> dict[str, Any]:
    if result.error is not None:
        return {"path": result.path, "error": result.error}
    return {
        "path": result.path,
        "predictions": [
            {"label": p.label, "index": p.index, "score": _score(p.score)}
            for p in result.predictions
        ],
    }


def classify_record_json(result: Result) -> str:
    return json.dumps(classify_record(result), ensure_ascii=False)


def _floats_json(values: list[float]) -> str:
    """float32 values, 9 significant digits: exact round-trip, compact text."""
    return "[" + ",".join(f"{v:.9g}" for v in values) + "]"


def embed_record_json(result: Result) -> str:
    if result.error is not None:
        return json.dumps({"path": result.path, "error": result.error}, ensure_ascii=False)
    assert result.embedding is not None
    path = json.dumps(result.path, ensure_ascii=False)
    return f'{{"path": {path}, "embedding": {_floats_json(result.embedding.tolist())}}}'


class JsonLinesWriter:
    """One JSON object per line, flushed after every batch."""

    def __init__(self, stream: IO[str], render: Any) -> None:
        self.stream = stream
        self.render = render

    def write(self, results: list[Result]) -> None:
        for result in results:
            self.stream.write(self.render(result) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class JsonArrayWriter:
    """One JSON array, streamed element by element."""

    def __init__(self, stream: IO[str], render: Any) -> None:
        self.stream = stream
        self.render = render
        self.count = 0

    def write(self, results: list[Result]) -> None:
        for result in results:
            self.stream.write(("[\n  " if self.count == 0 else ",\n  ") + self.render(result))
            self.count += 1
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("[]\n" if self.count == 0 else "\n]\n")
        self.stream.flush()


class ClassifyCsvWriter:
    """``path,rank,label,index,score,error``: one row per prediction, one per failed input."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.csv = csv.writer(stream, lineterminator="\n")
        self.csv.writerow(["path", "rank", "label", "index", "score", "error"])

    def write(self, results: list[Result]) -> None:
        for r in results:
            if r.error is not None:
                self.csv.writerow([r.path, "", "", "", "", r.error])
            for rank, p in enumerate(r.predictions, start=1):
                self.csv.writerow([r.path, rank, p.label, p.index, _score(p.score), ""])
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class EmbedCsvWriter:
    """``path,error,f0,...,f{D-1}``; the header waits for the first embedding to know D."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.csv = csv.writer(stream, lineterminator="\n")
        self.pending: list[Result] = []
        self.dim: int | None = None

    def _header(self, dim: int) -> None:
        self.dim = dim
        self.csv.writerow(["path", "error", *(f"f{i}" for i in range(dim))])

    def write(self, results: list[Result]) -> None:
        if self.dim is None:
            first = next((r for r in results if r.embedding is not None), None)
            if first is None:
                self.pending.extend(results)
                return
            self._header(first.embedding.numel())  # type: ignore[union-attr]
            results, self.pending = self.pending + results, []
        for r in results:
            if r.error is not None or r.embedding is None:
                self.csv.writerow([r.path, r.error or "", *([""] * (self.dim or 0))])
            else:
                self.csv.writerow([r.path, "", *(f"{v:.9g}" for v in r.embedding.tolist())])
        self.stream.flush()

    def close(self) -> None:
        if self.dim is None:
            self.csv.writerow(["path", "error"])
            for r in self.pending:
                self.csv.writerow([r.path, r.error or ""])
        self.stream.flush()


class MatrixWriter:
    """npy (+ ``.paths.txt``) or safetensors (``embeddings`` + ``paths`` metadata).

    Rows are spooled to a temporary file beside the output, so memory does not grow with
    the number of inputs.  Failed inputs are left out of the matrix; the paths say which
    row is which, and the failures are reported by the caller on stderr.
    """

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.paths: list[str] = []
        self.dim: int | None = None
        self.errors: dict[str, str] = {}
        try:
            fd, spool = tempfile.mkstemp(prefix=".convnext-", suffix=".f32", dir=path.parent)
        except OSError as exc:
            raise UsageError(f"{path}: cannot write output ({exc.strerror})") from exc
        self.spool_path = Path(spool)
        self.spool = os.fdopen(fd, "wb")

    def write(self, results: list[Result]) -> None:
        for r in results:
            if r.embedding is None:
                self.errors[r.path] = r.error or "no embedding"
                continue
            if self.dim is None:
                self.dim = r.embedding.numel()
            self.spool.write(r.embedding.float().contiguous().numpy().tobytes())
            self.paths.append(r.path)

    def close(self) -> None:
        self.spool.close()
        try:
            if self.kind == "npy":
                self._write_npy()
            else:
                self._write_safetensors()
        finally:
            self.spool_path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop the spool without writing anything (the run failed or was interrupted)."""
        self.spool.close()
        self.spool_path.unlink(missing_ok=True)

    def _write_npy(self) -> None:
        import numpy as np
        from numpy.lib import format as npformat

        shape = (len(self.paths), self.dim or 0)
        with open(self.path, "wb") as out, open(self.spool_path, "rb") as spool:
            npformat.write_array_header_1_0(
                out, {"descr": np.dtype("<f4").str, "fortran_order": False, "shape": shape}
            )
            shutil.copyfileobj(spool, out)
        sidecar = self.path.with_name(self.path.name.removesuffix(".npy") + ".paths.txt")
        sidecar.write_text("".join(p + "\n" for p in self.paths))

    def _write_safetensors(self) -> None:
        import numpy as np
        import torch
        from safetensors.torch import save_file

        rows = len(self.paths)
        if rows:
            data = np.fromfile(self.spool_path, dtype="<f4").reshape(rows, self.dim or 0)
            matrix = torch.from_numpy(data)
        else:
            matrix = torch.zeros(0, 0)
        metadata = {"paths": json.dumps(self.paths, ensure_ascii=False)}
        if self.errors:
            metadata["errors"] = json.dumps(self.errors, ensure_ascii=False)
        save_file({"embeddings": matrix}, str(self.path), metadata=metadata)


class TableWriter:
    """A rich table per batch: each image's top-k labels with a score bar."""

    def __init__(self, stream: IO[str], top_k: int) -> None:
        from rich.console import Console

        self.console = Console(file=stream, highlight=False)
        self.top_k = top_k

    def write(self, results: list[Result]) -> None:
        from rich.bar import Bar
        from rich.table import Table
        from rich.text import Text

        table = Table(show_header=True, header_style="bold", expand=False)
        table.add_column("image", overflow="fold", max_width=48)
        table.add_column("#", justify="right", style="dim")
        table.add_column("label", overflow="fold", max_width=40)
        table.add_column("index", justify="right", style="dim")
        table.add_column("score", justify="right")
        table.add_column("", min_width=20, max_width=20)
        for n, r in enumerate(results):
            if n:
                table.add_section()
            if r.error is not None:
                table.add_row(r.path, "", Text(f"error: {r.error}", style="red"), "", "", "")
                continue
            for rank, p in enumerate(r.predictions, start=1):
                table.add_row(
                    r.path if rank == 1 else "",
                    str(rank),
                    Text(p.label, style="bold" if rank == 1 else ""),
                    str(p.index),
                    f"{p.score:.4f}",
                    Bar(size=1.0, begin=0.0, end=p.score, width=20, color="green"),
                )
        self.console.print(table)

    def close(self) -> None:
        self.console.file.flush()


def classify_writer(fmt: str, stream: IO[str], top_k: int) -> Writer:
    if fmt == "table":
        return TableWriter(stream, top_k)
    if fmt == "json":
        return JsonArrayWriter(stream, classify_record_json)
    if fmt == "jsonl":
        return JsonLinesWriter(stream, classify_record_json)
    if fmt == "csv":
        return ClassifyCsvWriter(stream)
    raise UsageError(f"unknown format {fmt!r} (use {', '.join(CLASSIFY_FORMATS)})")


def embed_writer(fmt: str, stream: IO[str]) -> Writer:
    """Text formats; npy and safetensors are a MatrixWriter on the -o path."""
    if fmt == "jsonl":
        return JsonLinesWriter(stream, embed_record_json)
    if fmt == "json":
        return JsonArrayWriter(stream, embed_record_json)
    if fmt == "csv":
        return EmbedCsvWriter(stream)
    raise UsageError(f"unknown format {fmt!r} (use {', '.join(EMBED_FORMATS)})")
