"""One job, end to end: what ``convnext classify`` and ``convnext embed`` run, as a library.

Inputs are listed (and sharded), the user's files are protected, the output is planned
(plain, resumed, or part files written by a Ray cluster), the model is loaded and its
batches are streamed into the writer, which is finished also on Ctrl-C / SIGTERM::

    import convnext_cli

    code = convnext_cli.run(
        "classify", ["photos/"], model="facebook/convnext-tiny-224",
        output="labels.jsonl", resume=True,
    )   # 0: every input succeeded, 1: some failed (their error records are in the file)

Usage errors and the like raise the project's exceptions (:mod:`convnext_cli.errors`);
the exit code the CLI gives each of them is its ``exit_code``.  What the run says (notes,
warnings, the records as they are written) goes through a :class:`Report`; the CLI's
(``cli/jobs.py``) adds the progress bar and the closing summary.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cli.choices import DEFAULT_MODEL, ENGINES
from convnext_cli.engine import _interrupts as interrupts
from convnext_cli.engine.batches import Batches
from convnext_cli.engine.task import COMMANDS, Task
from convnext_cli.errors import (
    EXIT_INPUT_FAILED,
    EXIT_OK,
    DeviceFailure,
    NoInputsError,
    OutputError,
    UsageError,
)
from convnext_cli.inputs.expand import InputRef, InputStream, input_id, iter_inputs
from convnext_cli.limits import (
    MAX_SHARDS,
    as_path,
    as_paths,
    check_environment,
    check_job_fields,
    is_int,
)
from convnext_cli.outputs.files import (
    existing_targets,
    file_identity,
    is_stdout,
    refuse_overwriting,
    refused,
)
from convnext_cli.outputs.names import say, visible
from convnext_cli.outputs.resume import RESUMABLE_FORMATS, KeptRecordsWriter, RecordedWriter
from convnext_cli.outputs.writers import choose_format, open_writer, output_targets
from convnext_cli.startup import STDOUT_CLOSED_MESSAGE, stdout_closed

if TYPE_CHECKING:
    from convnext_cli.engine.loading import ModelSource, RunOptions
    from convnext_cli.engine.pipeline import Runner
    from convnext_cli.engine.ray.settings import PartFiles, RayRun, RaySettings
    from convnext_cli.outputs.writers import Writer
    from convnext_cli.results import Result

# -------------------------------------------------------------------------------- the job


@dataclass
class Job:
    """Everything classify or embed was asked to do (the options the two commands share)."""

    command: str  # "classify" or "embed"
    inputs: list[str]
    model: str
    fmt: str | None
    output: Path | None
    top_k: int = 5  # 0: every class (-k all)
    scores: str = "probs"  # classify --scores: probs, logits or log-probs
    normalize: bool = False
    # embed --stage / --pool / --backbone (none of them: transformers' pooler_output)
    stages: list[str] = field(default_factory=list)
    pool: str = "avg"
    backbone: bool = False
    batch_size: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    recursive: bool = False
    null: bool = False
    workers: int | None = None
    compile_model: bool = False
    decode: str = "auto"
    shard: str | None = None
    resume: bool = False
    retry_errors: bool = False
    force_resume: bool = False
    image_column: str | None = None
    id_column: str | None = None
    engine: str = "local"
    ray_address: str | None = None
    replicas: int | None = None
    verbose: bool = False
    quiet: bool = False  # -q: no notes, bar or summary on stderr (cli/progress.py)
    progress: bool = True  # --no-progress: False
    # model loading (huggingface_hub); --labels replaces the checkpoint's id2label
    revision: str | None = None
    cache_dir: Path | None = None
    token: str | None = None
    labels: Path | None = None
    # not an option: where the runner comes from instead of this process, when it can
    # (``convnext serve``'s client, serve/client.py); None from it: loaded here
    loader: Callable[[Job, Report], Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """The fields checked as the CLI's flags are (one table: :mod:`convnext_cli.limits`):
        a str, bytes or Path for ``inputs`` is one input; a bad type or range: UsageError."""
        check_job_fields(self)
        if self.shard is not None:
            parse_shard(self.shard)

    @classmethod
    def from_options(cls, command: str, options: dict[str, Any]) -> Job:
        """A job from a command's parameters, named as the fields are (``--no-progress``
        arrives as ``no_progress``)."""
        options = dict(options)
        if "no_progress" in options:
            options["progress"] = not options.pop("no_progress")
        names = {f.name for f in fields(cls)} - {"command"}
        return cls(command=command, **{k: v for k, v in options.items() if k in names})

    # What the job is made of, built once here; both engines run from these objects (the
    # Ray actors receive them as they are).

    def model_source(self) -> ModelSource:
        """Which checkpoint (as :func:`~convnext_cli.engine.loading.load_runner` takes it)."""
        from convnext_cli.engine.loading import ModelSource

        return ModelSource(self.model, self.revision, self.cache_dir, self.token, self.labels)

    def run_options(self) -> RunOptions:
        """How the model runs: device, dtype, decoding, torch.compile."""
        from convnext_cli.engine.loading import RunOptions

        return RunOptions(self.device, self.dtype, self.decode, self.compile_model)

    def task(self) -> Task:
        """What the head computes for each image, and the images per model call."""
        return Task(
            self.command,
            self.top_k,
            self.scores,
            self.normalize,
            tuple(self.stages),
            self.pool,
            self.backbone,
            self.batch_size,
        )

    def ray_settings(self) -> RaySettings:
        """``--engine ray``'s own settings: replicas, the cluster's address, Ray's logging."""
        from convnext_cli.engine.ray.settings import RaySettings

        return RaySettings(self.replicas, self.ray_address, self.verbose)


