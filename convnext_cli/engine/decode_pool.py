"""Decode worker processes that cannot take a run down.

torch's DataLoader raises for the whole loader when one worker dies; this small pool
instead keeps every input's outcome:

- Each worker has its own task pipe and result pipe (no lock shared between workers, so a
  worker killed mid-write corrupts nothing but its own message), and a small shared array
  saying which input it is decoding and since when.
- A worker that dies (OOM-killed, segfault, ``kill -9``) costs nothing but time: the input
  it was decoding is retried alone, the rest of its tasks go to a fresh worker.  An input
  that kills its decoding process twice gets the error ``the decoding process died ...``.
- An input whose decoding (reading, decoding, resizing) runs past the per-image deadline
  (:func:`decode_timeout`, 30 s unless ``CONVNEXT_DECODE_TIMEOUT`` says otherwise) has its
  worker killed and gets ``decoding took longer than N s``; the rest of its batch is
  redone in a fresh worker.
- Workers ignore SIGINT (Ctrl-C is the main process's to handle) and die with the main
  process (``PR_SET_PDEATHSIG`` on Linux, and a parent check every second elsewhere).

Decoded pixels of the run's fixed crop shape are written straight into the task's slot of
the :class:`~convnext_cli.engine.staging.StagingRing` (an anonymous shared mapping inherited
through fork: no file to clean up after a killed worker); only their positions travel
through the pipe.  A worker killed mid-write leaves half-written rows nobody reads: the main
process trusts the positions of finished tasks only, and the retry rewrites them.  Other
pixels (resizing off, no ring) travel back as NumPy arrays through the result pipe.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

import numpy as np
import torch

from convnext_cli.engine.staging import StagingRing
from convnext_cli.errors import ImageError, one_line
from convnext_cli.imaging import decoding as images
from convnext_cli.imaging.gpu_jpeg import EncodedJpeg, device_decodable
from convnext_cli.imaging.preprocess import PreprocessSpec
from convnext_cli.inputs.expand import InputRef, read_input
from convnext_cli.limits import MAX_DECODE_TIMEOUT, env_seconds

DEFAULT_DECODE_TIMEOUT = 30.0  # seconds per image: read, decode, resize
TIMEOUT_ENV = "CONVNEXT_DECODE_TIMEOUT"
TASKS_PER_WORKER = 2  # one being decoded, one waiting: the prefetch bound per worker
MAX_DEATHS = 2  # an input whose decoding process dies this often gets an error record

# What decoding one input gives: pixels (uint8 (3, h, w), resized), a JPEG for the device,
# or the one-line reason it failed.
Outcome = Any  # torch.Tensor | EncodedJpeg | str


def decode_timeout() -> float:
    """The per-image decoding deadline in seconds: ``CONVNEXT_DECODE_TIMEOUT`` or 30."""
    return env_seconds(TIMEOUT_ENV, DEFAULT_DECODE_TIMEOUT, MAX_DECODE_TIMEOUT)


def failure(exc: BaseException) -> str:
    """The one-line reason an input could not be decoded."""
    if isinstance(exc, ImageError):
        return one_line(exc)
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    return f"cannot decode image: {one_line(exc)}"  # a decoder bug must not end the run


def decode_one(ref: InputRef, spec: PreprocessSpec, jpeg_on_device: bool) -> Outcome:
    """Read, decode and resize one input (a file, or a dataset member or row); never raises
    (the error is the outcome)."""
    try:
        data = read_input(ref)
        if jpeg_on_device:
            encoded = device_decodable(data)
            if encoded is not None:
                return encoded
        return spec.resize_and_crop(images.decode_bytes(data))
    except Exception as exc:
        return failure(exc)


def describe_death(exitcode: int | None) -> str:
    if exitcode is None:
        return "it stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = ", out of memory?" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {exitcode}"


# --- the worker process -------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when its parent dies."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


T = TypeVar("T")


def group_by_shape(items: Iterable[T], shape_of: Callable[[T], tuple[int, ...]]) -> list[list[T]]:
    """``items`` grouped by ``shape_of``: groups in the order their first member came, members
    in their order (the one grouping of decoded pixels: workers, batches, the device)."""
    groups: dict[tuple[int, ...], list[T]] = {}
    for item in items:
        groups.setdefault(shape_of(item), []).append(item)
    return list(groups.values())


def fits(stage: torch.Tensor | None, pixels: torch.Tensor) -> bool:
    """Whether `pixels` (one crop) can be written into the slot `stage`."""
    return (
        stage is not None
        and pixels.dtype == stage.dtype
        and tuple(pixels.shape) == tuple(stage.shape[1:])
    )


def _pack(outcomes: list[tuple[int, Outcome]], stage: torch.Tensor | None = None) -> dict[str, Any]:
    """A task's outcomes as picklable parts: crops that fit the batch's slot `stage` written
    into it at their positions (``staged`` lists them), other pixels stacked by shape into
    NumPy arrays."""
    errors: list[tuple[int, str]] = []
    encoded: list[tuple[int, EncodedJpeg]] = []
    pixels: list[tuple[int, torch.Tensor]] = []
    staged: list[int] = []
    for position, outcome in outcomes:
        if isinstance(outcome, str):
            errors.append((position, outcome))
        elif isinstance(outcome, EncodedJpeg):
            encoded.append((position, outcome))
        elif stage is not None and fits(stage, outcome):
            stage[position].copy_(outcome)
            staged.append(position)
        else:
            pixels.append((position, outcome))
    groups = [
        ([p for p, _ in members], torch.stack([t for _, t in members]).numpy())
        for members in group_by_shape(pixels, lambda item: tuple(item[1].shape))
    ]
    return {"errors": errors, "encoded": encoded, "groups": groups, "staged": staged}


def _worker_main(
    tasks: Connection,
    results: Connection,
    progress: Any,
    spec: PreprocessSpec,
    jpeg_on_device: bool,
    parent: int,
    close_fds: list[int],
    ring: StagingRing | None = None,
) -> None:
    """Decode tasks until told to stop; report each finished task through `results`."""
    _become_worker(close_fds)
    try:
        # one thread: the OpenMP pool inherited through fork would deadlock with more
        torch.set_num_threads(1)
        outbox, sender = _sender(results)
        if ring is not None and not ring.mapped_here():
            ring = None  # not inherited: the pickle path
        while True:
            while not tasks.poll(1.0):
                if os.getppid() != parent:
                    os._exit(0)
            task = tasks.recv()
            if task is None:
                break
            task_id, items, slot = task
            stage = ring.slot(slot) if ring is not None and slot >= 0 else None
            outcomes = []
            started = time.perf_counter()
            for n, (position, path) in enumerate(items):
                progress[2] = time.monotonic()
                progress[1] = n
                progress[0] = task_id
                outcomes.append((position, decode_one(path, spec, jpeg_on_device)))
                progress[0] = -1
            packed = _pack(outcomes, stage)
            packed["seconds"] = time.perf_counter() - started  # how busy decoding keeps us
            outbox.put((task_id, packed))
        outbox.put(None)
        sender.join()
    except BaseException:
        os._exit(70)  # the main process sees the death and retries; no traceback on stderr


def _become_worker(close_fds: list[int]) -> None:
    """A forked decode worker's signals and descriptors: Ctrl-C is the main process's, a
    SIGTERM kills, the worker dies with its parent, other workers' pipe ends are closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _die_with_parent()
    for fd in close_fds:  # other workers' pipe ends, inherited through fork
        with contextlib.suppress(OSError):
            os.close(fd)


