"""The client side of ``convnext serve``: classify and embed use a running server by
themselves when it can do exactly what was asked, through :class:`RemoteRunner`, a
stand-in for the engine's :class:`~convnext_cli.engine.pipeline.Runner`.

The job engine (:mod:`convnext_cli.engine.job`) runs as it always does -- it lists the
inputs, plans the output, checks resume provenance and writes every record with the same
writers -- and only asks its ``loader`` for the runner: here, one whose batches come from
the server.  No torch import on this side.  If the server goes away mid-run, the inputs it
has not answered are run in-process (one note): no record is lost or written twice.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from convnext_cli.errors import ConvNextError
from convnext_cli.limits import env_flag
from convnext_cli.results import Input, Prediction, Result, input_name, source_of
from convnext_cli.serve import protocol
from convnext_cli.serve.paths import usable_socket

if TYPE_CHECKING:
    from convnext_cli.engine.job import Job, Report

SERVER_ENV = "CONVNEXT_SERVER"  # 0: never use a running server
CONNECT_SECONDS = 5.0
CHUNK = 256  # inputs sent at a time


class ServerGone(Exception):
    """The server answered an error, broke the protocol, or went away."""


class Connection:
    """A connection to the server: requests and answers, as frames."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: dict[str, Any]) -> None:
        try:
            protocol.send(self.sock, message)
        except OSError as exc:
            raise ServerGone(f"the connection broke ({exc.strerror or exc})") from exc

    def receive(self) -> tuple[dict[str, Any], bytes]:
        try:
            message, blob = protocol.receive(
                self.sock, protocol.MAX_RESPONSE_JSON, protocol.MAX_RESPONSE_BLOB, wait=None
            )
        except (OSError, EOFError) as exc:
            raise ServerGone("the server went away") from exc
        except protocol.ProtocolError as exc:
            raise ServerGone(str(exc)) from exc
        if "error" in message:
            raise ServerGone(str(message["error"]))
        return message, blob

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send(message)
        return self.receive()[0]

    def close(self) -> None:
        self.sock.close()


def connect(timeout: float = CONNECT_SECONDS) -> Connection | None:
    """A connection to this user's running server, or None (none runs, or its socket is
    stale or not this user's)."""
    path = usable_socket()
    if path is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return Connection(sock)


def server_enabled(no_server: bool = False) -> bool:
    """Whether classify/embed may use a running server: not with ``--no-server`` or
    ``CONVNEXT_SERVER=0``."""
    return not no_server and env_flag(SERVER_ENV, True)


def servable(job: Job) -> bool:
    """What a server runs: the local engine's classify, and embed's pooled features."""
    return job.engine == "local" and not job.stages and not job.backbone


def use_server(job: Job, no_server: bool = False) -> None:
    """Let ``job`` load its model from a running server where one can serve it."""
    if servable(job) and server_enabled(no_server):
        job.loader = load_remote


def model_reference(model: str) -> str:
    """A model option as a server (in another working folder) reads it: a local file or
    folder as an absolute path, a Hub id as it is."""
    if os.path.exists(os.path.expanduser(model)):
        return protocol.absolute(os.path.expanduser(model))
    return model


def _source(job: Job) -> dict[str, Any]:
    model = model_reference(job.model)
    labels = None if job.labels is None else protocol.absolute(str(job.labels))
    cache_dir = None if job.cache_dir is None else protocol.absolute(str(job.cache_dir))
    return {
        "model": model,
        "revision": job.revision,
        "cache_dir": cache_dir,
        "token": job.token,
        "labels": labels,
    }


def load_remote(job: Job, report: Report) -> RemoteRunner | None:
    """The job's model from the running server (None: there is none, or it cannot do
    exactly this, and the job loads its own)."""
    conn = connect()
    if conn is None:
        return None
    options = {
        "device": job.device,
        "dtype": job.dtype,
        "decode": job.decode,
        "compile": job.compile_model,
    }
    message = {"op": "load", "source": _source(job), "options": options}
    try:
        facts = conn.request({**message, "env": protocol.environment_key()})["facts"]
        runner = RemoteRunner(conn, facts, job, report)
    except (ServerGone, KeyError, TypeError, ValueError) as exc:
        conn.close()
        if str(exc).startswith("mismatch"):
            report.note("note: the running convnext server has another environment: running here")
        return None  # a model the server cannot load: the in-process load says why
    for note in runner.notes:
        report.note(f"note: {note}")
    return runner


class RemoteConfig:
    """The model's config as the engine reads it (``to_dict``, ``labels``)."""

    def __init__(self, values: dict[str, Any], labels: list[str] | None) -> None:
        self.values = values
        self.labels = labels or []

    def to_dict(self) -> dict[str, Any]:
        return self.values


