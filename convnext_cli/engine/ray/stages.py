"""The stages a row passes through inside the cluster, after the read tasks of
:mod:`~convnext_cli.engine.ray.datasource` made it: decode (CPU tasks), then the model (an
actor pool), which either returns the records' columns to the driver or writes them as
pieces of their unit's part (:mod:`~convnext_cli.engine.ray.parts`).

A row carries where it comes from: ``seq`` (its unit's place in the listing), ``unit`` (the
unit's name), ``row`` (its place in the unit), ``last`` (the unit's last row), ``id`` (its
record's ``path``), ``file`` (the input as a reference: a path, or a tar member / Parquet row
as JSON, never its bytes) and ``started`` (when its unit's read began).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING

from convnext_cli.engine.ray.parts import write_piece
from convnext_cli.engine.ray.settings import (
    ActorPlan,
    PartFiles,
    RayRun,
    load_runner_in_actor,
    test_hook,
)
from convnext_cli.engine.thread_tuner import ThreadTuner
from convnext_cli.imaging.preprocess import PreprocessSpec
from convnext_cli.inputs.datasets import Item
from convnext_cli.inputs.expand import InputRef

if TYPE_CHECKING:
    import pyarrow as pa

    from convnext_cli.engine.pipeline import Runner
    from convnext_cli.results import Result

_ITEM = b"\0item\0"  # a file path never holds NUL: a dataset member or row follows, as JSON

# what the model stage returns to the driver besides the records' own columns
KEYS = ("seq", "row", "id", "file")
PIECE_KEYS = ("seq", "unit", "row", "last", "id", "started")


def encode_ref(ref: InputRef) -> bytes:
    """An input for the ``file`` column: a path's bytes (``os.fsencode``, any name the file
    system allows), or a tar member / Parquet row as JSON."""
    if isinstance(ref, str):
        return os.fsencode(ref)
    return _ITEM + json.dumps(dataclasses.asdict(ref)).encode("ascii")


def decode_ref(raw: bytes) -> InputRef:
    if raw.startswith(_ITEM):
        return Item(**json.loads(raw[len(_ITEM) :]))
    return os.fsdecode(raw)


def id_bytes(ident: str) -> bytes:
    """An id for the ``id`` column: any name the file system allows (surrogate escapes
    included) survives Arrow."""
    return ident.encode("utf-8", "surrogateescape")


def ids_of(table: pa.Table) -> list[str]:
    return [raw.decode("utf-8", "surrogateescape") for raw in table.column("id").to_pylist()]


def position(batch: pa.Table) -> int:
    """The first row's place, for the test hooks: unit * 10^6 + row."""
    if batch.num_rows == 0:
        return -1
    return int(batch.column("seq")[0].as_py()) * 1_000_000 + int(batch.column("row")[0].as_py())


def decode_rows(batch: pa.Table, spec: PreprocessSpec) -> pa.Table:
    """Decode stage (a CPU task): adds (error, shape, pixels) to the rows.

    ``pixels`` is a uint8 (3, h, w) image as bytes, resized and cropped per ``spec``, by
    the local engine's own reader and decoder (``decode_pool.decode_one``: the safe readers,
    the decoding policy, the size caps).
    """
    import pyarrow as pa
    import torch

    from convnext_cli.engine.decode_pool import decode_one

    test_hook("decode", position(batch))
    errors: list[str | None] = []
    shapes: list[list[int] | None] = []
    pixels: list[bytes | None] = []
    for raw in batch.column("file").to_pylist():
        outcome = decode_one(decode_ref(raw), spec, False)
        if isinstance(outcome, torch.Tensor):
            errors.append(None)
            shapes.append(list(outcome.shape))
            pixels.append(outcome.contiguous().numpy().tobytes())
        else:  # the one-line reason (decode_one never raises)
            errors.append(str(outcome))
            shapes.append(None)
            pixels.append(None)
    return (
        batch.append_column("error", pa.array(errors, pa.string()))
        .append_column("shape", pa.array(shapes, pa.list_(pa.int32())))
        .append_column("pixels", pa.array(pixels, pa.binary()))
    )


