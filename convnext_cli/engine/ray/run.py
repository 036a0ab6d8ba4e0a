"""The driver of a distributed run: units in, records or parts out.

::

    units (units.py: listed lazily, in windows)         -- the driver: O(units), not O(inputs)
      -> read tasks (datasource.py): a unit -> rows of    -- CPU tasks, in the cluster
         references (ids within the unit, never bytes)
      -> decode (stages.decode_rows): safe readers,       -- CPU tasks (retried)
         decoding policy, resize -> uint8 pixels
      -> model (stages.ModelActor): one actor per GPU     -- actor pool (restarted, retried)
         (CPU actors otherwise), the model loaded once
      -> streams: records back to the driver, in input order (Ray Data's preserve_order),
         into the usual writers;
         -o DIR: pieces written by the actors, joined into one part per unit and its status
         by a task in the cluster (parts.py); the driver counts rows per unit only.

Every input yields exactly one record: an image that cannot be decoded, or that the model
cannot run on, is an error row, never an exception in a task or an actor.  A worker process,
an actor or a whole node killed mid-run is Ray's to retry (tasks: 3 times; actors:
restarted, their unfinished batches retried); a retried batch rewrites the same piece names,
and a unit's part is made only from the pieces of the batches that reached the driver, so
nothing is duplicated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cli.engine.ray import parts as unit_parts
from convnext_cli.engine.ray.datasource import unit_source
from convnext_cli.engine.ray.session import RayFailed, ray_session
from convnext_cli.engine.ray.settings import (
    DECODE_ROWS,
    PART_ROWS,
    ActorPlan,
    PartFiles,
    RayRun,
    plan_actors,
    read_preprocessing,
    require_ray,
)
from convnext_cli.engine.ray.stages import ModelActor, decode_rows, ids_of, results_from_table
from convnext_cli.engine.ray.units import STREAM_UNIT_ROWS, Unit, refs_units, unit_rows, windows
from convnext_cli.errors import OutputError, one_line
from convnext_cli.imaging.preprocess import PreprocessSpec
from convnext_cli.inputs.expand import InputRef
from convnext_cli.results import Result

if TYPE_CHECKING:
    import pyarrow as pa

FINISH_WAIT = 5.0  # seconds, on Ctrl-C / SIGTERM, for the units being finished


def build_dataset(
    ray: Any,
    units: list[Unit],
    run: RayRun,
    spec: PreprocessSpec,
    plan: ActorPlan,
    parts: PartFiles | None = None,
) -> Any:
    """The lazy Ray Dataset of one window: read tasks -> decode tasks -> model actors."""
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    # streams keep input order; parts are per unit, in any order (no waiting on the slowest)
    DataContext.get_current().execution_options.preserve_order = parts is None
    # read tasks ask what a decode task asks (Ray Data then fuses them: a unit is read and
    # decoded in one task); a smaller ask would start a worker process per read at once
    ds = ray.data.read_datasource(
        unit_source(units),
        override_num_blocks=max(1, len(units)),
        num_cpus=plan.decode_cpus,
        concurrency=plan.decode_tasks,
    )
    decoded = ds.map_batches(
        decode_rows,
        fn_kwargs={"spec": spec},
        batch_size=DECODE_ROWS,
        batch_format="pyarrow",
        num_cpus=plan.decode_cpus,
        compute=TaskPoolStrategy(size=plan.decode_tasks),
    )
    return decoded.map_batches(
        ModelActor,
        fn_constructor_kwargs={"run": run, "plan": plan, "parts": parts},
        compute=ActorPoolStrategy(min_size=plan.replicas, max_size=plan.replicas),
        # the runner splits a call into model batches itself
        batch_size=plan.batch_size if parts is None else _part_batch(plan),
        batch_format="pyarrow",
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus or None,
    )


def _part_batch(plan: ActorPlan) -> int:
    """Rows per model call when writing parts: PART_ROWS (fewer pieces per unit), or a
    unit's rows when units are smaller, and never fewer than the model batch."""
    return max(plan.batch_size, min(PART_ROWS, unit_rows()))


