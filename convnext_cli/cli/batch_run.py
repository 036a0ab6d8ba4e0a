"""What classify and embed share: expand inputs, protect the user's files, load the model,
stream batches to a writer and finish it (also on Ctrl-C / SIGTERM)."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cli import interrupts
from convnext_cli.cli.errors import say
from convnext_cli.errors import EXIT_INPUT_FAILED, EXIT_OK, OutputError, UsageError
from convnext_cli.inputs import InputRef, InputStream, SupportsTotal, input_id, iter_inputs
from convnext_cli.names import path_field
from convnext_cli.output import choose_format, open_writer, output_targets
from convnext_cli.output_file import is_stdout
from convnext_cli.resume import RESUMABLE_FORMATS

if TYPE_CHECKING:
    import torch

    from convnext_cli.output import Writer
    from convnext_cli.pipeline import Result, Runner


def gather_inputs(
    inputs: list[str],
    recursive: bool,
    null_separated: bool = False,
    image_column: str | None = None,
    id_column: str | None = None,
) -> Iterator[InputRef]:
    """Expand INPUTS (stdin only when '-' is given) as a stream; warnings go to stderr.

    The first input is listed here, so that "no input images found" (and a brace pattern
    naming too many files) is a usage error before anything is opened or loaded; the rest
    are listed as the run takes them.
    """
    if not inputs:
        raise UsageError("no inputs given (files, folders, globs, or '-' for stdin)")
    listing = iter_inputs(
        inputs,
        recursive=recursive,
        warn=lambda msg: say(f"warning: {msg}"),
        null_separated=null_separated,
        image_column=image_column,
        id_column=id_column,
    )
    first = next(listing)  # NoInputsError when there is none
    return itertools.chain([first], listing)


def checkpoint_files(model: str) -> list[str]:
    """The local files a model option names: the file itself, or the files in the folder."""
    path = Path(model).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        found: list[str] = []
        for root, _dirs, files in os.walk(path):
            found.extend(os.path.join(root, f) for f in files)
            if len(found) > 10_000:
                break
        return found
    return []


def _identity(path: str | Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _existing_targets(targets: list[Path]) -> dict[tuple[int, int], Path]:
    existing = {}
    for target in targets:
        identity = _identity(target)
        if identity is not None:
            existing[identity] = target
    return existing


def _refused(target: Path, kind: str, path: str) -> OutputError:
    return OutputError(f"{target}: refusing to write the output over {kind} ({path})")


def refuse_overwriting(targets: list[Path], inputs: Iterable[str], model: str) -> None:
    """An output that is (symlinks and hard links included) an input or a checkpoint file is
    refused before anything is opened for writing.

    `inputs` are the files known before the run: all of them (``--engine ray``), or the files
    named on the command line (the local engine, whose listing is streamed: the inputs found
    in folders, globs and stdin are checked as they are listed, by :func:`watch_overwriting`).
    """
    existing = _existing_targets(targets)
    if not existing:
        return
    for kind, paths in (("an input", inputs), ("a checkpoint file", checkpoint_files(model))):
        for path in paths:
            identity = _identity(path)
            if identity in existing:
                raise _refused(existing[identity], kind, path)


def watch_overwriting(items: Iterable[InputRef], targets: list[Path]) -> Iterator[InputRef]:
    """The inputs, each checked as it is listed: one that is an output target (through a
    symlink or a hard link too) raises the same OutputError as :func:`refuse_overwriting`,
    mid-run; the writer is then aborted and the target left untouched.  Only when a target
    exists already (otherwise no input can be it): then one ``stat`` per input file, once
    per dataset file."""
    existing = _existing_targets(targets)
    if not existing:
        yield from items
        return
    last = None
    for item in items:
        path = item if isinstance(item, str) else str(item.file or item.id)
        if path != last:
            identity = _identity(path)
            if identity in existing:
                raise _refused(existing[identity], "an input", path)
            last = path
        yield item


def load_runner(
    model: str,
    device: str,
    dtype: str,
    compile_model: bool = False,
    channels_last: bool = True,
    decode: str = "auto",
) -> Runner:
    """Resolve device, dtype and decoder, load the checkpoint, build the runner on the device."""
    from convnext_cli.checkpoints import build_model, load_checkpoint
    from convnext_cli.device import resolve
    from convnext_cli.pipeline import Runner

    placement = resolve(device, dtype)
    jpeg_on_device = resolve_decode_choice(decode, placement.device)
    checkpoint = load_checkpoint(model)
    if placement.reason:
        say(f"note: --dtype auto chose {placement.dtype_name}: {placement.reason}")
    net = build_model(checkpoint, placement.device, placement.dtype, channels_last=channels_last)
    runner = Runner(
        net, checkpoint.preprocess, placement.device, placement.dtype, channels_last, jpeg_on_device
    )
    if compile_model:
        say("note: compiling the model; the first batch includes the compile time")
        runner.compile()
    return runner


def resolve_decode_choice(decode: str, device: torch.device) -> bool:
    """``--decode``: whether JPEGs are decoded on the device; said on stderr when auto chose it."""
    from convnext_cli.jpeg_on_device import resolve_decode

    on_device = resolve_decode(decode, device)
    if on_device and decode.lower() == "auto":
        say(f"note: decoding JPEGs on {device} (nvjpeg); --decode cpu for Pillow's exact pixels")
    return on_device


def write_results(
    writer: Writer,
    batches: Callable[[], Iterator[list[Result]]],
    total: int | SupportsTotal,
    output: Path | None,
) -> int:
    """Run ``batches`` (which loads the model) into an open writer and end its life cycle.

    Finished: the writer closes (the output is moved into place).  Ctrl-C or SIGTERM: the
    records written so far are closed into a valid file and moved into place (an output
    file with no record yet is dropped, its target untouched), then the interrupt goes on.  Any
    other error: the writer aborts, the target is untouched.
    """
    try:
        with interrupts.cleanup_on_leave(writer.abort):
            produced = batches()  # loads the model: a signal here drops the output and leaves
        with interrupts.raising():
            code = stream_results(
                produced,
                writer,
                total,
                to_terminal=is_stdout(output) and sys.stdout.isatty(),
            )
    except KeyboardInterrupt:
        with interrupts.finishing():
            if writer.records or is_stdout(output):  # stdout: close the JSON array anyway
                writer.close()
            else:
                writer.abort()
        raise
    except BaseException:
        writer.abort()
        raise
    try:
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return code


def stream_results(
    batches: Iterator[list[Result]],
    writer: Writer,
    total: int | SupportsTotal,
    to_terminal: bool = False,
) -> int:
    """Write every batch as it finishes, with a progress bar when stderr is a terminal.

    The bar lives on stderr and never captures stdout.  When the results go to a terminal
    too (``to_terminal``), the bar is taken down while a batch is printed, so results and
    bar never share a line.  Returns the exit code: 0 when every input succeeded, 1 when any
    failed.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    failures = 0
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        redirect_stdout=False,
        disable=not console.is_terminal,
    )
    pause = to_terminal and console.is_terminal
    with progress:
        task = progress.add_task("images", total=_known(total))
        for results in batches:
            if pause:
                progress.stop()
            with interrupts.deferred():
                writer.write(results)
            for result in results:
                if result.error is not None:
                    failures += 1
                    if writer.names_errors_on_stderr:
                        say(f"error: {result.path}: {result.error}")
            progress.update(task, advance=len(results), total=_known(total))
            if pause:
                progress.start()
    if failures:
        say(f"{failures} of {_known(total)} inputs failed")
    return EXIT_INPUT_FAILED if failures else EXIT_OK


