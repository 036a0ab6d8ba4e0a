"""The `convnext` command line: records, formats, inputs, exit codes, errors without tracebacks."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import invoke, jsonl
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> Path:
    """Good photos mixed with every kind of broken file."""
    folder = tmp_path_factory.mktemp("mixed")
    shutil.copy(photos[2], folder / "a_good.png")
    (folder / "b_empty.jpg").write_bytes(b"")
    data = photos[-1].read_bytes()
    (folder / "c_truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "d_text.png").write_text("not an image at all")
    from helpers import bomb_png

    (folder / "e_bomb.png").write_bytes(bomb_png(50_000, 50_000))
    shutil.copy(photos[-1], folder / "f_good.JPG")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder


def test_classify_folder_jsonl(v1_checkpoint: Path, photos: list[Path]) -> None:
    result = invoke(
        "classify",
        photos[0].parent,
        "-m",
        v1_checkpoint,
        "-k",
        "3",
        "--dtype",
        "float32",
        "--workers",
        "0",
    )
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == [str(p) for p in photos]
    for record in records:
        preds = record["predictions"]
        assert len(preds) == 3
        scores = [p["score"] for p in preds]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
        assert all(p["label"] and isinstance(p["index"], int) for p in preds)


def test_broken_inputs_reported_in_order_exit_1(v1_checkpoint: Path, broken_folder: Path) -> None:
    result = invoke(
        "classify",
        broken_folder,
        "-m",
        v1_checkpoint,
        "--format",
        "jsonl",
        "--dtype",
        "float32",
        "-b",
        "2",
        "--workers",
        "2",
    )
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    names = [Path(r["path"]).name for r in records]
    assert names == [
        "a_good.png",
        "b_empty.jpg",
        "c_truncated.jpg",
        "d_text.png",
        "e_bomb.png",
        "f_good.JPG",
    ]
    by_name = {Path(r["path"]).name: r for r in records}
    assert "predictions" in by_name["a_good.png"] and "predictions" in by_name["f_good.JPG"]
    assert by_name["b_empty.jpg"]["error"] == "empty file"
    assert "truncated" in by_name["c_truncated.jpg"]["error"]
    assert by_name["d_text.png"]["error"] == "not a recognised image format"
    assert by_name["e_bomb.png"]["error"].startswith("refused")
    assert "Traceback" not in result.stderr and "classified 2 of 6 images in " in result.stderr
    assert "  4 failed: 1 empty file, " in result.stderr and "..." not in result.stderr


def test_json_csv_and_output_file(v1_checkpoint: Path, broken_folder: Path, tmp_path: Path) -> None:
    files = [broken_folder / "a_good.png", broken_folder / "b_empty.jpg"]
    common = ["-m", v1_checkpoint, "-k", "2", "--dtype", "float32"]
    as_json = invoke("classify", *files, *common, "--format", "json")
    assert as_json.exit_code == 1
    array = json.loads(as_json.stdout)
    assert [r.get("error") for r in array] == [None, "empty file"]

    out = tmp_path / "out.csv"
    as_csv = invoke("classify", *files, *common, "--format", "csv", "-o", out)
    assert as_csv.exit_code == 1 and as_csv.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == ["path", "rank", "label", "index", "score", "error"]
    assert [r["rank"] for r in rows] == ["1", "2", ""]
    assert rows[2]["error"] == "empty file" and rows[2]["path"] == str(files[1])
    assert float(rows[0]["score"]) == pytest.approx(array[0]["predictions"][0]["score"])


def test_table_format(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short relative path and a wide terminal, so the check does not depend on
    # where the checkout lives or on the runner's terminal width.
    shutil.copy(photos[2], tmp_path / photos[2].name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "160")
    result = invoke(
        "classify",
        photos[2].name,
        "-m",
        v1_checkpoint,
        "--format",
        "table",
        "-k",
        "2",
        "--dtype",
        "float32",
    )
    assert result.exit_code == 0
    header, rule, first, second = result.stdout.splitlines()
    assert header.split() == ["image", "#", "label", "index", "score"]  # 160 columns: index too
    assert set(rule) == {"─"} and len(rule) == 160
    # two prediction rows for the one image, the name on the first
    assert first.startswith(photos[2].name) and re.search(r"\s1\s{2}\S", first)
    assert second.startswith(" ") and re.match(r"\s+2\s{2}\S", second)


def test_stdin_glob_and_recursive(v1_checkpoint: Path, photos: list[Path], tmp_path: Path) -> None:
    nested = tmp_path / "top" / "sub"
    nested.mkdir(parents=True)
    shutil.copy(photos[0], tmp_path / "top" / "one.png")
    shutil.copy(photos[1], nested / "two.PNG")
    common = ["-m", v1_checkpoint, "--dtype", "float32", "-k", "1"]

    flat = jsonl(invoke("classify", tmp_path / "top", *common).stdout)
    assert [Path(r["path"]).name for r in flat] == ["one.png"]
    deep = jsonl(invoke("classify", tmp_path / "top", "-r", *common).stdout)
    assert [Path(r["path"]).name for r in deep] == ["one.png", "two.PNG"]
    globbed = jsonl(invoke("classify", str(tmp_path / "top" / "**" / "*.PNG"), *common).stdout)
    assert [Path(r["path"]).name for r in globbed] == ["two.PNG"]

    listing = f"{photos[3]}\n\n{tmp_path / 'missing.jpg'}\n"
    piped = invoke("classify", "-", *common, stdin=listing)
    assert piped.exit_code == 1
    records = jsonl(piped.stdout)
    assert records[0]["path"] == str(photos[3]) and "predictions" in records[0]
    assert records[1]["error"] == "no such file"


@pytest.mark.parametrize(
    "args,message",
    [
        (["classify", "nothing-here/*.jpg"], "nothing-here/*.jpg: matches no file"),
        (["classify", "nothing_here/"], "nothing_here/: no such file or folder"),
        (["classify", "{photo}", "-m", "{tmp}/not-a-model"], "no such file or folder"),
        (["classify", "{photo}", "--device", "cuda:7"], ""),
        (["embed", "{photo}", "--format", "npy"], "-o FILE"),
    ],
)
def test_usage_errors_exit_2_one_line(
    args: list[str], message: str, photos: list[Path], tmp_path: Path
) -> None:
    args = [a.format(photo=photos[0], tmp=tmp_path) for a in args]
    result = invoke(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert all(line.startswith(("warning: ", "note: ")) for line in lines[:-1])
    assert result.stdout == ""


def test_bad_checkpoint_folder_names_the_problem(
    tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    """Weights that do not match config.json: exit 2 naming the mismatched keys."""
    broken = tmp_path / "broken"
    shutil.copytree(v1_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_sizes"][-1] = 48
    (broken / "config.json").write_text(json.dumps(config))
    result = invoke("classify", photos[0], "-m", broken)
    assert result.exit_code == 2
    assert "shape mismatches" in result.stderr and "Traceback" not in result.stderr

    not_convnext = tmp_path / "bert"
    not_convnext.mkdir()
    (not_convnext / "config.json").write_text(json.dumps({"model_type": "bert"}))
    shutil.copy(v1_checkpoint / "model.safetensors", not_convnext)
    result = invoke("classify", photos[0], "-m", not_convnext)
    assert result.exit_code == 2 and "not a ConvNeXt model" in result.stderr


def test_headless_checkpoint_cannot_classify(tmp_path: Path, photos: list[Path]) -> None:
    import factories

    folder = factories.save_hf(factories.hf_model(head=False), tmp_path / "feat")
    result = invoke("classify", photos[0], "-m", folder)
    assert result.exit_code == 2 and "convnext embed" in result.stderr


def run_cli(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convnext_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_help_does_not_import_torch() -> None:
    code = (
        "import os, sys, runpy\n"
        "sys.argv = ['convnext', '--help']\n"
        # main() ends with os._exit (no teardown): what was imported is read just before it
        "heavy = ['torch', 'torchvision', 'PIL', 'safetensors', 'huggingface_hub', 'numpy']\n"
        "leave = os._exit\n"
        "def probe(code):\n"
        "    print(sorted(m for m in heavy if m in sys.modules), flush=True)\n"
        "    leave(code)\n"
        "os._exit = probe\n"
        "runpy.run_module('convnext_cli', run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "classify" in out.stdout and "embed" in out.stdout


def test_cpu_run_does_not_import_torchvision(v1_checkpoint: Path, photos: list[Path]) -> None:
    """torchvision's import pulls in torch._dynamo (seconds): a CPU run of JPEGs and 8-bit
    PNGs with the default --decode auto must not pay for it."""
    code = (
        "import os, sys, runpy\n"
        f"sys.argv = ['convnext', 'classify', *{[str(p) for p in photos]!r}, "
        f"'-m', {str(v1_checkpoint)!r}, '--device', 'cpu', '--format', 'jsonl']\n"
        # main() ends with os._exit (no teardown): what was imported is read just before it
        "leave = os._exit\n"
        "def probe(code):\n"
        "    print('torchvision' in sys.modules, code, file=sys.stderr, flush=True)\n"
        "    leave(code)\n"
        "os._exit = probe\n"
        "runpy.run_module('convnext_cli', run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stderr.strip().splitlines()[-1] == "False 0", out.stderr
    assert len(jsonl(out.stdout)) == len(photos)


def test_subprocess_exit_codes_and_debug(v1_checkpoint: Path, broken_folder: Path) -> None:
    """A real process: exit 1 with records for a mixed folder; a traceback only when asked."""
    mixed = run_cli("classify", broken_folder, "-m", v1_checkpoint, "--dtype", "float32")
    assert mixed.returncode == 1
    assert len(jsonl(mixed.stdout)) == 6 and "Traceback" not in mixed.stderr

    bad = run_cli("classify", broken_folder, "-m", broken_folder / "notes.txt")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    debug = run_cli(
        "classify", broken_folder, "-m", broken_folder / "notes.txt", env={"CONVNEXT_DEBUG": "1"}
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_compile_gives_the_same_records(v2_checkpoint: Path, photos: list[Path]) -> None:
    """--compile runs the plain model through torch.compile: same predictions."""
    common = ["-m", v2_checkpoint, "--dtype", "float32", "-k", "3", "--device", "cpu"]
    eager = jsonl(invoke("classify", *photos[:2], *common).stdout)
    compiled = invoke("classify", *photos[:2], *common, "--compile")
    assert compiled.exit_code == 0, compiled.stderr
    for a, b in zip(eager, jsonl(compiled.stdout), strict=True):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        for p, q in zip(a["predictions"], b["predictions"], strict=True):
            assert abs(p["score"] - q["score"]) < 1e-4


def test_failed_model_load_leaves_no_spool_file(photos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "feats.npy"
    result = invoke("embed", photos[0], "--format", "npy", "-o", out, "-m", tmp_path / "nope")
    assert result.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_interrupt_exits_130_without_traceback(v1_checkpoint: Path, photos: list[Path]) -> None:
    """Ctrl-C mid-run: exit 130, one line on stderr, decode workers cleaned up."""
    import signal

    listing = "".join(f"{photos[i % len(photos)]}\n" for i in range(5000))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "convnext_cli",
            "classify",
            "-",
            "-m",
            str(v1_checkpoint),
            "--dtype",
            "float32",
            "-b",
            "4",
            "--workers",
            "1",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(listing)
    proc.stdin.close()
    proc.stdin = None  # communicate() below drains stdout and stderr only
    assert proc.stdout.readline().startswith("{")  # running: the first batch is out
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