def _start(stack: contextlib.ExitStack, run: RayRun) -> tuple[Any, tuple[PreprocessSpec, int]]:
    """Ray for the run (closed with ``stack``), and the checkpoint's facts: the caller's,
    or read (torch imported, weights checked) while Ray starts."""
    from concurrent.futures import ThreadPoolExecutor

    if run.facts is not None:
        return stack.enter_context(ray_session(run.cluster)), run.facts
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_preprocessing, run.source, run.task.command)
        try:
            ray = stack.enter_context(ray_session(run.cluster))
        except BaseException:
            reading.result()  # a bad model is the error to report, not Ray's
            raise
        return ray, reading.result()


def _batches(ds: Any) -> Iterator[pa.Table]:
    """The model stage's tables; Ray's failures (a node lost for good, the raylet dead)
    as one line."""
    from ray.exceptions import RayError

    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            if table.num_rows:
                yield table
    except RayError as exc:
        raise RayFailed(f"--engine ray: the run failed in Ray ({one_line(exc)[:300]})") from exc


# --- streams: records through the driver, in order -------------------------------------------


def run_on_ray(inputs: Iterable[InputRef], run: RayRun) -> Iterator[list[Result]]:
    """Every input's Result, in input order, batch by batch (what Runner.classify/embed
    yield), computed on Ray: the driver receives plain columns and builds the Results.

    ``inputs`` are taken as they come (a list, or a stream as the local engine lists it),
    a window of units at a time (at most units.WINDOW_REFS inputs held).  Raises
    UsageError without Ray, for a bad model (before Ray starts), or a classify on a feature
    model.  Progress is the caller's, from the batches.
    """
    require_ray()
    return _stream(inputs, run)


def _stream(inputs: Iterable[InputRef], run: RayRun) -> Iterator[list[Result]]:
    units = windows(refs_units(inputs, unit_rows(STREAM_UNIT_ROWS)))
    first = next(units, None)
    if first is None:
        return
    with contextlib.ExitStack() as stack:
        ray, (spec, _width) = _start(stack, run)
        plan = plan_actors(ray.cluster_resources(), run)
        for window in itertools.chain([first], units):
            yield from _stream_window(ray, window, run, spec, plan)


def _stream_window(
    ray: Any, window: list[Unit], run: RayRun, spec: PreprocessSpec, plan: ActorPlan
) -> Iterator[list[Result]]:
    expected = sum(len(unit.refs) for unit in window)
    got = 0
    last = (-1, -1)
    for table in _batches(build_dataset(ray, window, run, spec, plan)):
        seqs = table.column("seq").to_pylist()
        rows = table.column("row").to_pylist()
        for place in zip(seqs, rows, strict=True):
            if place <= last:
                raise RuntimeError("Ray returned the records out of order")
            last = place
        got += table.num_rows
        yield results_from_table(table, run.task.command)
    if got != expected:
        raise RuntimeError(f"Ray returned {got} records for {expected} inputs")


# --- -o DIR: parts written by the cluster ------------------------------------------------------


