"""The writer protocol and the text formats' shared life cycle.

Every format (:mod:`convnext_cli.outputs.writers`, :mod:`convnext_cli.outputs.table`,
:mod:`convnext_cli.outputs.embed_table`, :mod:`convnext_cli.outputs.parquet`) provides
:class:`Writer`; the text ones build on :class:`TextWriter`.  This module imports no writer, so
the writers may import one another without a cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from convnext_cli.outputs.files import OutputFile, StdoutFile, TextSink

if TYPE_CHECKING:
    from convnext_cli.results import Result


class Writer(Protocol):
    """What every format provides: per-batch writes, then close (move into place) or abort."""

    records: int  # records written so far
    names_errors_on_stderr: bool  # failed inputs are not in the output (the matrix formats)

    def write(self, results: list[Result]) -> None: ...

    def close(self) -> None: ...

    def abort(self, keep: bool = False) -> None: ...


class TextWriter:
    """The text formats' shared life cycle: header at open, text per batch, footer at close."""

    names_errors_on_stderr = False

    def __init__(self, raw: OutputFile | StdoutFile) -> None:
        self.raw = raw
        self.sink = TextSink(raw)
        self.records = 0
        try:
            self._put(self.header())
        except BaseException:
            raw.abort()
            raise

    def header(self) -> str:
        return ""

    def render(self, results: list[Result]) -> str:
        raise NotImplementedError

    def footer(self) -> str:
        return ""

    def _put(self, text: str) -> None:
        if text:
            self.sink.write(text)
            self.sink.flush()

    def write(self, results: list[Result]) -> None:
        self._put(self.render(results))
        self.records += len(results)

    def preserve(self, records: list[bytes], header: bytes = b"") -> None:
        """Records an earlier run wrote (``--resume``), written again as they were."""
        if records:
            self.raw.write(b"".join(records))
            self.raw.flush()
            self.records += len(records)

    def close(self) -> None:
        self._put(self.footer())
        self.raw.commit()

    def abort(self, keep: bool = False) -> None:
        self.raw.abort(keep)
