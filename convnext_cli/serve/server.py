"""The resident process behind ``convnext serve``: models loaded once and kept, inputs
received on a Unix socket, the engine's own :class:`~convnext_cli.engine.task.Task` run on
the engine's own :class:`~convnext_cli.engine.pipeline.Runner` (loaded by
:func:`~convnext_cli.engine.loading.load_runner`), results sent back batch by batch.

- Models are kept in a :class:`ModelCache`, least recently used dropped beyond a memory
  budget; each is keyed by everything that changes its numbers (the reference, revision,
  the files' sizes and times, labels, device, dtype, decoder, compile).
- Only the same user is served (``SO_PEERCRED``), on a socket of mode 0600 in a 0700 folder;
  one server per socket (a lock file held for the server's life: a socket left by
  ``kill -9`` is found stale and replaced).
- Every request is bounded (:mod:`~convnext_cli.serve.protocol`); a malformed one gets an
  error and the connection is closed, never the server.  Inputs are read with the run's own
  safe readers and limits, in the run's decode guard process, kept between requests (a
  :class:`~convnext_cli.engine.decode_pool.PoolKeeper` per model: a warm call forks nothing;
  a guard that dies is replaced, and its input blamed, as in a run).
- One line per request on stderr.  SIGTERM / SIGINT / ``--stop``: no new request, the ones
  in flight finish (for at most :data:`GRACE_SECONDS`), then the socket goes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convnext_cli.engine.decode_pool import PoolKeeper
from convnext_cli.engine.loading import LoadedRunner, ModelSource, RunOptions, load_runner
from convnext_cli.engine.task import Task
from convnext_cli.errors import UsageError, one_line
from convnext_cli.inputs.expand import InputRef
from convnext_cli.outputs.files import checkpoint_files
from convnext_cli.serve import protocol
from convnext_cli.serve.paths import LOCK_NAME, SOCKET_NAME, private_folder

GRACE_SECONDS = 60.0  # in-flight requests finish within this after SIGTERM / --stop
MAX_CONNECTIONS = 64  # at once; more are refused with an error
SOURCE_FIELDS = ("model", "revision", "cache_dir", "token", "labels")
OPTION_FIELDS = ("device", "dtype", "decode", "compile")
TASK_FIELDS = ("command", "top_k", "scores", "normalize", "batch_size")


class AlreadyRunning(UsageError):
    """Another server holds the socket."""


# --------------------------------------------------------------------------- requests


def _text(value: Any, what: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > protocol.MAX_PATH_CHARS:
        raise protocol.ProtocolError(f"{what}: not a string")
    if "\0" in value:
        raise protocol.ProtocolError(f"{what}: holds a NUL")
    return value


def _fields(message: dict[str, Any], name: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    value = message.get(name)
    if not isinstance(value, dict) or set(value) - set(allowed):
        raise protocol.ProtocolError(f"{name}: an object of {', '.join(allowed)}")
    return value


def parse_load(message: dict[str, Any]) -> tuple[ModelSource, RunOptions]:
    """The model source and run options of a ``load`` request, checked."""
    given = _fields(message, "source", SOURCE_FIELDS)
    model = _text(given.get("model"), "model", optional=False)
    assert model is not None
    cache_dir = _text(given.get("cache_dir"), "cache_dir")
    labels = _text(given.get("labels"), "labels")
    source = ModelSource(
        model,
        _text(given.get("revision"), "revision"),
        None if cache_dir is None else Path(cache_dir),
        _text(given.get("token"), "token"),
        None if labels is None else Path(labels),
    )
    options = _fields(message, "options", OPTION_FIELDS)
    device, dtype, decode = (
        str(_text(options.get(k, "auto"), k, optional=False)) for k in OPTION_FIELDS[:3]
    )
    compile_model = options.get("compile", False)
    if not isinstance(compile_model, bool):
        raise protocol.ProtocolError("compile: not a boolean")
    return source, RunOptions(device, dtype, decode, compile_model)


def parse_task(message: dict[str, Any]) -> tuple[Task, int | None]:
    """The task of a ``run`` request (the engine's own checks) and its decode workers."""
    given = _fields(message, "task", TASK_FIELDS)
    for name in ("top_k", "batch_size"):
        value = given.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise protocol.ProtocolError(f"{name}: not a whole number")
    workers = message.get("workers")
    if workers is not None and (not isinstance(workers, int) or not 0 <= workers <= 256):
        raise protocol.ProtocolError("workers: a whole number from 0 to 256")
    if not isinstance(given.get("normalize", False), bool):
        raise protocol.ProtocolError("normalize: not a boolean")
    scores = given.get("scores", "probs")
    if not isinstance(scores, str):
        raise protocol.ProtocolError("scores: not a string")
    task = Task(
        _text(given.get("command"), "command", optional=False) or "",
        given.get("top_k", 5),
        scores,
        given.get("normalize", False),
        batch_size=given.get("batch_size"),
    )
    if task.command == "classify" and not 0 <= task.top_k <= 100_000:
        raise protocol.ProtocolError("top_k: out of range")
    return task, workers


def files_key(source: ModelSource) -> tuple[Any, ...]:
    """Sizes and modification times of the local files a source names (none for a Hub id),
    so that a checkpoint rewritten on disk is loaded again."""
    found = []
    for given in (source.model, source.labels):
        if given is None:
            continue
        for one in sorted(checkpoint_files(str(given))):  # the job's own walk, capped
            with contextlib.suppress(OSError):
                info = os.stat(one)
                found.append((one, info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(found)


def model_key(source: ModelSource, options: RunOptions) -> tuple[Any, ...]:
    token = hashlib.sha256(source.token.encode()).hexdigest() if source.token else None
    return (
        source.model,
        source.revision,
        str(source.cache_dir),
        token,
        str(source.labels),
        files_key(source),
        options,
    )


# ------------------------------------------------------------------------------ models


@dataclass
class Entry:
    """A loaded model in the cache."""

    key: tuple[Any, ...]
    name: str
    loaded: LoadedRunner
    size: int  # bytes of parameters and buffers
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # a compiled model's runs

    def facts(self) -> dict[str, Any]:
        """What the client's stand-in runner needs to know (see serve/client.py)."""
        runner = self.loaded.runner
        return {
            "config": protocol.pack_value(runner.model.config.to_dict()),
            "spec": protocol.pack_value(runner.spec.to_dict()),
            "labels": list(runner.labels) if runner.labels else None,
            "device": str(runner.device),
            "dtype": str(runner.dtype),
            "jpeg_on_device": bool(runner.jpeg_on_device),
            "notes": list(self.loaded.notes),
            "pid": os.getpid(),
        }


def model_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class SerialCalls:
    """A model call made one at a time per device (a batch of another request waits), so
    that concurrent requests share the cores instead of oversubscribing them."""

    def __init__(self, call: Callable[..., Any], lock: threading.Lock) -> None:
        self.call = call
        self.lock = lock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return self.call(*args, **kwargs)


class ModelCache:
    """Models by key, least recently used first; beyond ``budget`` bytes the least recently
    used model that no request is using is dropped (the newest is always kept)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: OrderedDict[tuple[Any, ...], Entry] = OrderedDict()
        self.lock = threading.Lock()
        self.loading: dict[tuple[Any, ...], threading.Lock] = {}
        self.devices: dict[str, threading.Lock] = {}

    def acquire(self, key: tuple[Any, ...], name: str, load: Callable[[], LoadedRunner]) -> Entry:
        """The entry for ``key`` (loaded by ``load`` if not cached), marked in use."""
        with self.lock:
            entry = self._take(key)
            if entry is not None:
                return entry
            key_lock = self.loading.setdefault(key, threading.Lock())
        with key_lock:
            with self.lock:
                entry = self._take(key)
                if entry is not None:
                    return entry
            loaded = load()
            with self.lock:
                device = self.devices.setdefault(str(loaded.runner.device), threading.Lock())
                runner = loaded.runner
                runner.logits_fn = SerialCalls(runner.logits_fn, device)
                runner.embed_fn = SerialCalls(runner.embed_fn, device)
                runner.decode_pools = PoolKeeper()  # decode guards kept warm between requests
                entry = Entry(key, name, loaded, model_bytes(runner.model), users=1)
                self.entries[key] = entry
                self.loading.pop(key, None)
                self._evict()
                return entry

    def _take(self, key: tuple[Any, ...]) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            entry.users += 1
        return entry

    def release(self, entry: Entry) -> None:
        with self.lock:
            entry.users -= 1
            self._evict()

    def _evict(self) -> None:
        total = sum(e.size for e in self.entries.values())
        for key, entry in list(self.entries.items())[:-1]:
            if total <= self.budget:
                break
            if entry.users == 0:
                del self.entries[key]
                total -= entry.size
                if entry.loaded.runner.decode_pools is not None:
                    entry.loaded.runner.decode_pools.close()

    def names(self) -> list[str]:
        with self.lock:
            return [e.name for e in self.entries.values()]


# ------------------------------------------------------------------------------ server


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end (``SO_PEERCRED``, at its connect)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class Server:
    """``convnext serve``: bind (refusing a second server), then accept until stopped or
    idle for ``idle_timeout`` seconds (0: never)."""

    def __init__(self, idle_timeout: float, budget: int, log: Callable[[str], None]) -> None:
        self.idle_timeout = idle_timeout
        self.cache = ModelCache(budget)
        self.log = log
        self.stopping = threading.Event()
        self.active = 0
        self.active_lock = threading.Lock()
        self.last_activity = time.monotonic()
        self.started = time.time()
        self.requests = 0
        self.listener: socket.socket | None = None
        self.lock_file: Any = None
        self.folder = private_folder()
        self.path = self.folder / SOCKET_NAME

    def bind(self) -> None:
        """Hold the folder's lock (another server holds it: AlreadyRunning), replace a stale
        socket, listen on a fresh one of mode 0600."""
        lock_path = self.folder / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"a convnext server is already running (pid {holder}) on {self.path}; "
                "`convnext serve --stop` stops it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.lock_file = fd
        if os.path.lexists(self.path):  # left by a server that was killed: nobody listens
            self.log(f"replacing the stale socket {self.path}")
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        listener.listen(MAX_CONNECTIONS)
        listener.settimeout(0.5)
        self.listener = listener

    def stop(self, *_args: Any) -> None:
        self.stopping.set()

    def serve(self) -> int:
        """Accept connections until stopped or idle; returns the exit code (0)."""
        assert self.listener is not None
        previous = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}
        os.chdir("/")
        try:
            while not self.stopping.is_set():
                if self._idle():
                    self.log(f"idle for {self.idle_timeout:g} s: exiting")
                    break
                try:
                    conn, _ = self.listener.accept()
                except (TimeoutError, InterruptedError):
                    continue
                self._start(conn)
        finally:
            self._close(previous)
        return 0

    def _idle(self) -> bool:
        with self.active_lock:
            quiet = time.monotonic() - self.last_activity
            return self.active == 0 and self.idle_timeout > 0 and quiet > self.idle_timeout

    def _close(self, previous: dict[Any, Any]) -> None:
        """No new connection; the requests in flight finish (within the grace time)."""
        assert self.listener is not None
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        deadline = time.monotonic() + GRACE_SECONDS
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.lock_file is not None:
            os.close(self.lock_file)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        self.log("stopped")

    def _start(self, conn: socket.socket) -> None:
        try:
            uid = peer_uid(conn)
        except OSError:
            conn.close()
            return
        if uid != os.getuid():
            self.log(f"refused a connection from uid {uid} (only uid {os.getuid()} is served)")
            with contextlib.suppress(OSError):
                protocol.send(conn, {"error": "refused: this server serves only its own user"})
            conn.close()
            return
        with self.active_lock:
            if self.active >= MAX_CONNECTIONS:
                with contextlib.suppress(OSError):
                    protocol.send(conn, {"error": "busy: too many connections"})
                conn.close()
                return
            self.active += 1
            self.last_activity = time.monotonic()
        threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        session = Session(self, conn)
        try:
            session.run()
        finally:
            session.close()
            with self.active_lock:
                self.active -= 1
                self.last_activity = time.monotonic()

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "socket": str(self.path),
            "uptime": round(time.time() - self.started, 1),
            "idle_timeout": self.idle_timeout,
            "models": self.cache.names(),
            "requests": self.requests,
            "connections": self.active,
        }


class Session:
    """One client connection: its requests, one after the other."""

    def __init__(self, server: Server, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.entry: Entry | None = None

    def close(self) -> None:
        if self.entry is not None:
            self.server.cache.release(self.entry)
            self.entry = None
        with contextlib.suppress(OSError):
            self.conn.close()

    def send(self, message: dict[str, Any], blob: bytes = b"") -> None:
        protocol.send(self.conn, message, blob)

    def receive(self, wait: float | None = protocol.IDLE_SECONDS) -> dict[str, Any]:
        message, _ = protocol.receive(
            self.conn, protocol.MAX_REQUEST_JSON, protocol.MAX_REQUEST_BLOB, wait
        )
        return message

    def run(self) -> None:
        """Requests until the client closes, breaks the protocol or goes quiet."""
        while True:
            try:
                message = self.receive()
            except (EOFError, OSError):
                return  # the client went away (or stayed quiet too long)
            except protocol.ProtocolError as exc:
                self._refuse(f"bad request: {exc}")
                return
            try:
                if not self._handle(message):
                    return
            except (EOFError, OSError) as exc:  # the client went away mid-request (Ctrl-C)
                self.server.log(f"request ended: {one_line(exc)}")
                return
            except protocol.ProtocolError as exc:
                self._refuse(f"bad request: {exc}")
                return
            except Exception as exc:  # a failed load, a bad task: said, the server goes on
                self._refuse(one_line(exc))
                return

    def _refuse(self, reason: str) -> None:
        self.server.log(f"error: {reason}")
        with contextlib.suppress(OSError):
            self.send({"error": reason})

    def _handle(self, message: dict[str, Any]) -> bool:
        op = message.get("op")
        if self.server.stopping.is_set() and op in ("load", "run"):
            self._refuse("the server is stopping")
            return False
        if op == "status":
            self.send({"status": self.server.status()})
        elif op == "stop":
            self.server.log("stop requested")
            self.send({"stopping": True})
            self.server.stop()
        elif op == "load":
            self._load(message)
        elif op == "run":
            self._run(message)
        else:
            self._refuse(f"unknown request {str(op)[:40]!r}")
            return False
        return True

    def _load(self, message: dict[str, Any]) -> None:
        if message.get("env") != protocol.environment_key():
            self.send({"error": "mismatch: the server runs with another environment or version"})
            return
        source, options = parse_load(message)
        if self.entry is not None:
            self.server.cache.release(self.entry)
            self.entry = None
        name = source.model + (f"@{source.revision}" if source.revision else "")
        started = time.monotonic()

        def load() -> LoadedRunner:
            return load_runner(source, options)

        entry = self.server.cache.acquire(model_key(source, options), name, load)
        self.entry = entry
        runner = entry.loaded.runner
        seconds = time.monotonic() - started
        self.server.log(f"load {name} on {runner.device} {runner.dtype}: {seconds:.2f} s")
        self.send({"facts": entry.facts()})

    def _run(self, message: dict[str, Any]) -> None:
        if self.entry is None:
            raise protocol.ProtocolError("run before load")
        task, workers = parse_task(message)
        items = ClientItems(self, protocol.unpack_items(message.get("items")), message.get("end"))
        entry, started, count, failed = self.entry, time.monotonic(), 0, 0
        runner = entry.loaded.runner
        self.server.requests += 1
        with entry.lock if runner.compiled else contextlib.nullcontext():
            batches = task.run(runner, items, workers=workers)
            try:
                for results in batches:
                    records, blob = encode_results(results)
                    self.send({"results": records}, blob)
                    count += len(results)
                    failed += sum(r.error is not None for r in results)
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
        self.send({"done": count})
        seconds = time.monotonic() - started
        self.server.log(
            f"{task.command} {count} inputs ({failed} failed) with {entry.name}: {seconds:.2f} s"
        )


class ClientItems(Iterator[InputRef]):
    """The inputs of a ``run`` request: those sent with it, then more asked for as the
    runner takes them."""

    def __init__(self, session: Session, first: list[InputRef], end: Any) -> None:
        self.session = session
        self.buffer = list(reversed(first))
        self.ended = end is True

    def __next__(self) -> InputRef:
        while not self.buffer:
            if self.ended:
                raise StopIteration
            self.session.send({"more": True})
            message = self.session.receive(wait=protocol.IDLE_SECONDS)
            if "items" not in message:
                raise protocol.ProtocolError("expected the next inputs")
            self.buffer = list(reversed(protocol.unpack_items(message["items"])))
            self.ended = message.get("end") is True
        return self.buffer.pop()


def encode_results(results: list[Any]) -> tuple[list[Any], bytes]:
    """A batch of results for the wire: errors, predictions as (index, score) pairs, and
    embeddings as float32 rows of the blob."""
    records: list[Any] = []
    rows = []
    offset = 0
    for result in results:
        if result.error is not None:
            records.append({"e": result.error})
        elif result.embedding is not None:
            row = result.embedding.detach().to("cpu", torch.float32).contiguous().reshape(-1)
            rows.append(row)
            records.append({"v": [offset, row.numel()]})
            offset += row.numel()
        else:
            records.append({"p": [[p.index, p.score] for p in result.predictions]})
    blob = torch.cat(rows).numpy().astype("<f4").tobytes() if rows else b""
    return records, blob


# ---------------------------------------------------------------------------- running it


def make_log(stream: Any = None) -> Callable[[str], None]:
    """One line per event on stderr (or ``stream``), with the time."""
    lock = threading.Lock()

    def log(line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with lock:
            print(f"{stamp} convnext serve: {line}", file=stream or sys.stderr, flush=True)

    return log


def preloader(source: ModelSource) -> Callable[[], LoadedRunner]:
    """Loads ``source`` with the default run options."""
    return lambda: load_runner(source, RunOptions())


def http_runner(server: Server, models: list[str]) -> Callable[[str, str, Any], str]:
    """What ``--http`` runs for a request: the engine's Task on the uploaded file, with one
    of ``models`` (those the server was started with; default the first), the default run
    options, and the record a run writes for it."""
    from convnext_cli.limits import MAX_TOP_K, parse_int
    from convnext_cli.outputs.writers import classify_record_json, embed_record_json

    def run(command: str, path: str, query: dict[str, list[str]]) -> str:
        model = query.get("model", models[:1] or [""])[-1]
        if model not in models:
            raise UsageError(f"model {model[:200]!r}: not one this server was started with (-m)")
        top_k = parse_int(query.get("top_k", ["5"])[-1], "top_k", 0, MAX_TOP_K)
        scores = query.get("scores", ["probs"])[-1]
        normalize = query.get("normalize", ["0"])[-1].lower() in ("1", "true", "yes")
        task = Task(command, top_k, scores, normalize)
        source, options = ModelSource(model), RunOptions()
        entry = server.cache.acquire(model_key(source, options), model, preloader(source))
        try:
            with entry.lock if entry.loaded.runner.compiled else contextlib.nullcontext():
                batches = list(task.run(entry.loaded.runner, [path], workers=None))
        finally:
            server.cache.release(entry)
            with server.active_lock:
                server.last_activity = time.monotonic()
        result = batches[0][0]
        result.path = "upload"
        if command == "classify":
            return classify_record_json(result, scores)
        return embed_record_json(result)

    return run


def run_server(
    idle_timeout: float,
    budget: int,
    preload: list[str],
    log: Callable[[str], None] | None = None,
    http: str | None = None,
) -> int:
    """Bind, preload ``preload`` (default device, dtype, decoder), serve (on ``http`` too,
    HOST:PORT, when given); the exit code."""
    log = log or make_log()
    server = Server(idle_timeout, budget, log)
    server.bind()
    log(f"listening on {server.path} (pid {os.getpid()}, idle timeout {idle_timeout:g} s)")
    for model in preload:
        source, options = ModelSource(model), RunOptions()
        started = time.monotonic()
        entry = server.cache.acquire(model_key(source, options), model, preloader(source))
        server.cache.release(entry)
        log(f"loaded {model}: {time.monotonic() - started:.2f} s")
    web_server = None
    if http is not None:
        from convnext_cli.serve import web

        web_server = web.start(http, server.folder, http_runner(server, preload), log)
    try:
        return server.serve()
    finally:
        if web_server is not None:
            web_server.shutdown()
            web_server.server_close()