def _sender(results: Connection) -> tuple[queue.Queue[Any], threading.Thread]:
    """A thread sending what is put in the queue (None ends it), so that decoding goes on
    while the main process is busy; the worker exits when the main process went away."""
    outbox: queue.Queue[Any] = queue.Queue()

    def send() -> None:
        while (message := outbox.get()) is not None:
            try:
                results.send(message)
            except OSError:  # the main process went away
                os._exit(0)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return outbox, sender


# --- the main process's side --------------------------------------------------------------


@dataclass
class Task:
    """Some inputs of one batch, decoded by one worker: (position in batch, path) pairs."""

    id: int
    batch: int
    items: list[tuple[int, InputRef]]
    deaths: int = 0  # how many decoding processes died while holding it
    slot: int = -1  # the batch's slot in the staging ring (-1: none, the pickle path)


@dataclass
class _Worker:
    process: Any
    tasks: Connection
    task_reader: Connection  # kept open here: writing to a dead worker never raises EPIPE
    results: Connection
    progress: Any
    assigned: deque[Task] = field(default_factory=deque)
    since: float = 0.0  # when it last got work while idle, or last reported a finished task


class DecodePool:
    """Worker processes decoding tasks; finished parts come back through `on_done`.

    ``on_done(task, packed)`` receives a task's packed outcomes (see :func:`_pack`);
    ``on_error(task, position, message)`` an input's error decided here (deadline, deaths).
    With a `ring` (mapped before any worker starts), tasks with a slot have their crops
    written into it.
    """

    def __init__(
        self,
        workers: int,
        spec: PreprocessSpec,
        jpeg_on_device: bool,
        timeout: float,
        on_done: Callable[[Task, dict[str, Any]], None],
        on_error: Callable[[Task, int, str], None],
        ring: StagingRing | None = None,
    ) -> None:
        self.size = max(1, workers)
        self.ring = ring
        self.spec = spec
        self.jpeg_on_device = jpeg_on_device
        self.timeout = timeout
        self.on_done = on_done
        self.on_error = on_error
        # fork on Linux: workers start at once, without re-importing torch (elsewhere the
        # platform's default: fork is unsafe on macOS, absent on Windows)
        self.context = multiprocessing.get_context(
            "fork" if sys.platform.startswith("linux") else None
        )
        self.workers: list[_Worker] = []
        self.pending: list[Task] = []  # taken earliest batch first: the one awaited
        self._ids = 0

    @staticmethod
    def shares_memory() -> bool:
        """Whether workers are forked (and so inherit a staging ring mapped before them)."""
        return sys.platform.startswith("linux")

    # tasks

    def submit(
        self, batch: int, items: list[tuple[int, InputRef]], deaths: int = 0, slot: int = -1
    ) -> None:
        self._ids += 1
        self.pending.append(Task(self._ids, batch, items, deaths, slot))

    def _next_task(self) -> Task:
        first = min(range(len(self.pending)), key=lambda n: self.pending[n].batch)
        return self.pending.pop(first)

    def _dispatch(self) -> None:
        while self.pending:
            idle = [w for w in self.workers if len(w.assigned) < TASKS_PER_WORKER]
            if not idle and len(self.workers) < self.size:
                try:
                    idle = [self._start_worker()]
                except OSError:  # no process to be had (EAGAIN, ENOMEM)
                    if self.workers:
                        return  # the running workers take it when they can
                    self._decode_here(self._next_task())
                    continue
            if not idle:
                return
            worker = min(idle, key=lambda w: len(w.assigned))
            task = self._next_task()
            if not worker.assigned:
                worker.since = time.monotonic()
            worker.assigned.append(task)
            try:
                worker.tasks.send((task.id, task.items, task.slot))
            except OSError:
                pass  # it died: found by the next poll, and the task is redone

    def start(self) -> None:
        """Start every worker now, from the calling thread (the main thread, for a pool
        that another thread uses later: no process is then forked from that thread)."""
        while len(self.workers) < self.size:
            self._start_worker()

    def _decode_here(self, task: Task) -> None:
        """The fallback when no worker process can be started: decode in this process."""
        outcomes = [(p, decode_one(path, self.spec, self.jpeg_on_device)) for p, path in task.items]
        stage = self.ring.slot(task.slot) if self.ring is not None and task.slot >= 0 else None
        self.on_done(task, _pack(outcomes, stage))

    def _start_worker(self) -> _Worker:
        tasks_reader, tasks_writer = self.context.Pipe(duplex=False)
        results_reader, results_writer = self.context.Pipe(duplex=False)
        progress = self.context.RawArray("d", [-1.0, 0.0, 0.0])  # task id, item, start time
        close_fds = []
        if self.context.get_start_method() == "fork":
            for other in self.workers:
                close_fds += [c.fileno() for c in (other.tasks, other.task_reader, other.results)]
        process = self.context.Process(
            target=_worker_main,
            args=(
                tasks_reader,
                results_writer,
                progress,
                self.spec,
                self.jpeg_on_device,
                os.getpid(),
                close_fds,
                self.ring,
            ),
            daemon=True,
            name="convnext-decode",
        )
        # the child must not see a Ctrl-C before it has set SIGINT aside
        masking = hasattr(signal, "pthread_sigmask")
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if masking else None
        try:
            process.start()
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        results_writer.close()  # so the worker's death reads as end-of-file here
        worker = _Worker(process, tasks_writer, tasks_reader, results_reader, progress)
        self.workers.append(worker)
        return worker

    # waiting

    def poll(self) -> None:
        """Start what can start, wait for something to happen (a second at most), handle it."""
        self._dispatch()
        if not self.workers:
            return
        now = time.monotonic()
        wake = 1.0
        for worker in self.workers:
            started = self._current(worker)
            if started is not None:
                wake = min(wake, max(0.0, started[2] + self.timeout - now))
            elif worker.assigned:
                last = max(worker.since, worker.progress[2])
                wake = min(wake, max(0.0, last + self.timeout - now))
        handles: list[Any] = [w.results for w in self.workers]
        handles += [w.process.sentinel for w in self.workers]
        wait(handles, timeout=wake + 0.01)
        for worker in list(self.workers):
            dead = worker.process.exitcode is not None
            open_pipe = self._drain(worker)
            if dead or not open_pipe:
                self._lost(worker, dead_reason=None)
                continue
            started = self._current(worker)
            if started is None and worker.assigned and self._stalled(worker):
                # holding work, decoding nothing: stuck outside a decoder
                self._lost(worker, dead_reason="it stopped responding")
                continue
            if started is not None and time.monotonic() - started[2] > self.timeout:
                task, item, _ = started
                # it may have finished meanwhile: read what it sent before killing it
                worker.process.kill()
                worker.process.join()
                self._drain(worker)
                if any(t is task for t in worker.assigned):
                    self._lost(worker, timed_out=(task, item))
                else:  # it finished that input just in time
                    self._lost(worker, dead_reason="stopped at a deadline")
        self._dispatch()

    def _stalled(self, worker: _Worker) -> bool:
        last = max(worker.since, worker.progress[2])
        return time.monotonic() - last > self.timeout

    def _current(self, worker: _Worker) -> tuple[Task, int, float] | None:
        """The task and item a worker is decoding, and since when (None when idle)."""
        task_id, item, started = worker.progress[0], worker.progress[1], worker.progress[2]
        if task_id < 0:
            return None
        for task in worker.assigned:
            if task.id == int(task_id):
                return task, int(item), started
        return None

    def _drain(self, worker: _Worker) -> bool:
        """Take every finished task a worker has sent; False at end-of-file."""
        try:
            while worker.results.poll(0):
                task_id, packed = worker.results.recv()
                worker.since = time.monotonic()
                for task in list(worker.assigned):
                    if task.id == task_id:
                        worker.assigned = deque(t for t in worker.assigned if t is not task)
                        self.on_done(task, packed)
        except (EOFError, OSError):
            return False
        except Exception:  # a message cut short by a death: the task is redone
            return False
        return True

    def _lost(
        self,
        worker: _Worker,
        dead_reason: str | None = None,
        timed_out: tuple[Task, int] | None = None,
    ) -> None:
        """A worker died or was killed: blame the input it was decoding, redo the rest."""
        current = None if timed_out else self._current(worker)
        if worker.process.exitcode is None:
            worker.process.kill()
        worker.process.join()
        reason = dead_reason or describe_death(worker.process.exitcode)
        self.workers.remove(worker)
        for conn in (worker.tasks, worker.task_reader, worker.results):
            conn.close()
        for task in worker.assigned:
            if timed_out is not None and task is timed_out[0]:
                position = task.items[timed_out[1]][0]
                self.on_error(task, position, f"decoding took longer than {self.timeout:g} s")
                rest = [it for n, it in enumerate(task.items) if n != timed_out[1]]
                if rest:
                    self.submit(task.batch, rest, slot=task.slot)
            elif current is not None and task is current[0]:
                culprit = task.items[current[1]]
                deaths = task.deaths + 1 if len(task.items) == 1 else 1
                if deaths >= MAX_DEATHS:
                    self.on_error(
                        task, culprit[0], f"the decoding process died on this image ({reason})"
                    )
                else:
                    self.submit(task.batch, [culprit], deaths, task.slot)  # alone this time
                rest = [it for n, it in enumerate(task.items) if n != current[1]]
                if rest:
                    self.submit(task.batch, rest, slot=task.slot)
            elif current is None and timed_out is None:
                # died between inputs (or while sending): no culprit known, so each input
                # of its unfinished tasks is tried alone
                for item in task.items:
                    deaths = task.deaths + 1
                    if len(task.items) == 1 and deaths >= MAX_DEATHS:
                        self.on_error(
                            task, item[0], f"the decoding process died on this image ({reason})"
                        )
                    else:
                        self.submit(task.batch, [item], deaths, task.slot)
            else:  # waiting behind the culprit: redone as it was
                self.pending.append(task)
        worker.assigned.clear()

    def close(self) -> None:
        """Stop every worker now (they hold nothing that needs a clean shutdown)."""
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.process.kill()
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.process.join()
            for conn in (worker.tasks, worker.task_reader, worker.results):
                with contextlib.suppress(Exception):
                    conn.close()
        self.workers.clear()