class RemoteSpec:
    """The preprocessing as the engine reads it (``to_dict``)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def to_dict(self) -> dict[str, Any]:
        return self.values


class RemoteModel:
    def __init__(self, config: RemoteConfig) -> None:
        self.config = config


class RemoteRunner:
    """What the job engine uses of a Runner -- ``model.config``, ``spec``, ``device``,
    ``dtype``, ``jpeg_on_device``, ``labels``, ``classify`` and ``embed`` -- with the model
    in the server."""

    def __init__(self, conn: Connection, facts: dict[str, Any], job: Job, report: Report):
        self.conn = conn
        self.job = job
        self.report = report
        labels = facts["labels"]
        if labels is not None and not all(isinstance(x, str) for x in labels):
            raise ValueError("labels")
        self.labels: list[str] | None = labels
        self.model = RemoteModel(RemoteConfig(protocol.unpack_value(facts["config"]), labels))
        self.spec = RemoteSpec(protocol.unpack_value(facts["spec"]))
        self.device = str(facts["device"])
        self.dtype = str(facts["dtype"])
        self.jpeg_on_device = bool(facts["jpeg_on_device"])
        self.notes = [str(n) for n in facts["notes"]]
        self.times = None
        self.served = f"convnext serve, pid {int(facts['pid'])}"

    def classify(
        self,
        paths: Iterable[Input],
        top_k: int = 5,
        batch_size: int | None = None,
        workers: int | None = None,
        scores: str = "probs",
    ) -> Iterator[list[Result]]:
        task = {"command": "classify", "top_k": top_k, "scores": scores, "batch_size": batch_size}
        kwargs = {"top_k": top_k, "batch_size": batch_size, "workers": workers, "scores": scores}
        return self._run(paths, task, workers, "classify", kwargs)

    def embed(
        self,
        paths: Iterable[Input],
        normalize: bool = False,
        batch_size: int | None = None,
        workers: int | None = None,
        stages: list[str] | None = None,
        pool: str = "avg",
        backbone: bool = False,
    ) -> Iterator[list[Result]]:
        if stages or backbone:
            raise ConvNextError("--stage/--backbone are run in-process, not by the server")
        task = {"command": "embed", "normalize": normalize, "batch_size": batch_size}
        kwargs = {"normalize": normalize, "batch_size": batch_size, "workers": workers}
        return self._run(paths, task, workers, "embed", kwargs)

    def _run(
        self,
        items: Iterable[Input],
        task: dict[str, Any],
        workers: int | None,
        method: str,
        kwargs: dict[str, Any],
    ) -> Iterator[list[Result]]:
        """The results of ``items`` from the server, batch by batch; what it has not
        answered when it goes away is run here."""
        stream = iter(items)
        pending: deque[Input] = deque()
        try:
            chunk, end = _take(stream)
            pending.extend(chunk)
            request = {"op": "run", "task": task, "workers": workers, "end": end}
            self.conn.send({**request, "items": [protocol.pack_item(i) for i in chunk]})  # type: ignore[arg-type]
            while True:
                message, blob = self.conn.receive()
                if "results" in message:
                    yield self._results(message["results"], blob, pending)
                elif message.get("more"):
                    chunk, end = _take(stream)
                    pending.extend(chunk)
                    items_sent = [protocol.pack_item(i) for i in chunk]  # type: ignore[arg-type]
                    self.conn.send({"items": items_sent, "end": end})
                elif "done" in message:
                    if pending:
                        raise ServerGone("the server left inputs unanswered")
                    return
                else:
                    raise ServerGone("an answer out of the protocol")
        except ServerGone as exc:
            self.conn.close()
            self.report.note(f"note: the server stopped mid-run ({exc}); finishing here")
            local = self._local()
            yield from getattr(local, method)(itertools.chain(pending, stream), **kwargs)
        finally:
            self.conn.close()

    def _results(self, records: Any, blob: bytes, pending: deque[Input]) -> list[Result]:
        """A batch of records from the server, each for the next input sent."""
        if not isinstance(records, list) or len(records) > len(pending):
            raise ServerGone("more results than inputs")
        labels = self.labels or []
        batch = []
        for item, record in zip(pending, records, strict=False):  # popped once all are read
            result = Result(path=input_name(item), source=source_of(item))
            try:
                if "e" in record:
                    result.error = str(record["e"])
                elif "v" in record:
                    start, count = record["v"]
                    result.embedding = protocol.float_row(blob, start, count)  # type: ignore[assignment]
                else:
                    result.predictions = [
                        Prediction(labels[int(i)], int(i), float(s)) for i, s in record["p"]
                    ]
            except (KeyError, TypeError, ValueError, IndexError, protocol.ProtocolError) as exc:
                raise ServerGone("a malformed result") from exc
            batch.append(result)
        for _ in batch:
            pending.popleft()
        return batch

    def _local(self) -> Any:
        """The model loaded in this process, for the rest of the run."""
        from convnext_cli.engine.loading import load_runner

        def on_note(text: str) -> None:
            self.report.note(f"note: {text}")

        return load_runner(self.job.model_source(), self.job.run_options(), on_note).runner


def _take(stream: Iterator[Input]) -> tuple[list[Input], bool]:
    """The next inputs to send, and whether they are the last."""
    chunk = list(itertools.islice(stream, CHUNK))
    return chunk, len(chunk) < CHUNK
