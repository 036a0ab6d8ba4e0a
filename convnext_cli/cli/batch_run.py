"""What classify and embed share: expand inputs, protect the user's files, load the model,
stream batches to a writer and finish it (also on Ctrl-C / SIGTERM)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cli import interrupts
from convnext_cli.cli.errors import say
from convnext_cli.errors import EXIT_INPUT_FAILED, EXIT_OK, OutputError, UsageError
from convnext_cli.inputs import expand_inputs
from convnext_cli.output_file import is_stdout

if TYPE_CHECKING:
    import torch

    from convnext_cli.output import Writer
    from convnext_cli.pipeline import Result, Runner


def gather_inputs(inputs: list[str], recursive: bool, null_separated: bool = False) -> list[str]:
    """Expand INPUTS (stdin only when '-' is given); warnings go to stderr."""
    if not inputs:
        raise UsageError("no inputs given (files, folders, globs, or '-' for stdin)")
    extra: dict[str, Any] = {"null_separated": True} if null_separated else {}
    return expand_inputs(
        inputs, recursive=recursive, warn=lambda msg: say(f"warning: {msg}"), **extra
    )


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


def refuse_overwriting(targets: list[Path], inputs: list[str], model: str) -> None:
    """An output that is (symlinks and hard links included) an input or a checkpoint file is
    refused before anything is opened for writing."""
    existing = {}
    for target in targets:
        identity = _identity(target)
        if identity is not None:
            existing[identity] = target
    if not existing:
        return
    for kind, paths in (("an input", inputs), ("a checkpoint file", checkpoint_files(model))):
        for path in paths:
            identity = _identity(path)
            if identity in existing:
                raise OutputError(
                    f"{existing[identity]}: refusing to write the output over {kind} ({path})"
                )


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
    total: int,
    output: Path | None,
) -> int:
    """Run ``batches`` (which loads the model) into an open writer and end its life cycle.

    Finished: the writer closes (the output is moved into place).  Ctrl-C or SIGTERM: the
    records written so far are closed into a valid file and moved into place (an output
    file with no record yet is dropped, its target untouched), then the interrupt goes on.  Any
    other error: the writer aborts, the target is untouched.
    """
    try:
        code = stream_results(
            batches(),
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
    total: int,
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
        task = progress.add_task("images", total=total)
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
            progress.advance(task, len(results))
            if pause:
                progress.start()
    if failures:
        say(f"{failures} of {total} inputs failed")
    return EXIT_INPUT_FAILED if failures else EXIT_OK