def unpack_groups(packed: dict[str, Any]) -> list[tuple[list[int], torch.Tensor]]:
    groups: list[tuple[list[int], np.ndarray]] = packed["groups"]
    return [(positions, torch.from_numpy(array)) for positions, array in groups]


class PoolKeeper:
    """Decode pools kept between runs (``convnext serve``: a warm call pays no fork).

    A run takes an idle pool of its size and deadline (or makes one) and gives it back when
    done; one given back with work still assigned or pending (a run stopped early) is
    closed instead, so that no stale result reaches the next run.  Crash isolation is the
    pool's own: a worker that dies or overruns its deadline is replaced within the run, and
    a pool with a worker found dead between runs is closed (the next run forks afresh).
    At most :attr:`keep` idle pools per size are kept (more are closed).  Pools kept here
    decode without a staging ring (their workers were forked before any run's ring was
    mapped): pixels come back through the pipe, the same values."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.idle: dict[tuple[int, float], list[DecodePool]] = {}
        self.lock = threading.Lock()
        self.forker: ThreadPoolExecutor | None = None

    def started(self, make: Callable[[], DecodePool]) -> DecodePool:
        """A new pool with its workers forked by this keeper's own thread, which lives as
        long as the process: a worker dies with the thread that forked it
        (``PR_SET_PDEATHSIG``), so one forked by a request's thread would not outlive it."""
        with self.lock:
            if self.forker is None:
                self.forker = ThreadPoolExecutor(1, thread_name_prefix="convnext-decode-fork")
            forker = self.forker

        def start() -> DecodePool:
            pool = make()
            pool.start()
            return pool

        return forker.submit(start).result()

    def take(self, key: tuple[int, float]) -> DecodePool | None:
        """An idle pool whose workers are all alive (one with a dead worker is closed: its
        death is no input's doing), or None."""
        while True:
            with self.lock:
                pools = self.idle.get(key)
                pool = pools.pop() if pools else None
            if pool is None or all(w.process.exitcode is None for w in pool.workers):
                return pool
            pool.close()

    def give_back(self, pool: DecodePool) -> None:
        busy = pool.pending or any(w.assigned for w in pool.workers)
        with self.lock:
            pools = self.idle.setdefault((pool.size, pool.timeout), [])
            if not busy and len(pools) < self.keep:
                pools.append(pool)
                return
        pool.close()

    def close(self) -> None:
        with self.lock:
            pools = [p for kept in self.idle.values() for p in kept]
            self.idle.clear()
        for pool in pools:
            pool.close()


