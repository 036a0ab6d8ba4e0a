"""What a run says on stderr while it goes and when it ends: notes, a progress bar, a summary.

- **Quiet is one setting for the whole process**, :data:`SETTINGS`, set by :func:`configure`
  (``run_job`` does it from the Job's ``quiet`` and ``progress``; ``benchmark`` from its
  ``-q``).  :func:`note` is how informational lines are printed (``note: --dtype auto chose
  ...``, ``resuming ...``): nothing under ``-q``.  Warnings and errors go through
  :func:`~convnext_cli.cli.errors.say` and always print.
- **The bar** (stderr a terminal, not ``--no-progress``, not ``-q``) says what it knows and
  labels it: ``120/202 images  16.2 img/s  elapsed 0:07  ETA 0:05  2 failed``.  The number
  of inputs may not be known yet (listing still going): ``total`` is an int, None, or an
  object whose ``.total`` is None until it is; it is looked at after every batch, and until
  it is known the bar shows the count and the rate but no ETA.  The rate is rich's
  estimate over the last 30 s; the ETA divides what is left by it.
- **The summary**, on stderr when the run ends (any stderr, not under ``-q``): how many
  inputs succeeded out of how many, the whole wall time of the process, the model, where
  it ran and the file ``-o`` wrote; then the failures by kind (every kind, up to five)::

      classified 197 of 200 images in 14.1 s with facebook/convnext-tiny-224 on cpu
      float32, written to labels.jsonl
        3 failed: 2 no such file, 1 cannot decode image
        1.8 s start-up and model load, 12.3 s for the images (16.0 img/s)
        Speed: 4.1 ms decode, 40.2 ms model per image

  (the first two are one line, wrapped at spaces on a terminal as every line said on stderr
  is: :func:`~convnext_cli.outputs.names.say`).  ``Speed`` comes from the runner's own
  clocks (:class:`~convnext_cli.engine.pipeline.RunTimes`, handed over by :class:`Batches`);
  decode time is what the decoding processes spent, summed over them; no rate and no
  ``Speed`` when no image succeeded.  Under ``-q`` a run with failures still ends with ``3 of
  200 inputs failed``.
- **Ctrl-C** mid-run (:func:`interrupted_note`): how many records were kept, where, and
  that ``--resume`` continues.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from convnext_cli.cli.errors import say
from convnext_cli.engine.batches import Batches

if TYPE_CHECKING:
    from rich.progress import Task
    from rich.text import Text

    from convnext_cli.results import Result


@dataclass
class Settings:
    quiet: bool = False  # -q: no notes, no bar, no summary
    bar: bool = True  # --no-progress: False


SETTINGS = Settings()


def configure(quiet: bool = False, bar: bool = True) -> None:
    """Set what this process says on stderr (see the module's docstring)."""
    SETTINGS.quiet = quiet
    SETTINGS.bar = bar


def note(message: str) -> None:
    """An informational line on stderr; nothing under ``-q``: the job engine's
    :meth:`~convnext_cli.engine.job.Report.note`, quiet as this process is."""
    from convnext_cli.engine.job import Report

    Report(quiet=SETTINGS.quiet).note(message)


class HasTotal(Protocol):
    """Something that learns the number of inputs while they are listed."""

    @property
    def total(self) -> int | None: ...


TotalLike = int | None | HasTotal


def current_total(total: TotalLike) -> int | None:
    if total is None or isinstance(total, int):
        return total
    return total.total


_IMPORTED = time.monotonic()


def process_seconds() -> float:
    """Seconds since this process started (from /proc where there is one: the interpreter's
    own start-up counts too; else since this module was imported)."""
    try:
        with open("/proc/self/stat") as stat_file:
            started_ticks = int(stat_file.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime_file:
            uptime = float(uptime_file.read().split()[0])
        age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
        if age >= 0:
            return max(age, time.monotonic() - _IMPORTED)
    except (OSError, ValueError, IndexError):
        pass
    return time.monotonic() - _IMPORTED


def failure_kind(error: str) -> str:
    """``cannot decode image: the file ends too early (...)`` -> ``cannot decode image``."""
    kind = error.split(":", 1)[0].strip()
    return kind if len(kind) <= 40 else kind[:39] + "…"


def clock(seconds: float) -> str:
    """``0:07``, ``12:03``, ``1:02:03``."""
    seconds = max(0, int(seconds + 0.5))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def rate_text(rate: float | None) -> str:
    if rate is None or rate <= 0:
        return "- img/s"
    return f"{rate:.1f} img/s" if rate < 100 else f"{rate:.0f} img/s"


def _stats(task: Task) -> Text:
    """``120/202  16.2 img/s  elapsed 0:07  ETA 0:05  2 failed`` (the parts known so far)."""
    from rich.text import Text

    done = int(task.completed)
    total = None if task.total is None else int(task.total)
    text = Text(f"{done}/{total}" if total is not None else f"{done}", style="progress.download")
    text.append(" images" if total is None else "")
    speed = task.speed
    text.append(f"  {rate_text(speed)}", style="progress.data.speed")
    text.append(f"  elapsed {clock(task.elapsed or 0.0)}", style="progress.elapsed")
    if total is not None and speed:
        text.append(f"  ETA {clock(max(0, total - done) / speed)}", style="progress.remaining")
    failed = task.fields.get("failed", 0)
    if failed:
        text.append(f"  {failed} failed", style="bold red")
    return text


PIPE_HOLD = 0.3  # seconds the bar stays blank after records went into a pipe


def _stdout_is_pipe() -> bool:
    import stat
    import sys

    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def no_terminal() -> bool:
    """Whether rich would surely find no terminal on stderr (so draw no bar): stderr is no
    tty and no FORCE_COLOR / TTY_COMPATIBLE / TTY_INTERACTIVE says otherwise."""
    if any(name in os.environ for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")):
        return False
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class HiddenProgress:
    """What :class:`RunProgress` calls of rich's Progress, when no bar is drawn (``-q``,
    ``--no-progress``): nothing, and no import of rich (a warm call's start)."""

    def start(self) -> None:
        pass

    stop = refresh = start

    def update(self, *_args: Any, **_kwargs: Any) -> None:
        pass


class RunProgress:
    """The bar while batches are written, the counts for the summary.

    ``pause_for_stdout``: the results go to the same terminal, so the bar is taken down
    while a batch is printed (results and bar never share a line).
    """

    def __init__(
        self, total: TotalLike, label: str = "images", pause_for_stdout: bool = False
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.kinds: Counter[str] = Counter()  # failures by kind (failure_kind)
        self.started = time.monotonic()
        self.hold_until = 0.0
        if SETTINGS.quiet or not SETTINGS.bar or no_terminal():  # no bar: no rich import
            self.shown = self.pause = self.piped = False
            self.progress: Any = HiddenProgress()
            self.task = 0
            return
        self.progress = self._bar(label)
        self.task = self.progress.add_task(label, total=current_total(total), failed=0)
        self.pause = pause_for_stdout and self.shown
        # stdout a pipe (`| head`, `| jq .`): what reads it may print on this terminal; the
        # bar's line is left blank while a batch is written and a moment after, so that
        # those lines land on a blank line, not after a frozen bar
        self.piped = self.shown and not self.pause and _stdout_is_pipe()

    def _bar(self, label: str) -> Any:
        """rich's Progress on stderr (drawn when stderr is a terminal: :attr:`shown`)."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
        from rich.table import Column

        class StatsColumn(ProgressColumn):
            def render(self, task: Task) -> Text:
                return _stats(task)

        owner = self

        class HoldingProgress(Progress):
            """Draws nothing (a blank line) while :attr:`RunProgress.hold_until` is ahead."""

            def get_renderable(self) -> Any:
                if time.monotonic() < owner.hold_until:
                    from rich.text import Text

                    return Text("")
                return super().get_renderable()

        console = Console(stderr=True)
        self.shown = console.is_terminal
        return HoldingProgress(
            # the bar takes what the words leave; the words never wrap
            TextColumn(
                "[progress.description]{task.description}", table_column=Column(no_wrap=True)
            ),
            BarColumn(bar_width=None, table_column=Column(ratio=1)),
            StatsColumn(table_column=Column(no_wrap=True)),
            console=console,
            transient=True,
            redirect_stdout=False,
            expand=True,
            disable=not self.shown,
        )

    def __enter__(self) -> RunProgress:
        self.started = time.monotonic()
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Take the bar down while results are printed on its terminal."""
        if self.pause:
            self.progress.stop()
        elif self.piped:
            self.hold_until = time.monotonic() + PIPE_HOLD
            self.progress.refresh()  # the line blank before the records go out
        try:
            yield
        finally:
            if self.pause:
                self.progress.start()
            elif self.piped:
                self.hold_until = time.monotonic() + PIPE_HOLD

    def advance(self, count: int, failed: int = 0) -> None:
        self.done += count
        self.failed += failed
        update: dict[str, Any] = {"advance": count, "failed": self.failed}
        total = current_total(self.total)
        if total is not None:
            update["total"] = total
        self.progress.update(self.task, **update)

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def summary(
        self,
        verb: str = "processed",
        where: str | None = None,
        times: Any = None,
        output: str | None = None,
        wall: float | None = None,
        model: str | None = None,
    ) -> str:
        """The closing lines (see the module docstring)."""
        seconds = self.seconds()
        wall = max(seconds, process_seconds() if wall is None else wall)
        succeeded = self.done - self.failed
        noun = "image" if self.done == 1 else "images"
        count = f"{succeeded} of {self.done}" if self.failed else f"{self.done}"
        parts = (f"with {model}" if model else "", f"on {where}" if where else "")
        how = " ".join(part for part in parts if part)
        written = f", written to {output}" if output else ""
        lines = [f"{verb} {count} {noun} in {wall:.1f} s{' ' if how else ''}{how}{written}"]
        if self.failed:
            lines.append(f"  {self.failed} failed: {failure_kinds(self.kinds, self.failed)}")
        rate = rate_text(succeeded / seconds if seconds > 0 and succeeded else None)
        images = f"{seconds:.1f} s for the images" + (f" ({rate})" if succeeded else "")
        lines.append(f"  {wall - seconds:.1f} s start-up and model load, {images}")
        decoded = getattr(times, "images", 0)
        if decoded and succeeded:  # no speed for images that were never decoded
            lines.append(
                f"  Speed: {1000 * times.decode / decoded:.1f} ms decode, "
                f"{1000 * times.model / decoded:.1f} ms model per image"
            )
        return "\n".join(lines)


SHOWN_KINDS = 5  # failure kinds named in the summary; more: the first four and a count


def failure_kinds(kinds: Counter[str], failed: int) -> str:
    """``2 no such file, 1 cannot decode image``: every kind when there are up to
    :data:`SHOWN_KINDS`, else the four commonest and ``3 more of 2 other kinds``."""
    common = kinds.most_common()
    if not common:
        return "no reason recorded"
    if len(common) == 1 and common[0][1] == failed:
        return common[0][0]
    shown = common if len(common) <= SHOWN_KINDS else common[: SHOWN_KINDS - 1]
    text = ", ".join(f"{n} {kind}" for kind, n in shown)
    rest = common[len(shown) :]
    if rest:
        text += f", {sum(n for _kind, n in rest)} more of {len(rest)} other kinds"
    return text


def track(
    batches: Iterable[list[Result]],
    writer: Any,
    total: TotalLike,
    to_terminal: bool = False,
    output: str | None = None,
    model: str | None = None,
    finish: Callable[[], None] | None = None,
) -> int:
    """Write every batch as it finishes (``writer.write``), with the bar, then ``finish``
    (the output closed and moved into place), then the summary (``output``: the file it
    names as written, ``model``: the checkpoint it names).

    Returns the number of failed inputs.  A writer whose format leaves failures out
    (``names_errors_on_stderr``) gets each one named on stderr, quiet or not.
    """
    from convnext_cli.engine import _interrupts as interrupts

    verb = batches.verb if isinstance(batches, Batches) else "processed"
    where = batches.where() if isinstance(batches, Batches) else None
    times = batches.times if isinstance(batches, Batches) else None
    label = {"classified": "classifying", "embedded": "embedding"}.get(verb, "images")
    with RunProgress(total, label, pause_for_stdout=to_terminal) as progress:
        for results in batches:
            with progress.paused(), interrupts.deferred():
                writer.write(results)
            failed = 0
            for result in results:
                if result.error is not None:
                    failed += 1
                    progress.kinds[failure_kind(result.error)] += 1
                    if writer.names_errors_on_stderr:
                        say(f"error: {result.path}: {result.error}")
            progress.advance(len(results), failed)
    if finish is not None:
        finish()
    if not SETTINGS.quiet:
        for line in progress.summary(verb, where, times, output, model=model).splitlines():
            say(line)
    elif progress.failed:
        say(f"{progress.failed} of {progress.done} inputs failed")
    return progress.failed


def interrupted_note(records: int, output: str | None, resumable: bool) -> str | None:
    """What Ctrl-C (or SIGTERM) mid-run leaves: ``kept 12 records in out.jsonl; run the same
    command with --resume to continue``.  None for stdout (nothing to continue into)."""
    if output is None:
        return None
    noun = "record" if records == 1 else "records"
    if not records:
        return f"no record was finished; {output} was not written"
    if resumable:
        how = "run the same command with --resume to continue"
    else:
        how = "--resume continues only jsonl, csv and parquet outputs"
    return f"kept {records} {noun} in {output}; {how}"