def _known(total: int | SupportsTotal) -> int | None:
    """A total, or what a stream of inputs knows of its total so far (None until it ends)."""
    return total if isinstance(total, int) else total.total


# ------------------------------------------------------------------------ one job, end to end


@dataclass
class Job:
    """Everything classify or embed was asked to do (the options the two commands share)."""

    command: str  # "classify" or "embed"
    inputs: list[str]
    model: str
    fmt: str | None
    output: Path | None
    top_k: int = 5
    normalize: bool = False
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

    @classmethod
    def from_options(cls, command: str, options: dict[str, Any]) -> Job:
        """A job from a command's parameters (its ``locals()``), named as the fields are."""
        names = {f.name for f in fields(cls)} - {"command"}
        return cls(command=command, **{k: v for k, v in options.items() if k in names})


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) with 0 <= I < N."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise UsageError(f"--shard {text!r}: use I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
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


def _input_files(items: Iterable[InputRef]) -> list[str]:
    """The files the inputs read (each dataset file once), for the overwrite check."""
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item if isinstance(item, str) else str(item.file or item.id), None)
    return list(seen)


def _named_files(inputs: list[str]) -> list[str]:
    """The inputs named on the command line that are files (checked before anything runs)."""
    named = []
    for given in inputs:
        path = os.path.expanduser(given) if given.startswith("~") else given
        if given != "-" and os.path.isfile(path):
            named.append(path)
    return named


