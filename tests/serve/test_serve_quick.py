"""The warm call's short way (convnext_cli/cli/quick.py): plain classify/embed command lines
with a server running skip Typer, rich and pydantic, and do exactly what the full command
line does -- the same job, records, error lines and exit codes."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import Server, convnext, runtime_env, start

from convnext_cli.cli import quick
from convnext_cli.cli.classify import classify
from convnext_cli.cli.embed import embed
from convnext_cli.engine.job import Job

SERVED = b"(convnext serve, pid "
LIGHT = ("typer", "rich", "pydantic", "click", "torch", "PIL", "numpy")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, v1_checkpoint: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("quick")
    env = runtime_env(tmp / "run")
    server = start(tmp, env, "--idle-timeout", "600", "-m", str(v1_checkpoint), models=1)
    yield server
    server.stop()


@pytest.mark.parametrize(
    "argv",
    [
        ["classify"],  # no input: Typer says so
        ["classify", "-"],  # paths on stdin
        ["classify", "a.jpg", "--format", "csv"],
        ["classify", "a.jpg", "--model=m"],
        ["classify", "a.jpg", "-m"],  # a value missing
        ["classify", "a.jpg", "-m", "-q"],  # a value that looks like an option
        ["classify", "a.jpg", "-k", "three"],  # a bad -k: Typer's usage error
        ["classify", "a.jpg", "-qr"],
        ["classify", "--", "a.jpg"],
        ["embed", "a.jpg", "-k", "3"],  # embed has no -k
        ["convert", "a.pth", "out"],
        ["--help"],
    ],
)
def test_only_plain_command_lines_take_the_short_way(argv: list[str]) -> None:
    assert quick.parse(argv) is None


def test_a_plain_command_line_is_parsed_as_typer_would() -> None:
    argv = ["classify", "a.jpg", "-k", "all", "b/", "-q", "--model", "m", "-o", "x.csv"]
    assert quick.parse(argv) == (
        "classify",
        {
            "top_k": 0,
            "quiet": True,
            "model": "m",
            "output": Path("x.csv"),
            "inputs": ["a.jpg", "b/"],
        },
    )
    assert quick.parse(["embed", "a.jpg", "--no-progress"]) == (
        "embed",
        {"no_progress": True, "inputs": ["a.jpg"]},
    )


@pytest.mark.parametrize("command", [classify, embed])
def test_the_short_way_builds_the_commands_own_job(command) -> None:
    """The job from the command's declared defaults (what Typer passes) is the short way's."""
    name = command.__name__
    given = {"inputs": ["a.jpg"], "model": "m", "quiet": True, "output": Path("o.jsonl")}
    declared = {
        p.name: p.default
        for p in inspect.signature(command).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    typer_job = Job.from_options(name, {**declared, **given})
    assert Job.from_options(name, quick.job_options(name, given)) == typer_job
    assert typer_job.top_k == 5 and typer_job.fmt == "auto"  # the comparison is not empty


def traced(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """``python -X importtime -m convnext_cli ARGS``: every import is said on stderr."""
    command = [sys.executable, "-X", "importtime", "-m", "convnext_cli", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, timeout=300)


def imported(stderr: bytes) -> set[str]:
    """The top-level packages ``python -X importtime`` saw imported."""
    names = set()
    for line in stderr.decode(errors="replace").splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_a_warm_call_imports_no_typer_rich_or_torch(served, tmp_path, photos, v1_checkpoint):
    quick_run = traced("classify", *photos, "-m",
                         v1_checkpoint, "-o", tmp_path / "quick.jsonl", env=served.env)  # fmt: skip
    assert quick_run.returncode == 0, quick_run.stderr.decode()
    assert SERVED in quick_run.stderr
    assert "convnext_cli" in imported(quick_run.stderr)  # the check sees the imports
    assert imported(quick_run.stderr).isdisjoint(LIGHT)
    # an option the short way leaves to Typer: served all the same, the same records
    full = traced("classify", *photos, "-m",
                    v1_checkpoint, "-o", tmp_path / "full.jsonl", "--format", "jsonl",
                    env=served.env)  # fmt: skip
    assert full.returncode == 0 and SERVED in full.stderr, full.stderr.decode()
    assert "typer" in imported(full.stderr)
    assert (tmp_path / "quick.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()


@pytest.mark.parametrize(
    "case",
    ["missing input", "no input found", "output over an input", "output in no folder"],
)
def test_errors_and_exit_codes_are_the_full_command_lines(
    served, tmp_path, photos, v1_checkpoint, case
):
    inputs, output = [photos[0]], tmp_path / "o.jsonl"
    if case == "missing input":
        inputs = [photos[0], tmp_path / "nosuch.jpg"]
    elif case == "no input found":
        (tmp_path / "empty").mkdir()
        inputs = [tmp_path / "empty"]
    elif case == "output over an input":
        output = photos[0]
    else:
        output = tmp_path / "no" / "such" / "o.jsonl"
    base = ["classify", *inputs, "-m", v1_checkpoint, "-q", "-o", output]
    short = convnext(*base, env=served.env)
    full = convnext(*base, "--format", "auto", env=served.env)  # through Typer
    assert short.returncode == full.returncode != 0, (short.stderr, full.stderr)
    assert short.stderr == full.stderr  # -q: the error lines only, no timings
    assert short.stderr.strip() and short.stdout == full.stdout


def test_no_server_running_takes_the_full_way(tmp_path, photos, v1_checkpoint):
    env = runtime_env(tmp_path / "run")  # no server listens here
    done = traced("classify", photos[0], "-m",
                    v1_checkpoint, "-q", env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert SERVED not in done.stderr
    assert {"typer", "torch"} <= imported(done.stderr)