def open_pool(
    keeper: PoolKeeper | None,
    workers: int,
    spec: PreprocessSpec,
    jpeg_on_device: bool,
    timeout: float | None,
    on_done: Callable[[Task, dict[str, Any]], None],
    on_error: Callable[[Task, int, str], None],
    ring: StagingRing | None = None,
) -> DecodePool:
    """A pool for one call: an idle one of `keeper`'s (``convnext serve``: no fork for a
    warm call; its runs pass no `ring`, see :class:`PoolKeeper`), else a new one; the call
    hands it to :func:`close_pool` when done.  `timeout` None: :func:`decode_timeout`."""
    timeout = decode_timeout() if timeout is None else timeout
    pool = keeper.take((max(1, workers), timeout)) if keeper is not None else None
    if pool is None:

        def make() -> DecodePool:
            return DecodePool(workers, spec, jpeg_on_device, timeout, on_done, on_error, ring)

        pool = keeper.started(make) if keeper is not None else make()
    pool.on_done, pool.on_error = on_done, on_error
    return pool


def close_pool(keeper: PoolKeeper | None, pool: DecodePool) -> None:
    """The end of a call's pool: back to `keeper` (closed if a task is still out), else
    closed."""
    if keeper is not None:
        keeper.give_back(pool)
    else:
        pool.close()