def run_job(job: Job) -> int:
    """Inputs -> (resume) -> model -> writer; returns the exit code."""
    if job.command not in ("classify", "embed"):
        raise UsageError(f"unknown command {job.command!r}")
    if job.engine not in ("local", "ray"):
        raise UsageError(f"--engine {job.engine!r}: use local or ray")
    fmt = choose_format(job.command, job.fmt, job.output, sys.stdout.isatty())
    if job.resume and (is_stdout(job.output) or fmt not in RESUMABLE_FORMATS):
        raise UsageError(f"--resume needs -o FILE in {', '.join(RESUMABLE_FORMATS)}")
    listing = gather_inputs(job.inputs, job.recursive, job.null, job.image_column, job.id_column)
    items = take_shard(listing, job.shard)
    targets = output_targets(fmt, job.output)
    if job.engine == "ray":
        items = list(items)  # Ray Data takes the whole list
        refuse_overwriting(targets, _input_files(items), job.model)
        return _run_on_ray(job, fmt, items)
    # the local engine streams: the first batch runs while the listing goes on
    refuse_overwriting(targets, _named_files(job.inputs), job.model)
    items = watch_overwriting(items, targets)
    if not job.resume and fmt != "parquet":
        stream = InputStream(items)
        writer = open_writer(job.command, fmt, job.output, job.top_k)  # fails before loading
        created: list[Path] = []

        def batches() -> Iterator[list[Result]]:
            runner = _load(job)
            if fmt in RESUMABLE_FORMATS and job.output is not None and not is_stdout(job.output):
                from convnext_cli.resume import provenance_path, write_provenance

                target = Path(os.path.realpath(job.output))
                if not provenance_path(target).exists():
                    created.append(provenance_path(target))
                provenance = make_provenance(job, runner.model.config, runner.spec)
                write_provenance(target, provenance)
            return _local_batches(job, runner, stream)

        try:
            return write_results(writer, batches, stream, job.output)
        except Exception:  # the output was dropped (a refusal mid-run, say): so is its record
            for path in created:
                path.unlink(missing_ok=True)
            raise
    runner = _load(job)
    provenance = make_provenance(job, runner.model.config, runner.spec)
    todo, writer = _open_resumable(job, fmt, items, provenance)
    total = len(todo) if isinstance(todo, list) else todo
    return write_results(
        writer, lambda: _local_batches(job, runner, todo), total=total, output=job.output
    )


def _load(job: Job) -> Runner:
    return load_runner(job.model, job.device, job.dtype, job.compile_model, decode=job.decode)


def _local_batches(job: Job, runner: Runner, items: Iterable[InputRef]) -> Iterator[list[Result]]:
    if job.command == "classify":
        return runner.classify(
            items, top_k=job.top_k, batch_size=job.batch_size, workers=job.workers
        )
    return runner.embed(
        items, normalize=job.normalize, batch_size=job.batch_size, workers=job.workers
    )