def write_parts_on_ray(
    inputs: Iterable[InputRef] | Iterable[Unit], run: RayRun, parts: PartFiles
) -> Iterator[list[Result]]:
    """Records written by the cluster into ``parts.folder`` (created): one Parquet part per
    unit and its status (see parts.py), the project's Parquet columns, one row per input,
    none through the driver; each part carries ``parts.metadata``.

    ``inputs``: units (units.iter_units: shards and row groups listed, not their members),
    or inputs already listed (made into units of loose inputs).  Yields light Results (path
    and error only) for progress and the exit code, as units progress (in any order).
    """
    require_ray()
    target = Path(parts.folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write output ({exc.strerror})") from exc
    # the workers' working folder is not the driver's
    parts = dataclasses.replace(parts, folder=str(target.resolve()))
    return _write(_as_units(inputs), run, parts)


def _as_units(inputs: Iterable[Any]) -> Iterator[Unit]:
    iterator = iter(inputs)
    first = next(iterator, None)
    if first is None:
        return iter(())
    chained = itertools.chain([first], iterator)
    return chained if isinstance(first, Unit) else refs_units(chained)


def _write(units: Iterator[Unit], run: RayRun, parts: PartFiles) -> Iterator[list[Result]]:
    first = next(units, None)
    if first is None:
        return
    with contextlib.ExitStack() as stack:
        ray, (spec, _width) = _start(stack, run)
        plan = plan_actors(ray.cluster_resources(), run)
        ledger = Ledger(ray, parts)
        try:
            for window in windows(itertools.chain([first], units)):
                ledger.open(window)
                for table in _batches(build_dataset(ray, window, run, spec, plan, parts)):
                    yield ledger.count(table)
                ledger.close_window()
            ledger.drain(None)
        except BaseException:
            ledger.drain(FINISH_WAIT)  # the units already counted whole get their part
            raise


class Ledger:
    """The driver's count per unit of the current window: rows seen, errors, pieces, and
    the last row's number once seen; a unit whose rows are all in pieces is finished by a
    task in the cluster (parts.finish_unit).  Memory: the window's units."""

    def __init__(self, ray: Any, parts: PartFiles) -> None:
        self.ray = ray
        self.parts = parts
        self.finish = ray.remote(num_cpus=0.01, max_retries=3)(unit_parts.finish_unit)
        self.units: dict[str, Unit] = {}
        self.seen: dict[str, list[Any]] = {}  # name -> [rows, errors, last row, started, pieces]
        self.pending: list[Any] = []
        self.finished: list[str] = []

    def open(self, window: list[Unit]) -> None:
        self.units = {unit.name: unit for unit in window}
        self.seen = {}

    def count(self, table: pa.Table) -> list[Result]:
        ids = ids_of(table)
        errors = table.column("error").to_pylist()
        columns = zip(
            table.column("unit").to_pylist(),
            table.column("row").to_pylist(),
            table.column("last").to_pylist(),
            table.column("piece").to_pylist(),
            table.column("started").to_pylist(),
            errors,
            strict=True,
        )
        touched = set()
        for unit, row, last, piece, started, error in columns:
            entry = self.seen.setdefault(unit, [0, 0, None, started, set()])
            entry[0] += 1
            entry[1] += error is not None
            if last:
                entry[2] = row
            entry[4].add(piece)
            touched.add(unit)
        for unit in touched:
            entry = self.seen[unit]
            if entry[2] is not None and entry[0] == entry[2] + 1:
                self._finish(unit, entry)
        self.reap()
        return [Result(path=p, error=e) for p, e in zip(ids, errors, strict=True)]

    def _finish(self, name: str, entry: list[Any]) -> None:
        unit = self.units.pop(name)
        del self.seen[name]
        rows, errors, _last, started, pieces = entry
        done = unit_parts.UnitDone(name, unit.input, rows, errors, started, tuple(sorted(pieces)))
        self.pending.append(self.finish.remote(self.parts.folder, done, dict(self.parts.metadata)))

    def close_window(self) -> None:
        """The window's execution ended: a unit not finished gave no rows (a shard with no
        image member): its status says 0 rows."""
        for name in list(self.units):
            if name in self.seen:
                raise RuntimeError(f"unit {name}: Ray returned only some of its records")
            self._finish(name, [0, 0, None, 0.0, set()])

    def reap(self) -> None:
        if not self.pending:
            return
        ready, self.pending = self.ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
        self._collect(ready)

    def _collect(self, ready: list[Any]) -> None:
        from ray.exceptions import RayError

        for ref in ready:
            try:
                self.finished.append(self.ray.get(ref))
            except RayError as exc:
                raise OutputError(
                    f"{self.parts.folder}: cannot write a part ({one_line(exc)[:300]})"
                ) from exc

    def drain(self, timeout: float | None) -> None:
        """Wait for the units being finished (at most ``timeout`` seconds)."""
        if not self.pending:
            return
        with contextlib.suppress(Exception):
            ready, self.pending = self.ray.wait(
                self.pending, num_returns=len(self.pending), timeout=timeout
            )
            self._collect(ready)


def report_shared_ids(folder: str, units: Iterable[str]) -> str | None:
    """The line to say when records of different units share an id (None: none do)."""
    shared, example = unit_parts.shared_ids(folder, units)
    if not shared:
        return None
    return (
        f"warning: {shared} records in {folder} have an id that a record of another unit has "
        f"too (for example {example!r}); ids are made unique within a unit only"
    )
