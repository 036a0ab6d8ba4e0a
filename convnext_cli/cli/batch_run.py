"""What classify and embed share: expand inputs, load the model, stream batches to a writer."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from convnext_cli.cli.errors import say
from convnext_cli.errors import EXIT_INPUT_FAILED, EXIT_OK, UsageError
from convnext_cli.inputs import expand_inputs

if TYPE_CHECKING:
    import torch

    from convnext_cli.output import Writer
    from convnext_cli.pipeline import Result, Runner


def gather_inputs(inputs: list[str], recursive: bool) -> list[str]:
    """Expand INPUTS (stdin only when '-' is given); warnings go to stderr."""
    if not inputs:
        raise UsageError("no inputs given (files, folders, globs, or '-' for stdin)")
    return expand_inputs(inputs, recursive=recursive, warn=lambda msg: say(f"warning: {msg}"))


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


class CurrentStdout:
    """Writes to whatever ``sys.stdout`` is at the time, so that results printed while the
    progress bar is live go through rich's redirect and land above the bar."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return sys.stdout.isatty()


@contextlib.contextmanager
def open_output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield CurrentStdout()  # type: ignore[misc]
        return
    try:
        stream = open(path, "w", encoding="utf-8", newline="")
    except OSError as exc:
        raise UsageError(f"{path}: cannot write output ({exc.strerror})") from exc
    with stream:
        yield stream


def stream_results(
    batches: Iterator[list[Result]], writer: Writer, total: int, report_errors: bool = False
) -> int:
    """Write every batch as it finishes, with a progress bar when stderr is a terminal.

    Returns the exit code: 0 when every input succeeded, 1 when any failed.
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
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task("images", total=total)
        for results in batches:
            writer.write(results)
            for result in results:
                if result.error is not None:
                    failures += 1
                    if report_errors:
                        progress.console.print(
                            f"error: {result.path}: {result.error}", markup=False
                        )
            progress.advance(task, len(results))
    writer.close()
    if failures:
        say(f"{failures} of {total} inputs failed")
    return EXIT_INPUT_FAILED if failures else EXIT_OK
