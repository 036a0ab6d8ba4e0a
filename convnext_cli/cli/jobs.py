"""What classify and embed share: a :class:`~convnext_cli.engine.job.Job` from the command's
options, run by the library's job engine (:mod:`convnext_cli.engine.job`) with the CLI's way of
saying it: notes unless ``-q``, the progress bar, the closing summary, the Ctrl-C note."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from convnext_cli.cli.errors import say
from convnext_cli.cli.progress import configure, interrupted_note, track
from convnext_cli.engine.job import Job, Report
from convnext_cli.engine.job import run_job as run_engine_job

if TYPE_CHECKING:
    from convnext_cli.engine.job import Plan
    from convnext_cli.results import Result

__all__ = ["CliReport", "Job", "run_job"]


class CliReport(Report):
    """The engine's report (its notes and warnings), with the CLI's progress bar, closing
    summary and Ctrl-C note (:mod:`convnext_cli.cli.progress`)."""

    def track(self, batches: Iterable[list[Result]], plan: Plan) -> int:
        return track(batches, plan.writer, plan.total, plan.to_terminal, plan.shown, plan.finish)

    def interrupted(self, records: int, output: str | None, resumable: bool) -> None:
        said = interrupted_note(records, output, resumable)
        if said is not None:
            say(said)


def run_job(job: Job) -> int:
    """Inputs -> (resume) -> model -> writer, with the bar and summary; returns the exit code."""
    configure(quiet=job.quiet, bar=job.progress)
    return run_engine_job(job, CliReport(quiet=job.quiet))