def make_provenance(job: Job, config: Any, spec: Any) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the file."""
    import hashlib
    import json

    from convnext_cli import __version__

    model = job.model
    if Path(model).expanduser().exists():
        model = os.path.realpath(Path(model).expanduser())
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    labels = len(config.labels) if job.command == "classify" else None
    return {
        "tool": f"convnext-cli {__version__}",
        "command": job.command,
        "model": model,
        "config": hashlib.sha256(config_json.encode()).hexdigest()[:16],
        "top_k": min(job.top_k, labels) if labels else None,
        "normalize": job.normalize if job.command == "embed" else None,
        "preprocess": spec.to_dict(),
    }


def _open_resumable(
    job: Job, fmt: str, items: Iterable[InputRef], provenance: dict[str, Any]
) -> tuple[list[InputRef] | InputStream, Writer]:
    """With --resume: skip what FILE already holds and open the writer that keeps it.

    A list of inputs (``--engine ray``) gives the list still to do; a stream gives an
    :class:`InputStream` of them, filtered as they are listed (one set lookup each).
    """
    from convnext_cli import parquet_output, resume

    assert job.output is not None
    target = Path(os.path.realpath(job.output))
    if not job.resume:
        writer = open_writer(job.command, fmt, job.output, job.top_k, provenance)
        return (items if isinstance(items, list) else InputStream(items)), writer
    if fmt == "parquet":
        earlier = parquet_output.written_by(target)
        resume.check_provenance(earlier, provenance, job.output, job.force_resume)
        recorded = resume.read_parquet_ids(parquet_output.earlier_sources(target), job.retry_errors)
    else:
        resume.check_provenance(
            resume.read_provenance(target), provenance, job.output, job.force_resume
        )
        resume.refuse_if_locked(target, job.output)
        recorded = resume.keep_text_records(
            resume.text_sources(target),
            resume.copy_path(target),
            fmt,
            job.retry_errors,
            provenance["top_k"],
        )
    done = recorded.ids
    todo: list[InputRef] | InputStream
    if isinstance(items, list):
        todo = [item for item in items if input_id(item) not in done]
        _say_resuming(job.output, len(items) - len(todo), len(todo), recorded)
    else:
        todo = InputStream(item for item in items if input_id(item) not in done)
        _say_resuming(job.output, len(done), None, recorded)
    writer = open_writer(
        job.command, fmt, job.output, job.top_k, provenance, True, job.retry_errors
    )
    if fmt == "parquet":
        return todo, writer  # its parts stay on disk whatever ends the run
    _keep_records(writer, target, recorded)
    resume.write_provenance(target, provenance)
    return todo, _KeepingWriter(writer)


class _KeepingWriter:
    """A resumed run's writer: aborted (an error, a refusal mid-run), it keeps its partial
    file, which holds the records of the earlier runs as well as its own, for the next
    ``--resume``; the target is untouched either way."""

    def __init__(self, writer: Writer) -> None:
        self._writer = writer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def write(self, results: list[Result]) -> None:
        self._writer.write(results)

    def close(self) -> None:
        self._writer.close()

    def abort(self, keep: bool = False) -> None:
        self._writer.abort(keep=True)


def _keep_records(writer: Writer, target: Path, recorded: Any) -> None:
    """Write the kept records into the new output from the copy :func:`resume.keep_text_records`
    made of them (kill-safe: the copy goes only once they are all in the new output), a few
    MiB at a time."""
    from convnext_cli import resume

    copy = resume.copy_path(target)
    try:
        if recorded.kept:
            for records in resume.kept_records(copy, recorded):
                writer.preserve(records, recorded.header)  # type: ignore[attr-defined]
    except BaseException:
        writer.abort(keep=True)
        raise
    copy.unlink(missing_ok=True)


def _say_resuming(output: Path, done: int, todo: int | None, recorded: Any) -> None:
    extra = []
    if recorded.errors_dropped:
        extra.append(f"{recorded.errors_dropped} failed ones to retry")
    if recorded.torn:
        extra.append(f"{recorded.torn} cut-off record(s) to redo")
    more = f" ({', '.join(extra)})" if extra else ""
    rest = "" if todo is None else f", {todo} to do"
    say(f"resuming {output}: {done} inputs already done{rest}{more}")


def _run_on_ray(job: Job, fmt: str, items: list[InputRef]) -> int:
    from convnext_cli import ray_engine
    from convnext_cli.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(job.model)
    provenance = make_provenance(job, checkpoint.config, checkpoint.preprocess)
    options = ray_engine.RayOptions(
        task=job.command,
        model=job.model,
        device=job.device,
        dtype=job.dtype,
        top_k=job.top_k,
        normalize=job.normalize,
        batch_size=job.batch_size,
        replicas=job.replicas,
        address=job.ray_address,
        compile_model=job.compile_model,
        verbose=job.verbose,
        metadata=provenance,
    )
    if fmt == "parquet" and job.output is not None and _is_folder_target(job.output):
        return _ray_into_folder(job, items, options, Path(job.output))
    if job.output is None:
        todo, writer = list(items), open_writer(job.command, fmt, None, job.top_k)
    else:
        pending, writer = _open_resumable(job, fmt, list(items), provenance)
        todo = pending if isinstance(pending, list) else list(pending)
    return write_results(
        writer, lambda: ray_engine.run_on_ray(todo, options), len(todo), job.output
    )


def _ray_into_folder(job: Job, paths: list[InputRef], options: Any, folder: Path) -> int:
    """``-o DIR --format parquet`` on Ray: the actors write part files into DIR."""
    from convnext_cli import ray_engine

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write output ({exc.strerror})") from exc
    done: set[str] = set()
    if job.resume:
        done = ray_engine.done_paths(folder, include_errors=not job.retry_errors)
    todo = [p for p in paths if path_field(input_id(p)) not in done]
    if job.resume:
        say(f"resuming {folder}: {len(paths) - len(todo)} inputs already done, {len(todo)} to do")
    return write_results(
        FolderProgress(),
        lambda: ray_engine.write_parts_on_ray(todo, options, folder),
        total=len(todo),
        output=None,
    )


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