class ModelActor:
    """Model stage: one actor per replica, the model loaded once in the constructor.

    Rows in: the decoded rows; rows out: the keys (:data:`KEYS`) with (error, labels,
    indices, scores) for classify or (error, embedding) for embed, or, with ``parts``, the
    piece keys (:data:`PIECE_KEYS`), error and ``piece`` after writing each unit's rows of
    the batch as a piece of its part.  ``run`` is the driver's, as it is: the model loads
    from its source and options, and its task runs.
    """

    def __init__(self, run: RayRun, plan: ActorPlan, parts: PartFiles | None = None) -> None:
        import torch

        if plan.threads:
            torch.set_num_threads(plan.threads)  # Ray sets OMP_NUM_THREADS to the actor's CPUs
        test_hook("actor-start")
        self.task = run.task
        self.batch_size = plan.batch_size
        self.runner = load_runner_in_actor(run)
        # The decode tasks resized and cropped already: the runner only normalises.
        self.runner.spec = dataclasses.replace(
            self.runner.spec, do_resize=False, do_center_crop=False
        )
        self.parts = parts
        self.tuner = actor_tuner(plan, self.runner)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import numpy as np
        import torch

        from convnext_cli.results import InMemoryImage

        ids = ids_of(batch)
        items = []
        for i, error, shape, data in zip(
            ids,
            batch.column("error").to_pylist(),
            batch.column("shape").to_pylist(),
            batch.column("pixels").to_pylist(),
            strict=True,
        ):
            if error is not None:
                items.append(InMemoryImage(i, None, error))
                continue
            array = np.frombuffer(data, dtype=np.uint8).reshape(shape)
            items.append(InMemoryImage(i, torch.from_numpy(array.copy())))
        batches = self.task.run(self.runner, items, workers=0, batch_size=self.batch_size)
        results = [r for results in batches for r in results]
        if self.tuner is not None and (changed := self.tuner.batch_done(len(items))):
            torch.set_num_threads(changed)
        test_hook("actor-call", position(batch))
        if self.parts is not None:
            dim = int(self.runner.model.config.hidden_sizes[-1])
            return write_piece(batch.select(list(PIECE_KEYS)), results, self.task, dim, self.parts)
        return columns(batch.select(list(KEYS)), results, self.task.command)


def actor_tuner(plan: ActorPlan, runner: Runner) -> ThreadTuner | None:
    """A CPU actor's model threads, chosen by measuring (as the local engine chooses them,
    :mod:`~convnext_cli.engine.thread_tuner`): all its threads, or one fewer, which leaves a
    core to the decode tasks beside it.  Which is faster depends on the run (measured on 2
    cores, 8x8 PNG rows: one thread did 17% more rows; ConvNeXt-T's shape on photos needs
    both).  The actor cannot see its decoders' load, so each round measures both counts
    (``blind``).  Only float32 eager runs: their numbers are the same whatever the count."""
    import torch

    if not plan.threads or plan.threads < 2 or runner.device.type != "cpu":
        return None
    if runner.dtype != torch.float32 or runner.compiled:
        return None
    return ThreadTuner([plan.threads, plan.threads - 1], blind=True)


def columns(keys: pa.Table, results: list[Result], command: str) -> pa.Table:
    """The keys with the records' columns."""
    import pyarrow as pa

    table = keys.append_column("error", pa.array([r.error for r in results], pa.string()))
    if command == "embed":
        vectors = [
            None if r.error is not None or r.embedding is None else r.embedding.numpy().tolist()
            for r in results
        ]
        return table.append_column("embedding", pa.array(vectors, pa.list_(pa.float32())))
    table = table.append_column(
        "labels",
        pa.array([[p.label for p in r.predictions] for r in results], pa.list_(pa.string())),
    )
    table = table.append_column(
        "indices",
        pa.array([[p.index for p in r.predictions] for r in results], pa.list_(pa.int32())),
    )
    return table.append_column(
        "scores",
        pa.array(
            [[float(p.score) for p in r.predictions] for r in results], pa.list_(pa.float64())
        ),
    )


def results_from_table(table: pa.Table, command: str) -> list[Result]:
    """Model-stage rows back into Result objects: each with its record's path and its
    input (``source``: the HTML report reads it)."""
    from convnext_cli.results import Prediction, Result

    paths = ids_of(table)
    sources = [decode_ref(raw) for raw in table.column("file").to_pylist()]
    errors = table.column("error").to_pylist()
    out = []
    if command == "embed":
        import numpy as np
        import torch

        vectors = table.column("embedding").to_pylist()
        for path, error, vector in zip(paths, errors, vectors, strict=True):
            embedding = None
            if error is None and vector is not None:
                embedding = torch.from_numpy(np.asarray(vector, dtype=np.float32))
            out.append(Result(path=path, error=error, embedding=embedding))
    else:
        predictions = zip(
            table.column("labels").to_pylist(),
            table.column("indices").to_pylist(),
            table.column("scores").to_pylist(),
            strict=True,
        )
        for path, error, (labels, indices, scores) in zip(paths, errors, predictions, strict=True):
            found = zip(labels or [], indices or [], scores or [], strict=True)
            out.append(Result(path=path, error=error, predictions=[Prediction(*p) for p in found]))
    for result, source in zip(out, sources, strict=True):
        result.source = source
    return out
