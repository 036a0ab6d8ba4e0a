"""What classify and embed share: a :class:`~convnext_cli.engine.job.Job` from the command's
options, run by the library's job engine (:mod:`convnext_cli.engine.job`) with the CLI's way of
saying it: notes unless ``-q``, the progress bar, the closing summary, the Ctrl-C note."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from convnext_cli.cli.errors import say
from convnext_cli.cli.progress import configure, interrupted_note, note, track
from convnext_cli.engine.job import Job, Report
from convnext_cli.engine.job import run_job as run_engine_job

if TYPE_CHECKING:
    from convnext_cli.engine.job import Plan
    from convnext_cli.results import Result

__all__ = ["CliReport", "Job", "run_job"]


class CliReport(Report):
    """The engine's report (its notes and warnings), with the CLI's progress bar, closing
    summary and Ctrl-C note (:mod:`convnext_cli.cli.progress`)."""

    def __init__(self, quiet: bool = False, model: str | None = None) -> None:
        super().__init__(quiet)
        self.model = model  # what the summary names

    def track(self, batches: Iterable[list[Result]], plan: Plan) -> int:
        return track(
            batches,
            plan.writer,
            plan.total,
            plan.to_terminal,
            plan.shown,
            model=self.model,
            finish=plan.finish,
        )

    def interrupted(self, records: int, output: str | None, resumable: bool) -> None:
        said = interrupted_note(records, output, resumable)
        if said is not None:
            say(said)


def _size(nbytes: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000  # type: ignore[assignment]
    return ""


def _replaced_file(job: Job) -> int | None:
    """The size of the file ``-o`` names when a run without --resume will replace it."""
    if job.resume or job.output is None or str(job.output) == "-":
        return None
    try:
        return job.output.stat().st_size if job.output.is_file() else None
    except OSError:
        return None


def run_job(job: Job) -> int:
    """Inputs -> (resume) -> model -> writer, with the bar and summary; returns the exit code.

    An existing ``-o`` file replaced by a run without ``--resume`` is said in one note at the
    end (``note: replaced the earlier labels.jsonl (41.2 kB) ...``), not silently."""
    configure(quiet=job.quiet, bar=job.progress)
    model = job.model + (f"@{job.revision}" if job.revision else "")
    earlier = _replaced_file(job)
    code = run_engine_job(job, CliReport(quiet=job.quiet, model=model))
    if earlier is not None:
        note(
            f"note: replaced the earlier {job.output} ({_size(earlier)}); "
            "--resume adds to a file instead"
        )
    return code
