"""The warm call's short way: ``convnext classify photo.jpg -m M`` with ``convnext serve``
running, without importing Typer, rich or pydantic (about half of a warm call's start).

:func:`parse` takes only the plainest command lines -- ``classify`` or ``embed``, file
paths, and ``-m/--model``, ``-o/--output``, ``-q/--quiet``, ``--no-progress`` and, for
classify, ``-k/--top-k`` (each value its own argument) -- and only when a server can be
used (a usable socket, no ``CONVNEXT_SERVER=0``).  Anything else (another option, ``-``,
``--``, ``--opt=value``, a value that looks like an option, a bad ``-k``) is left to the
Typer application, which parses and says it as always.

What it runs is what the Typer command runs: the same
:meth:`~convnext_cli.engine.job.Job.from_options` (every other option at its default, the
defaults the commands declare), :func:`~convnext_cli.serve.client.use_server`,
:func:`~convnext_cli.cli.jobs.run_job` and the same errors' lines and exit codes
(:func:`~convnext_cli.cli.errors.exit_code_for`): the records, the summary, ``-o``'s
replacement note and the exit code are those of the full command line.  If the server
cannot serve the model after all, the job loads it in this process, as the full one would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COMMANDS = ("classify", "embed")
VALUES = {"-m": "model", "--model": "model", "-o": "output", "--output": "output"}
FLAGS = {"-q": "quiet", "--quiet": "quiet", "--no-progress": "no_progress"}
TOP_K = ("-k", "--top-k")


def _value(name: str, text: str) -> Any:
    """An option's value as the Typer command receives it; None: leave it to Typer."""
    if not text or text.startswith("-"):
        return None
    if name == "output":
        return Path(text)
    if name == "top_k":
        from convnext_cli.errors import UsageError
        from convnext_cli.limits import parse_top_k

        try:
            return parse_top_k(text)
        except UsageError:
            return None  # Typer says it, as a usage error of -k
    return text


def parse(argv: list[str]) -> tuple[str, dict[str, Any]] | None:
    """(command, the options given) for a command line of the short way, or None."""
    if len(argv) < 2 or argv[0] not in COMMANDS:
        return None
    command, options, inputs = argv[0], {}, []
    values = {**VALUES, **dict.fromkeys(TOP_K, "top_k")} if command == "classify" else VALUES
    args = iter(argv[1:])
    for arg in args:
        if arg in FLAGS:
            options[FLAGS[arg]] = True
        elif arg in values:
            name = values[arg]
            value = _value(name, next(args, ""))
            if value is None:
                return None
            options[name] = value
        elif arg.startswith("-") or not arg:
            return None
        else:
            inputs.append(arg)
    if not inputs:
        return None
    return command, {**options, "inputs": inputs}


def job_options(command: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options a Typer command passes to ``Job.from_options``: ``given``, and the
    defaults of everything else (see tests/serve/test_serve_quick.py, which holds them to
    the commands' declared defaults)."""
    from convnext_cli.choices import DEFAULT_MODEL

    options: dict[str, Any] = {"model": DEFAULT_MODEL, "fmt": "auto", "output": None}
    return {**options, **given}


def usable() -> bool:
    """Whether a server may be used and seems to run (its socket is there and this user's)."""
    from convnext_cli.errors import UsageError
    from convnext_cli.serve.client import server_enabled
    from convnext_cli.serve.paths import usable_socket

    try:
        enabled = server_enabled()
    except UsageError:  # a malformed CONVNEXT_SERVER: the full command line says so
        return False
    return enabled and usable_socket() is not None


def run(argv: list[str]) -> int | None:
    """The exit code of ``convnext ARGV`` run the short way, or None: not one for it."""
    parsed = parse(argv)
    if parsed is None or not usable():
        return None
    from convnext_cli.cli.errors import exit_code_for
    from convnext_cli.engine import _interrupts as interrupts

    try:
        with interrupts.running():
            return _run(*parsed)
    except BaseException as exc:
        code = exit_code_for(exc)
        if code is None:
            raise
        return code


def _run(command: str, given: dict[str, Any]) -> int:
    from convnext_cli.cli.jobs import Job, run_job
    from convnext_cli.serve.client import use_server

    job = Job.from_options(command, job_options(command, given))
    use_server(job)  # the server, or (it cannot serve the model after all) this process
    return run_job(job)