# ----------------------------------------------------------------------- what a run says


class Report:
    """What a job says while it runs.  This one (the library's default): notes and warnings
    on stderr (notes not when ``quiet``), the batches written as they come, no bar and no
    summary.  The CLI's subclass (``cli/jobs.py``) draws the bar and says the summary."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def note(self, message: str) -> None:
        """An informational line (``note: ...``, ``resuming ...``)."""
        if not self.quiet:
            say(message)

    def warn(self, message: str) -> None:
        """A warning or an error line: always said."""
        say(message)

    def track(self, batches: Iterable[list[Result]], plan: Plan) -> int:
        """Write every batch into the plan's writer; return the number of failed inputs."""
        failed = 0
        for results in batches:
            with interrupts.deferred():
                plan.writer.write(results)
            for result in results:
                if result.error is not None:
                    failed += 1
                    if plan.writer.names_errors_on_stderr:
                        self.warn(f"error: {result.path}: {result.error}")
        return failed

    def interrupted(self, records: int, output: str | None, resumable: bool) -> None:
        """Ctrl-C or SIGTERM ended the run after ``records`` records (kept in ``output``)."""


# ----------------------------------------------------------------- inputs, shard, safety


def gather_inputs(
    inputs: list[str],
    recursive: bool,
    null_separated: bool = False,
    image_column: str | None = None,
    id_column: str | None = None,
    warn: Callable[[str], None] = say,
) -> Iterator[InputRef]:
    """Expand INPUTS (stdin only when '-' is given) as a stream; warnings go to ``warn``.

    The first input is listed here, so that "no input images found" (and a brace pattern
    naming too many files) is a usage error before anything is opened or loaded; the rest
    are listed as the run takes them.
    """
    if not inputs:
        raise UsageError("no inputs given (files, folders, globs, or '-' for stdin)")
    refuse_all_missing(inputs)
    listing = iter_inputs(
        inputs,
        recursive=recursive,
        warn=lambda msg: warn(f"warning: {msg}"),
        null_separated=null_separated,
        image_column=image_column,
        id_column=id_column,
    )
    first = next(listing)  # NoInputsError when there is none
    return itertools.chain([first], listing)


def _named_exists(given: str) -> bool:
    """Whether an input named on the command line names anything: ``-``, a path that exists,
    a glob that matches (its first match is enough), a brace pattern (left to the listing)."""
    path = os.path.expanduser(given)
    if given == "-" or "{" in given or os.path.lexists(path):
        return True
    if any(ch in given for ch in "*?["):
        import glob

        return next(glob.iglob(path, recursive=True), None) is not None
    return False


