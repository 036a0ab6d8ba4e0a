"""Conventions every command follows: choices shown and checked by Typer, readable metavars,
examples in the help, shell completion, options declared once, errors handled at
registration, scores written at full precision."""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convnext_cli.cli import app, jobs
from convnext_cli.cli.options import SHARED_PARAMETERS, parameters_of

# the modules (the package's attributes of these names are the command functions)
classify = importlib.import_module("convnext_cli.cli.classify")
embed = importlib.import_module("convnext_cli.cli.embed")
REPO = Path(__file__).resolve().parents[2]
COMMANDS = ["classify", "embed", "convert", "benchmark", "env", "serve"]
runner = CliRunner()


def invoke(*args: object, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def help_text(command: str) -> str:
    result = invoke(command, "--help", env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    return result.stdout


# ----------------------------------------------------------------------------- choices


def offered(command: str) -> dict[str, tuple[str, ...]]:
    """What each option of ``command`` completes to in the shell (its choices)."""
    import typer

    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    context = click_command.make_context(command, [], resilient_parsing=True)
    found = {p.name: p.shell_complete(context, "") for p in click_command.params}
    return {name: tuple(item.value for item in items) for name, items in found.items() if items}


def test_the_cli_offers_the_core_tables_choices() -> None:
    """Every choice list the CLI offers (completes, shows, accepts) is the tuple the core
    checks against: choices.py is the one table both are built from."""
    from convnext_cli import choices
    from convnext_cli.checkpoints.layouts import LAYOUTS
    from convnext_cli.engine.device import DTYPE_NAMES
    from convnext_cli.engine.pipeline import SCORE_KINDS
    from convnext_cli.imaging.gpu_jpeg import DECODE_CHOICES
    from convnext_cli.outputs.writers import CLASSIFY_FORMATS, EMBED_FORMATS

    devices = ("auto", "cpu", "cuda", "cuda:0", "mps")
    shared = {"device": devices, "dtype": DTYPE_NAMES, "decode": DECODE_CHOICES}
    shared["engine"] = choices.ENGINES
    assert offered("classify") == {**shared, "fmt": CLASSIFY_FORMATS, "scores": SCORE_KINDS}
    assert offered("embed") == {**shared, "fmt": EMBED_FORMATS}
    assert offered("convert") == {"from_": ("auto", *LAYOUTS), "to": choices.CONVERT_TARGETS}
    benchmark = offered("benchmark")
    assert (benchmark["fmt"], benchmark["decode"]) == (choices.REPORT_FORMATS, DECODE_CHOICES)
    assert ("auto", *LAYOUTS) == choices.LAYOUT_CHOICES and SCORE_KINDS == choices.SCORES


def test_help_shows_choices_and_readable_metavars() -> None:
    classify_help = help_text("classify")
    # every choice list is words in the help text (cut at word boundaries at 80 columns),
    # the option's name its metavar: one way of writing them (issue 30), never <a|b> or a|b
    flat = " ".join(classify_help.split())
    assert "auto, table, json, jsonl, csv, parquet or html." in flat
    assert all(d in flat for d in ("float32", "float16", "bfloat16"))
    assert "--engine ENGINE local, or ray" in flat and "--decode DECODE" in flat
    for command in COMMANDS:
        assert not re.search(r"<\w+\|", help_text(command)), command
        assert not re.search(r"\s\w+\|\w+\s", help_text(command)), command
    convert_help = " ".join(help_text("convert").split())
    assert all(f" {layout}" in convert_help for layout in ("hf", "fb", "fcmae", "timm", "tf"))
    for name in ("MODEL", "DEVICE", "FILE", "DIR", "REV", "TOKEN", " N ", "I/N", "FORMAT", "DTYPE"):
        assert name in classify_help, name
    for command in COMMANDS:
        text = help_text(command)
        for raw in ("<str>", "<bool>", "<int", "<float>", "<list", "<path>", "{INPUTS}"):
            assert raw not in text, (command, raw)
        assert "Examples:" in text and "$ convnext " in text, command


def test_invalid_choice_is_typers_usage_error() -> None:
    result = invoke("classify", "x.jpg", "--dtype", "xyz")
    assert result.exit_code == 2
    assert "Invalid value for '--dtype'" in result.output and "'xyz'" in result.output
    assert "Traceback" not in result.output
    bad_device = invoke("classify", "x.jpg", "--device", "gpu")
    assert bad_device.exit_code == 2
    assert "Invalid value for '--device'" in bad_device.output
    assert invoke("convert", "a", "b", "--from", "keras").exit_code == 2
    assert invoke("embed", "x.jpg", "--format", "table").exit_code == 2  # not an embed format


@pytest.mark.parametrize("value", ["auto", "cpu", "CPU", "cuda", "cuda:3", "mps", " cuda:0 "])
def test_device_values_accepted(value: str) -> None:
    from convnext_cli.cli.options import parse_device

    assert parse_device(value) == value.strip().lower()


# ----------------------------------------------------------------------------- completion


def _run_app(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    code = "from convnext_cli.cli import app; app(prog_name='convnext')"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        timeout=120,
    )


def test_show_completion_prints_a_script() -> None:
    shown = _run_app(
        {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}, "--show-completion", "bash"
    )
    assert shown.returncode == 0, shown.stderr
    assert "_CONVNEXT_COMPLETE" in shown.stdout and "complete " in shown.stdout


def test_completion_completes_options_and_choices() -> None:
    def complete(words: str) -> list[str]:
        env = {
            "_CONVNEXT_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
        }
        done = _run_app(env)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert "--dtype" in complete("convnext classify --dt")
    assert complete("convnext classify --dtype b") == ["bfloat16"]
    assert "cuda:0" in complete("convnext embed --device cu")
    assert "classify" in complete("convnext cl")


def test_help_with_completion_still_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from convnext_cli.cli import app\n"
        "try:\n    app(['classify', '--help'], prog_name='convnext')\n"
        "except SystemExit:\n    pass\n"
        "heavy = ['torch', 'torchvision', 'PIL', 'safetensors', 'huggingface_hub', 'numpy']\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]


# ----------------------------------------------------------------------------- one declaration


def test_shared_options_declared_once_and_reach_the_job(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    own = {
        "classify": {"inputs", "top_k", "scores", "fmt"},
        "embed": {"inputs", "fmt", "normalize", "stage", "pool", "backbone"},
    }
    for name, command in (("classify", classify.classify), ("embed", embed.embed)):
        names = [p.name for p in parameters_of(command)]
        shared = set(SHARED_PARAMETERS) - ({"labels"} if name == "embed" else set())
        assert set(names) == own[name] | shared, name  # embed: no --labels (issue 30)
    refused = invoke("embed", "a.jpg", "--labels", tmp_path / "labels.txt")
    assert refused.exit_code == 2 and "--labels" in refused.output
    captured: list[jobs.Job] = []

    def capture(job: jobs.Job) -> int:
        captured.append(job)
        return 0

    monkeypatch.setattr(classify, "run_job", capture)
    monkeypatch.setattr(embed, "run_job", capture)
    labels = tmp_path / "labels.txt"
    loading = ["--revision", "v2.0", "--cache-dir", tmp_path, "--token", "hf_x", "--labels", labels]
    result = invoke(
        "classify", "a.jpg", "-k", "3", "--format", "CSV", "--dtype", "BFloat16", *loading, "-q"
    )
    assert result.exit_code == 0, result.output
    result = invoke("embed", "a.jpg", "--normalize", "--no-progress", "--decode", "cpu")
    assert result.exit_code == 0, result.output
    first, second = captured
    assert (first.command, first.inputs, first.top_k) == ("classify", ["a.jpg"], 3)
    assert first.fmt == "csv"
    assert first.dtype == "bfloat16" and type(first.dtype) is str  # a plain string, not the enum
    assert (first.revision, first.cache_dir, first.token, first.labels) == (
        "v2.0",
        tmp_path,
        "hf_x",
        labels,
    )
    assert first.quiet and first.progress
    assert (second.command, second.normalize, second.decode) == ("embed", True, "cpu")
    assert not second.quiet and not second.progress
    assert second.revision is None and second.labels is None


def test_benchmark_takes_the_loading_options() -> None:
    text = help_text("benchmark")
    for option in ("--revision", "--cache-dir", "--token", "--labels", "--quiet"):
        assert option in text
    parsed = invoke(
        "benchmark", "-m", "/nonexistent/model", "--revision", "main", "--token", "t", "-q"
    )
    assert parsed.exit_code == 2 and "Invalid value" not in parsed.output  # parsed; load failed


def test_every_command_is_registered_with_error_handling() -> None:
    registered = {c.name: c.callback for c in app.registered_commands}
    assert sorted(map(str, registered)) == sorted(COMMANDS)
    for name, callback in registered.items():
        assert getattr(callback, "handles_errors", False), name


# ----------------------------------------------------------------------------- numbers


def test_scores_at_full_precision(v1_checkpoint: Path, photos: list[Path], tmp_path: Path) -> None:
    """JSON, JSON lines, CSV and Parquet carry the float32 probability itself, not 6 digits."""
    import numpy as np
    import pyarrow.parquet as pq

    from convnext_cli import ImageModel

    expected = ImageModel(str(v1_checkpoint), device="cpu", dtype="float32", workers=0)
    want = [p.score for p in expected.classify(str(photos[0]), top_k=5)[0].predictions]
    common = [photos[0], "-m", v1_checkpoint, "--device", "cpu", "--dtype", "float32"]
    lines = invoke("classify", *common, "--format", "jsonl", "--workers", "0")
    got = [p["score"] for p in json.loads(lines.stdout)["predictions"]]
    assert got == pytest.approx(want, abs=1e-9)
    assert all(float(np.float32(s)) == s for s in got)  # float32 values, written exactly
    assert any(s != round(s, 6) for s in got)  # not rounded to 6 digits
    # exact by design below: each format writes the float it got, and every run here is the
    # same single-image batch in this process (same composition, same threads)
    array = invoke("classify", *common, "--format", "json", "--workers", "0")
    assert [p["score"] for p in json.loads(array.stdout)[0]["predictions"]] == got
    table = invoke("classify", *common, "--format", "csv", "--workers", "0")
    assert [float(r["score"]) for r in csv.DictReader(io.StringIO(table.stdout))] == got
    out = tmp_path / "labels.parquet"
    invoke("classify", *common, "-o", out, "--workers", "0")
    scores = pq.read_table(out).column("predictions").to_pylist()[0]
    assert [p["score"] for p in scores] == got


def test_csv_error_rows_keep_integer_columns(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    result = invoke(
        "classify", photos[0], broken, "-m", v1_checkpoint, "-k", "2", "--format", "csv"
    )
    assert result.exit_code == 1
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    good, error = rows[:2], rows[2]
    for row in good:
        assert row["rank"].isdigit() and row["index"].isdigit(), row  # "3", never "3.0"
    assert (error["rank"], error["index"], error["score"], error["label"]) == ("", "", "", "")
    assert error["error"] and "nan" not in result.stdout.lower()
    import pandas as pd

    frame = pd.read_csv(io.StringIO(result.stdout), dtype={"rank": "Int64", "index": "Int64"})
    assert frame["index"].dtype == "Int64"
    assert frame["index"].isna().tolist() == [False, False, True]