def refuse_all_missing(inputs: list[str]) -> None:
    """When no input named exists (a mistyped folder, a glob that matches nothing),
    NoInputsError (exit 2) at once, before the model loads.  A missing file named beside
    inputs that exist gets its own error record, as before (exit 1)."""
    if any(_named_exists(given) for given in inputs):
        return
    shown = ", ".join(visible(given) for given in inputs[:3])
    more = f" and {len(inputs) - 3} more" if len(inputs) > 3 else ""
    if len(inputs) > 1:
        subject = "none of these exists"
    elif any(ch in inputs[0] for ch in "*?["):
        subject = "matches no file"
    else:
        subject = "no such file or folder"
    raise NoInputsError(f"{shown}{more}: {subject}")


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) with 0 <= I < N."""
    if not isinstance(text, str):
        raise UsageError(f"--shard {text!r}: use I/N as a string, e.g. '0/4'")
    parts = text.split("/")
    if len(parts) != 2 or not all(is_int(part) for part in parts):
        raise UsageError(f"--shard {text!r}: use I/N, e.g. 0/4")
    index, count = int(parts[0]), int(parts[1])
    if not 1 <= count <= MAX_SHARDS:
        raise UsageError(f"--shard {text!r}: N must be 1 to {MAX_SHARDS}")
    if not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def take_shard(items: Iterable[InputRef], shard: str | None) -> Iterable[InputRef]:
    """Every N-th input from the I-th, by listing order (stable across runs); a list gives a
    list, a stream a stream."""
    if shard is None:
        return items
    index, count = parse_shard(shard)
    if isinstance(items, list):
        return items[index::count]
    return itertools.islice(items, index, None, count)


def watch_overwriting(items: Iterable[InputRef], targets: list[Path]) -> Iterator[InputRef]:
    """The inputs, each checked as it is listed: one that is an output target (through a
    symlink or a hard link too) raises the same OutputError as :func:`refuse_overwriting`,
    mid-run; the writer is then aborted and the target left untouched.  Only when a target
    exists already (otherwise no input can be it): then one ``stat`` per input file, once
    per dataset file."""
    existing = existing_targets(targets)
    if not existing:
        yield from items
        return
    last = None
    for item in items:
        path = item if isinstance(item, str) else str(item.file or item.id)
        if path != last:
            identity = file_identity(path)
            if identity in existing:
                raise refused(existing[identity], "an input", path)
            last = path
        yield item


def _named_files(inputs: list[str]) -> list[str]:
    """The inputs named on the command line that are files (checked before anything runs)."""
    named = []
    for given in inputs:
        path = os.path.expanduser(given) if given.startswith("~") else given
        if given != "-" and os.path.isfile(path):
            named.append(path)
    return named


def _targets_listed(targets: list[Path], inputs: list[str], recursive: bool) -> list[str]:
    """Existing targets (symlinks resolved) that a folder or a glob among the inputs would
    list: refused before anything is read, as a named input is (a resumed run reads its
    target, and makes files beside it, before the listing reaches it)."""
    import fnmatch
    import glob

    from convnext_cli.inputs.expand import is_image_name

    found = []
    for target in targets:
        real = os.path.realpath(target)
        if not (os.path.isfile(real) and is_image_name(real)):
            continue  # only images are listed from folders (datasets are watched as read)
        for given in inputs:
            path = os.path.expanduser(given)
            if os.path.isdir(path):
                folder = os.path.realpath(path)
                inside = os.path.dirname(real) == folder or (
                    recursive and real.startswith(folder.rstrip(os.sep) + os.sep)
                )
                if inside:
                    found.append(real)
            elif glob.has_magic(path) and fnmatch.fnmatch(real, os.path.abspath(path)):
                found.append(real)
    return found


def check_features_request(job: Job, fmt: str) -> None:
    """embed --stage / --pool / --backbone: what the format and engine can hold, before
    anything is loaded (the stage names are checked against the model once it is)."""
    from convnext_cli.choices import POOLS

    if job.command != "embed":
        return
    if job.pool not in POOLS:
        raise UsageError(f"--pool {job.pool!r}: use {', '.join(POOLS)}")
    if not (job.stages or job.backbone):
        if job.pool != "avg":
            raise UsageError("--pool applies to --stage/--backbone features")
        return
    if job.engine != "local":
        raise UsageError("--stage/--backbone run on the local engine only")
    if job.pool == "none" and fmt not in ("npy", "safetensors", "parquet"):
        shown = "the terminal's table" if fmt == "table" else fmt
        raise UsageError(
            f"--pool none gives (C, H, W) maps, which {shown} cannot hold: "
            "write them with -o FILE.npy, FILE.safetensors or FILE.parquet"
        )
    if job.pool == "none" and job.normalize:
        raise UsageError("--normalize applies to pooled features, not to --pool none maps")
    if fmt == "npy" and len(set(job.stages)) > 1:
        raise UsageError("npy holds one array: one --stage, or several in safetensors or parquet")


def check_job(job: Job) -> str:
    """What can be refused before anything is listed or loaded; returns the output format."""
    if job.command not in COMMANDS:
        raise UsageError(f"unknown command {job.command!r}")
    if job.engine not in ENGINES:
        raise UsageError(f"--engine {job.engine!r}: use local or ray")
    check_environment()
    if is_stdout(job.output) and stdout_closed():
        raise OutputError(STDOUT_CLOSED_MESSAGE)
    fmt = choose_format(job.command, job.fmt, job.output, sys.stdout.isatty())
    check_features_request(job, fmt)
    if job.shard is not None:
        parse_shard(job.shard)  # a bad flag is said before a missing input
    if job.resume and (is_stdout(job.output) or fmt not in RESUMABLE_FORMATS):
        raise UsageError(f"--resume needs -o FILE in {', '.join(RESUMABLE_FORMATS)}")
    return fmt


# ----------------------------------------------------------------------------- one flow


@dataclass
class Plan:
    """Where a run writes and what it runs: the one part of a job that differs between a
    plain output, a resumed one, and the part files of a Ray cluster."""

    writer: Writer
    batches: Callable[[], Iterable[list[Result]]]  # loads the model where not loaded yet
    total: Any  # an int, None, or an InputStream that learns it (cli/progress.py TotalLike)
    output: Path | None
    fmt: str | None
    created: list[Path] = field(default_factory=list)  # dropped if the output is
    closed: bool = False  # the writer was closed: the output is in place

    def finish(self) -> None:
        """Close the writer (the output moved into place) with Ctrl-C/SIGTERM held until it
        is done, so that a signal at the end of a run finds the records at their name; the
        report calls it before its summary (and :func:`write_results` after the report)."""
        if not self.closed:
            self.closed = True
            with interrupts.deferred():
                self.writer.close()

    @property
    def shown(self) -> str | None:
        """The file the summary names as written (None: stdout)."""
        return None if self.output is None or is_stdout(self.output) else str(self.output)

    @property
    def to_terminal(self) -> bool:
        """The records go to a terminal (which a progress bar would share)."""
        return is_stdout(self.output) and sys.stdout.isatty()


def run_job(job: Job, report: Report | None = None) -> int:
    """Inputs -> shard -> (resume) -> model -> writer; returns the exit code (0, or 1 when
    any input failed)."""
    report = report or Report(quiet=job.quiet)
    fmt = check_job(job)
    targets = output_targets(fmt, job.output)
    if job.engine == "ray":  # lists units (-o DIR) or streams its inputs, as the local engine
        listed = _targets_listed(targets, job.inputs, job.recursive)
        refuse_overwriting(targets, [*_named_files(job.inputs), *listed], job.model)
        plan = _plan_ray(job, fmt, targets, report)
    else:  # the local engine streams: the first batch runs while the listing goes on
        listing = gather_inputs(
            job.inputs, job.recursive, job.null, job.image_column, job.id_column, report.warn
        )
        items = take_shard(listing, job.shard)
        listed = _targets_listed(targets, job.inputs, job.recursive)
        refuse_overwriting(targets, [*_named_files(job.inputs), *listed], job.model)
        items = watch_overwriting(items, targets)
        plain = not job.resume and fmt != "parquet"
        plan = (_plan_streaming if plain else _plan_resumable)(job, fmt, items, report)
    try:
        return write_results(plan, report)
    except Exception:  # the output was dropped (a refusal mid-run, say): so is its record
        for path in plan.created:
            path.unlink(missing_ok=True)
        raise


def write_results(plan: Plan, report: Report) -> int:
    """Run the plan's batches (which may load the model) into its writer and end the
    writer's life cycle.

    Finished: the writer closes (the output is moved into place).  Ctrl-C or SIGTERM: the
    records written so far are closed into a valid file and moved into place (an output
    file with no record yet is dropped, its target untouched), then the interrupt goes on; a
    device failure (DeviceFailure, exit 70) likewise.  Any other error: the writer aborts, the
    target is untouched.
    """
    writer, output = plan.writer, plan.output
    try:
        with interrupts.cleanup_on_leave(writer.abort):
            produced = plan.batches()  # loads the model: a signal here drops the output
        with interrupts.raising():
            failures = report.track(produced, plan)
            plan.finish()  # (the CLI's report did, before its summary)
    except (KeyboardInterrupt, DeviceFailure) as stop:  # a dead GPU ends the run as Ctrl-C does
        with interrupts.finishing():
            if plan.closed:  # in place already (or its close failed: what it has is kept)
                writer.abort(keep=True)
            elif writer.records or is_stdout(output):  # stdout: close the JSON array anyway
                writer.close()
            else:
                writer.abort()
            if isinstance(stop, KeyboardInterrupt):  # a device failure says it in its one line
                kind = plan.fmt or (output.suffix.lstrip(".") if output else "")
                report.interrupted(writer.records, plan.shown, kind in RESUMABLE_FORMATS)
        raise
    except BaseException:
        writer.abort()
        raise
    return EXIT_INPUT_FAILED if failures else EXIT_OK


def _plan_streaming(job: Job, fmt: str, items: Iterable[InputRef], report: Report) -> Plan:
    """No --resume: the writer opens first (it fails before loading), the model loads when
    the batches start, and a jsonl/csv file gets its provenance record then."""
    stream = InputStream(items)
    writer = _recorded_writer(
        job, fmt, open_writer(job.command, fmt, job.output, job.top_k, scores=job.scores)
    )

    def batches() -> Batches:
        runner = _load(job, report)
        if hasattr(writer, "set_run_info"):  # the HTML report says what made it
            writer.set_run_info(run_info(job, runner))
        if isinstance(writer, RecordedWriter):  # recorded with the first result written
            writer.provenance = make_provenance(job, runner.model.config, runner.spec, runner)
        return _local_batches(job, runner, stream, report)

    plan = Plan(writer, batches, stream, job.output, fmt)
    if isinstance(writer, RecordedWriter):
        writer.created = plan.created
    return plan


def _recorded_writer(
    job: Job, fmt: str, writer: Writer, provenance: dict[str, Any] | None = None
) -> Writer:
    """A jsonl/csv file's writer, which writes ``.NAME.run.json`` with its first result."""
    if fmt not in ("jsonl", "csv") or job.output is None or is_stdout(job.output):
        return writer
    return RecordedWriter(writer, job.output, fmt, provenance)


def _plan_resumable(job: Job, fmt: str, items: Iterable[InputRef], report: Report) -> Plan:
    """--resume (or parquet, whose file says what made it): the model loads first, for the
    provenance the earlier run's must match; what the output holds already is skipped."""
    runner = _load(job, report)
    provenance = make_provenance(job, runner.model.config, runner.spec, runner)
    todo, writer = open_resumable(job, fmt, items, provenance, report.note)
    total = len(todo) if isinstance(todo, list) else todo
    return Plan(writer, lambda: _local_batches(job, runner, todo, report), total, job.output, fmt)


def _load(job: Job, report: Report) -> Runner:
    """The model, through the core's one loading path; its notes to the report."""
    if job.loader is not None:
        runner = job.loader(job, report)
        if runner is not None:
            return runner  # a stand-in for Runner (serve/client.py)
    from convnext_cli.engine.loading import load_runner

    def on_note(text: str) -> None:
        report.note(f"note: {text}")

    return load_runner(job.model_source(), job.run_options(), on_note=on_note).runner


def run_info(job: Job, runner: Runner) -> dict[str, str]:
    """What a report shows about the run that made it."""
    import shlex
    from datetime import datetime, timezone

    from convnext_cli import __version__

    labels = len(runner.labels or ())
    spec = runner.spec.to_dict() if hasattr(runner.spec, "to_dict") else {}
    size = spec.get("size") or spec.get("crop_size") or spec.get("image_size")
    info = {
        "model": job.model + (f"@{job.revision}" if job.revision else ""),
        "device": f"{runner.device} {str(runner.dtype).removeprefix('torch.')}",
        "top-k": str(min(job.top_k, labels) if labels else job.top_k),
        "classes": str(labels),
    }
    if isinstance(size, dict):
        size = size.get("shortest_edge") or size.get("height")
    if size:
        info["input"] = f"{size} px"
    info["made"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["by"] = f"convnext-cli {__version__}"
    info["command"] = shlex.join(["convnext", *sys.argv[1:]])
    return info


def _note_top_k_cap(job: Job, labels: int, report: Report) -> None:
    """``-k 2000`` on a 1000-class model gives 1000 predictions: said, not silent."""
    if job.command == "classify" and labels and job.top_k > labels:
        report.note(
            f"note: -k {job.top_k} is more than the model's {labels} classes: {labels} each"
        )


def _local_batches(job: Job, runner: Runner, items: Iterable[InputRef], report: Report) -> Batches:
    task = job.task()
    if task.command == "classify":
        _note_top_k_cap(job, len(runner.labels or ()), report)
    batches = task.run(runner, items, workers=job.workers)
    served = getattr(runner, "served", None)  # by convnext serve (serve/client.py)
    return Batches(batches, task.verb, runner.device, runner.dtype, runner.times, served)


def make_provenance(job: Job, config: Any, spec: Any, runner: Any = None) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the file (with the runner:
    its device, dtype and JPEG decoder too, which change the numbers)."""
    import hashlib
    import json

    from convnext_cli import __version__

    model = job.model
    if Path(model).expanduser().exists():
        model = os.path.realpath(Path(model).expanduser())
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    labels = len(config.labels) if job.command == "classify" else None
    # what the scores are, recorded only when not probabilities (files from before --scores
    # hold probabilities and say nothing), so that --resume refuses to mix them
    scores: dict[str, Any] = (
        {"scores": job.scores} if job.command == "classify" and job.scores != "probs" else {}
    )
    if job.command == "embed" and (job.stages or job.backbone):  # likewise
        scores["features"] = {"stages": job.stages, "pool": job.pool, "backbone": job.backbone}
    return {
        "tool": f"convnext-cli {__version__}",
        "command": job.command,
        "model": model,
        "config": hashlib.sha256(config_json.encode()).hexdigest()[:16],
        "top_k": min(job.top_k or labels, labels) if labels else None,
        "normalize": job.normalize if job.command == "embed" else None,
        "preprocess": spec.to_dict(),
        "width": _embedding_width(job, config),
        **(_runner_provenance(runner) if runner is not None else {}),
        **scores,
    }


def _embedding_width(job: Job, config: Any) -> int | None:
    """embed's pooled feature width (a resume never mixes two, even forced)."""
    if job.command != "embed" or job.stages or job.backbone:
        return None
    sizes = getattr(config, "hidden_sizes", None)
    return int(sizes[-1]) if sizes else None


def _runner_provenance(runner: Any) -> dict[str, str]:
    return {
        "device": str(runner.device),
        "dtype": str(runner.dtype).removeprefix("torch."),
        "decode": "gpu" if runner.jpeg_on_device else "cpu",
    }


# ------------------------------------------------------------------------------- resuming


def _ignore(_text: str) -> None:
    pass


def open_resumable(
    job: Job,
    fmt: str,
    items: Iterable[InputRef],
    provenance: dict[str, Any],
    note: Callable[[str], None] = _ignore,
) -> tuple[list[InputRef] | InputStream, Writer]:
    """With --resume: skip what FILE already holds and open the writer that keeps it
    (without: the writer, which records ``provenance``, and every input).

    A list of inputs (``--engine ray``) gives the list still to do; a stream gives an
    :class:`InputStream` of them, filtered as they are listed (one set lookup each).
    """

    if job.output is None:
        raise UsageError(f"--resume needs -o FILE in {', '.join(RESUMABLE_FORMATS)}")
    target = Path(os.path.realpath(job.output))
    if not job.resume:
        writer = open_writer(job.command, fmt, job.output, job.top_k, provenance, scores=job.scores)
        writer = _recorded_writer(job, fmt, writer, provenance)
        return (items if isinstance(items, list) else InputStream(items)), writer
    recorded = _recorded(job, fmt, target, provenance)
    done = recorded.ids
    todo: list[InputRef] | InputStream
    if isinstance(items, list):
        todo = [item for item in items if input_id(item) not in done]
        _say_resuming(job.output, len(items) - len(todo), len(todo), recorded, note)
    else:
        todo = InputStream(item for item in items if input_id(item) not in done)
        _say_resuming(job.output, len(done), None, recorded, note)
    writer = open_writer(
        job.command,
        fmt,
        job.output,
        job.top_k,
        provenance,
        True,
        job.retry_errors,
        scores=job.scores,
    )
    if fmt == "parquet":
        return todo, writer  # its parts stay on disk whatever ends the run
    kept = RecordedWriter(writer, target, fmt, provenance)
    _keep_records(kept, target, recorded)
    kept.record()  # the kept records hold a result: their provenance is this run's now
    return todo, KeptRecordsWriter(kept)


def _recorded(job: Job, fmt: str, target: Path, provenance: dict[str, Any]) -> Any:
    """What the output holds already (checked against ``provenance``): a resume.Recorded."""
    from convnext_cli.outputs import parquet as parquet_output
    from convnext_cli.outputs import resume

    assert job.output is not None
    if fmt == "parquet":
        resume.check_resumable(target)
        sources = parquet_output.check_earlier(target, job.command, provenance, job.force_resume)
        return resume.read_parquet_ids(sources, job.retry_errors)
    sources = resume.text_sources(target)
    resume.refuse_if_locked(target, job.output)
    resume.check_text_provenance(job.output, fmt, sources, provenance, job.force_resume)
    return resume.keep_text_records(
        sources,
        resume.copy_path(target),
        fmt,
        job.retry_errors,
        provenance["top_k"],
    )


def _keep_records(writer: Writer, target: Path, recorded: Any) -> None:
    """Write the kept records into the new output from the copy :func:`resume.keep_text_records`
    made of them (kill-safe: the copy goes only once they are all in the new output), a few
    MiB at a time."""
    from convnext_cli.outputs import resume

    copy = resume.copy_path(target)
    try:
        if recorded.kept:
            for records in resume.kept_records(copy, recorded):
                writer.preserve(records, recorded.header)  # type: ignore[attr-defined]
    except BaseException:
        writer.abort(keep=True)
        raise
    copy.unlink(missing_ok=True)


def _say_resuming(
    output: Path, done: int, todo: int | None, recorded: Any, note: Callable[[str], None]
) -> None:
    extra = []
    if recorded.errors_dropped:
        extra.append(f"{recorded.errors_dropped} failed ones to retry")
    if recorded.torn:
        extra.append(f"{recorded.torn} cut-off record(s) to redo")
    more = f" ({', '.join(extra)})" if extra else ""
    rest = "" if todo is None else f", {todo} to do"
    note(f"resuming {output}: {done} inputs already done{rest}{more}")


# ------------------------------------------------------------------------------------ Ray


def _plan_ray(job: Job, fmt: str, targets: list[Path], report: Report) -> Plan:
    """--engine ray: the checkpoint is read here for its facts (the actors load their own);
    the batches come from the cluster, or, for ``-o DIR`` parquet, part files it writes.
    The actors receive the job's own model source, run options and task, unchanged."""
    from convnext_cli.engine.loading import read_source
    from convnext_cli.engine.ray import settings as ray_settings
    from convnext_cli.engine.ray.run import run_on_ray

    if fmt == "parquet" and job.output is not None and _is_folder_target(job.output):
        ray_settings.require_ray()
    source = job.model_source()
    checkpoint = read_source(source)
    _note_top_k_cap(job, len(checkpoint.config.labels or ()), report)
    provenance = make_provenance(job, checkpoint.config, checkpoint.preprocess)
    facts = ray_settings.checkpoint_facts(checkpoint, job.command)
    del checkpoint  # its tensors: the actors load their own
    ray_run = ray_settings.RayRun(source, job.run_options(), job.task(), job.ray_settings(), facts)
    notice = ray_settings.decode_notice(job.decode)
    if notice:
        report.warn(notice)
    if fmt == "parquet" and job.output is not None and _is_folder_target(job.output):
        parts = ray_settings.PartFiles(str(job.output), provenance)
        return _plan_ray_folder(job, ray_run, parts, report)
    listing = gather_inputs(
        job.inputs, job.recursive, job.null, job.image_column, job.id_column, report.warn
    )
    items = watch_overwriting(take_shard(listing, job.shard), targets)
    if job.output is None:
        todo: Iterable[InputRef] = InputStream(items)
        writer = open_writer(job.command, fmt, None, job.top_k, scores=job.scores)
    else:
        todo, writer = open_resumable(job, fmt, items, provenance, report.note)

    def batches() -> Batches:
        return Batches(run_on_ray(todo, ray_run), ray_run.task.verb, "ray")

    return Plan(writer, batches, todo, job.output, fmt)


def _plan_ray_folder(job: Job, ray_run: RayRun, parts: PartFiles, report: Report) -> Plan:
    """``-o DIR --format parquet`` on Ray: units (shards, row groups, chunks of files) are
    listed as the run goes; the cluster writes one part and one status per unit into DIR.
    ``--resume`` skips the units whose status is there (``--retry-errors``: those with no
    failed input), after removing what is left of the others."""
    from convnext_cli.engine.ray import parts as ray_parts
    from convnext_cli.engine.ray.units import iter_units

    folder = Path(parts.folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write output ({exc.strerror})") from exc
    complete = ray_parts.complete_units(folder) if job.resume else {}
    if job.retry_errors:
        complete = {name: s for name, s in complete.items() if not s.get("errors")}
    if complete:
        _check_folder_provenance(job, complete, dict(parts.metadata))
    shard = (0, 1) if job.shard is None else parse_shard(job.shard)
    ray_parts.clear_unfinished(folder, complete, shard)
    if job.resume:
        done = sum(int(s.get("rows") or 0) for s in complete.values())
        report.note(f"resuming {folder}: {len(complete)} units ({done} inputs) already done")
    units = iter_units(
        job.inputs,
        job.recursive,
        warn=lambda msg: report.warn(f"warning: {msg}"),
        null_separated=job.null,
        columns=(job.image_column, job.id_column),
    )
    units = itertools.chain([next(units)], units)  # none at all: a usage error, before Ray
    if job.shard is not None:  # every N-th unit: each machine of a fleet takes its own
        units = itertools.islice(units, shard[0], None, shard[1])
    todo = (unit for unit in units if unit.name not in complete)

    def written() -> Iterator[list[Result]]:
        from convnext_cli.engine.ray.run import report_shared_ids, write_parts_on_ray

        yield from write_parts_on_ray(todo, ray_run, parts)
        line = report_shared_ids(str(folder), ray_parts.complete_units(folder))
        if line:
            report.warn(line)

    def batches() -> Batches:
        return Batches(written(), ray_run.task.verb, "ray")

    return Plan(FolderProgress(), batches, None, None, None)


def _check_folder_provenance(
    job: Job, complete: dict[str, dict[str, Any]], current: dict[str, Any]
) -> None:
    from convnext_cli.outputs import resume

    assert job.output is not None
    earlier = next(iter(complete.values())).get("provenance")
    recorded = earlier if isinstance(earlier, dict) else None
    resume.check_provenance(recorded, current, job.output, job.force_resume)


def _is_folder_target(output: Path) -> bool:
    """With --engine ray and parquet: ``-o DIR`` (an existing folder, or a name without the
    ``.parquet`` extension) gets part files written by the cluster."""
    return output.is_dir() or output.suffix.lower() != ".parquet"


class FolderProgress:
    """For ``-o DIR`` on Ray: the records are written by the cluster; this only counts them."""

    names_errors_on_stderr = True
    records = 0

    def write(self, results: list[Result]) -> None:
        self.records += len(results)

    def close(self) -> None:
        pass

    def abort(self, keep: bool = False) -> None:
        pass


# ------------------------------------------------------------------------- the Python API


def run(
    command: str,
    inputs: str | bytes | os.PathLike[str] | Iterable[str | bytes | os.PathLike[str]],
    *,
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    output: str | os.PathLike[str] | None = None,
    fmt: str | None = None,
    resume: bool = False,
    engine: str = "local",
    report: Report | None = None,
    **options: Any,
) -> int:
    """Run what ``convnext classify`` / ``convnext embed`` runs; returns its exit code.

    ``inputs``: a path, folder, glob or dataset (one ``str``, ``bytes`` or ``Path`` is one
    input), or several; ``output``: the file (``-o``; None: stdout); ``fmt``: ``--format``
    (None: from the output's extension); ``resume``: ``--resume``; ``engine``: ``"local"``
    or ``"ray"``.  Any other :class:`Job` field is a keyword: ``top_k=3``, ``device="cpu"``,
    ``recursive=True``, ``shard="0/4"``, ``quiet=True`` ...  Every argument is checked as
    the CLI's flags are; errors raise the project's exceptions (:mod:`convnext_cli.errors`).
    """
    unknown = sorted(set(options) - {f.name for f in fields(Job)})
    if unknown:
        raise UsageError(f"run(): no option {', '.join(unknown)} (the options are Job's fields)")
    if report is not None and not isinstance(report, Report):
        raise UsageError(f"report: a {type(report).__name__} is not a Report")
    job = Job(
        command=command,
        inputs=as_paths(inputs, "inputs"),
        model=as_path(model, "model"),
        fmt=fmt,
        output=None if output is None else Path(as_path(output, "output")),
        resume=resume,
        engine=engine,
        **options,
    )
    return run_job(job, report)
