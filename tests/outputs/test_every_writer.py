"""One output protection for every writer (docs/robustness.md, outputs/files.py).

Every file the tool writes for the user goes through ``convnext_cli.outputs.files``: refused
over an input or a checkpoint file, never over a device node, written beside the target and
moved into place, one line and exit 2 when it cannot be written.  The first test walks the
package's source for every call that writes, renames, removes or changes a file and fails on
one that is not in the list below of places that are the protection itself or the tool's own
files beside a locked target; the others build each case the field showed (benchmark -o over
a photo or the checkpoint's config.json, into a missing folder or onto a full device;
convert over a device node or a FIFO) and run the CLI in a subprocess.
"""

from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "convnext_cli"

# (module, function): why writing there is fine.  A new write anywhere else fails the walk.
ALLOWED = {
    ("outputs/files.py", "OutputFile.__init__"): "the protection: the partial or the device",
    ("outputs/files.py", "OutputFile._open_locked"): "the protection: .NAME.partial, locked",
    ("outputs/files.py", "OutputFile._keep_mode"): "the protection: the partial's mode",
    ("outputs/files.py", "OutputFile.pwrite"): "the protection: the partial's header",
    ("outputs/files.py", "OutputFile.commit"): "the protection: moved into place",
    ("outputs/files.py", "OutputFile.replace_with"): "the protection: moved into place",
    ("outputs/files.py", "OutputFile.abort"): "the protection: the partial dropped",
    ("outputs/files.py", "silence_stdout"): "fd 1 pointed at /dev/null",
    ("outputs/writers.py", "MatrixWriter._close_safetensors"): ".NAME.partial.tmp, locked",
    ("outputs/parquet.py", "ParquetRecordWriter.__init__"): ".NAME.parts/, locked",
    ("outputs/parquet.py", "ParquetRecordWriter._flush"): "a part in .NAME.parts/",
    ("outputs/parquet.py", "ParquetRecordWriter.close"): "into the locked OutputFile",
    ("outputs/parquet.py", "ParquetRecordWriter.abort"): "this run's .NAME.parts/ dropped",
    ("outputs/resume.py", "write_provenance"): ".NAME.run.json beside a locked target",
    ("outputs/resume.py", "keep_text_records"): ".NAME.resume beside a locked target",
    ("outputs/benchmark_report.py", "save_plot"): "into benchmark -o's OutputFile",
    ("checkpoints/weights_io.py", "save_safetensors"): "by path, into replacing()'s partial",
    ("checkpoints/convert.py", "_export"): "by path, into replacing()'s partial",
    ("checkpoints/convert.py", "write_folder"): "OUT_DIR made; stale weight links (--force)",
    ("checkpoints/convert.py", "export_onnx"): "the .onnx file's folder made",
    ("engine/job.py", "run_job"): "a sidecar this run created, dropped with its output",
    ("engine/job.py", "_keep_records"): ".NAME.resume dropped once copied",
    ("engine/job.py", "_plan_ray_folder"): "-o DIR made for Ray's part files",
    ("engine/ray/parts.py", "_replace_atomically"): "a unit's status in -o DIR, temp + rename",
    ("engine/ray/parts.py", "write_piece"): "a hidden piece of a unit in -o DIR, temp + rename",
    ("engine/ray/parts.py", "finish_unit"): "a unit's part in -o DIR, temp + rename",
    ("engine/ray/parts.py", "clear_unfinished"): "this tool's own unfinished files in -o DIR",
    ("engine/ray/run.py", "write_parts_on_ray"): "-o DIR made for Ray's part files",
    ("engine/ray/session.py", "_silenced_stderr"): "fd 2 pointed at /dev/null",
    ("engine/ray/session.py", "_private_token"): "Ray's token in a fresh 0700 temp folder",
    ("engine/ray/session.py", "_start_local"): "Ray's own fresh 0700 temp folder",
    ("engine/ray/settings.py", "test_hook"): "test-only, under a test's own folder",
    ("cli/serve.py", "start_detached"): "the server's log in its private 0700 folder",
    ("serve/paths.py", "private_folder"): "the server's private 0700 folder",
    ("serve/server.py", "Server.bind"): "the lock file and socket in the private folder",
    ("serve/server.py", "Server._close"): "the server's own socket removed",
    ("serve/web.py", "write_token"): "the HTTP token (0600) in the private folder",
    ("serve/web.py", "handler.Handler._answer"): "an upload in the server's 0700 temp folder",
    ("serve/web.py", "start"): "the server's 0700 temp folder for uploads",
    ("startup.py", "guard_standard_streams"): "closed fds 0-2 pointed at /dev/null",
}
# the places above whose module this protection owns: each must still write (no stale entry)
OWNED = ("outputs/", "checkpoints/convert.py")

WRITING_MODES = set("wax+")
# attribute calls that write, rename, remove or change a file, whatever the object
WRITING_METHODS = {
    "write_text",
    "write_bytes",
    "unlink",
    "rename",
    "rmdir",
    "touch",
    "symlink_to",
    "hardlink_to",
    "chmod",
    "savefig",
    "write_table",
    "ParquetWriter",
    "save_file",
    "save_model",
    "mkdir",
}
MODULE_CALLS = {
    "os": {
        "replace",
        "rename",
        "remove",
        "unlink",
        "link",
        "symlink",
        "chmod",
        "truncate",
        "ftruncate",
        "pwrite",
        "mkfifo",
        "mknod",
        "makedirs",
        "rmdir",
        "dup2",
    },
    "shutil": {"move", "copy", "copy2", "copyfile", "copytree", "rmtree", "copyfileobj"},
    "tempfile": {"mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryDirectory"},
    "np": {"save", "savez", "savetxt"},
    "numpy": {"save", "savez", "savetxt"},
    "torch": {"save"},
    "onnx": {"save", "save_model"},
    "pq": {"write_table", "write_to_dataset"},
}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"}


def _mode(call: ast.Call, position: int) -> str | None:
    node = call.args[position] if len(call.args) > position else None
    for keyword in call.keywords:
        if keyword.arg == "mode":
            node = keyword.value
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _names(node: ast.AST) -> set[str]:
    return {
        n.attr if isinstance(n, ast.Attribute) else n.id
        for n in ast.walk(node)
        if isinstance(n, (ast.Attribute, ast.Name))
    }


def writes(call: ast.Call) -> str | None:
    """What the call writes, or None."""
    func = call.func
    if isinstance(func, ast.Name) and func.id == "open":
        mode = _mode(call, 1)
        return "open" if mode is not None and WRITING_MODES & set(mode) else None
    if isinstance(func, ast.Name) and func.id == "save_file":
        return func.id
    if not isinstance(func, ast.Attribute):
        return None
    owner = func.value.id if isinstance(func.value, ast.Name) else None
    if owner == "os" and func.attr in ("open", "fdopen"):
        flags = _names(call.args[1]) if len(call.args) > 1 else set()
        mode = _mode(call, 1) if func.attr == "fdopen" else None
        if WRITE_FLAGS & flags or (mode and WRITING_MODES & set(mode)):
            return f"os.{func.attr}"
        return None
    if owner in MODULE_CALLS:
        return f"{owner}.{func.attr}" if func.attr in MODULE_CALLS[owner] else None
    if func.attr == "open":  # Path.open
        mode = _mode(call, 0)
        return "Path.open" if mode is not None and WRITING_MODES & set(mode) else None
    return func.attr if func.attr in WRITING_METHODS else None


def found_writes() -> dict[tuple[str, str], list[str]]:
    """(module, enclosing function): what it writes, for every writing call in the package.
    A function nested in a function counts as its enclosing function."""
    found: dict[tuple[str, str], list[str]] = {}

    def visit(node: ast.AST, module: str, scope: list[tuple[str, bool]]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, module, [*scope, (child.name, True)])
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function = bool(scope) and not scope[-1][1]
                visit(child, module, scope if in_function else [*scope, (child.name, False)])
                continue
            if isinstance(child, ast.Call) and (what := writes(child)):
                where = ".".join(name for name, _ in scope) or "<module>"
                found.setdefault((module, where), []).append(f"{what} (line {child.lineno})")
            visit(child, module, scope)

    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        visit(tree, path.relative_to(PACKAGE).as_posix(), [])
    return found


def test_the_walk_sees_every_kind_of_write() -> None:
    """The detector itself, on the writes it must catch (and a read it must not)."""
    source = (
        "open(p, 'w'); open(p, mode='ab'); p.write_text('x'); os.replace(a, b)\n"
        "shutil.move(a, b); np.save(p, x); pq.write_table(t, p); fig.savefig(p)\n"
        "os.open(p, os.O_WRONLY | os.O_CREAT); p.open('wb'); save_file(t, p)\n"
        "open(p); open(p, 'rb'); os.open(p, os.O_RDONLY); p.open()\n"
    )
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)]
    hits = [writes(c) for c in calls if isinstance(c.func, (ast.Name, ast.Attribute))]
    assert sum(h is not None for h in hits) == 11, hits


def test_every_write_goes_through_the_one_protection() -> None:
    found = found_writes()
    unknown = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not unknown, (
        "files written outside convnext_cli.outputs.files (route them through OutputFile / "
        f"replacing, or add them to ALLOWED with the reason): {unknown}"
    )
    stale = sorted(k for k in set(ALLOWED) - set(found) if k[0].startswith(OWNED))
    assert not stale, f"ALLOWED names places that no longer write: {stale}"


# ------------------------------------------------------------------- the cases, as a user


def cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), CONVNEXT_DEBUG="0", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "convnext_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def device_copy(folder: Path, name: str, of: str = "/dev/full") -> Path:
    """A node of the same device as ``of`` in ``folder`` (root only), never ``of`` itself."""
    info = os.stat(of)
    node = folder / name
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, info.st_rdev)
    except (PermissionError, AttributeError):
        pytest.skip("making a device node needs root")
    return node


def is_device(path: Path) -> bool:
    return stat.S_ISCHR(os.lstat(path).st_mode)


BENCH = ["-q", "-b", "1", "--warmup", "0", "--iters", "1", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture
def model_and_photos(tmp_path: Path, v1_checkpoint: Path, photos: list[Path]) -> tuple[Path, Path]:
    model = tmp_path / "model"
    shutil.copytree(v1_checkpoint, model)
    images = tmp_path / "photos"
    images.mkdir()
    for photo in photos[:2]:
        shutil.copy(photo, images / photo.name)
    return model, images


@pytest.mark.parametrize("victim", ["photo", "config", "photo-symlink", "config-hardlink"])
def test_benchmark_output_over_a_photo_or_the_checkpoint_is_refused(
    victim: str, model_and_photos: tuple[Path, Path], tmp_path: Path
) -> None:
    model, images = model_and_photos
    photo = sorted(images.iterdir())[0]
    target = photo if victim.startswith("photo") else model / "config.json"
    out = target
    if victim.endswith("link"):
        out = tmp_path / f"report.{'png' if victim.startswith('photo') else 'json'}"
        (out.symlink_to if "symlink" in victim else out.hardlink_to)(target)
    if out.suffix not in (".png", ".json"):
        out = out.with_suffix(".png")
        out.symlink_to(target)
    before = {p: p.read_bytes() for p in [*images.iterdir(), *model.iterdir()]}
    listing = sorted(os.listdir(tmp_path)), sorted(os.listdir(model)), sorted(os.listdir(images))
    result = cli("benchmark", "-m", model, "--images", images, "-o", out, *BENCH)
    kind = "an input" if victim.startswith("photo") else "a checkpoint file"
    one_error_line(result, "refusing", kind)
    assert {p: p.read_bytes() for p in before} == before
    after = sorted(os.listdir(tmp_path)), sorted(os.listdir(model)), sorted(os.listdir(images))
    assert after == listing  # nothing created beside anything


@pytest.mark.parametrize("where", ["missing folder", "not a folder", "read-only folder"])
def test_benchmark_output_that_cannot_be_written_is_one_line_exit_2(
    where: str, v1_checkpoint: Path, tmp_path: Path
) -> None:
    if where == "missing folder":
        out = tmp_path / "no" / "such" / "report.json"
    elif where == "not a folder":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "report.json"
    else:
        out = Path("/proc/self/report.json")  # not writable, even for root
    result = cli("benchmark", "-m", v1_checkpoint, "-o", out, *BENCH)
    one_error_line(result, "cannot write output")
    assert "internal error" not in result.stderr


@pytest.mark.parametrize("suffix", ["json", "png"])
def test_benchmark_output_onto_a_full_device_is_one_line_exit_2(
    suffix: str, v1_checkpoint: Path, tmp_path: Path
) -> None:
    full = device_copy(tmp_path, f"full.{suffix}")
    result = cli("benchmark", "-m", v1_checkpoint, "-o", full, *BENCH)
    one_error_line(result, "cannot write output", "No space left")
    assert is_device(full)  # written into, never replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [full.name]


def test_benchmark_output_is_written_beside_and_moved_into_place(
    v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    out.write_text("old\n")
    out.chmod(0o640)
    result = cli("benchmark", "-m", v1_checkpoint, "-o", out, *BENCH)
    assert result.returncode == 0, result.stderr
    import json

    assert json.loads(out.read_text())["rows"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.parametrize("node", ["device", "fifo"])
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "pytorch_model.bin"])
def test_forced_convert_never_replaces_a_device_node_or_a_fifo(
    node: str, name: str, v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    if node == "device":
        path = device_copy(out, name)
    else:
        path = out / name
        os.mkfifo(path)
    result = cli("convert", v1_checkpoint, out, "--force")
    one_error_line(result, name, "not a regular file")
    assert is_device(path) if node == "device" else stat.S_ISFIFO(os.lstat(path).st_mode)
    assert sorted(p.name for p in out.iterdir()) == sorted(["keep.txt", name])  # nothing else


@pytest.mark.parametrize("node", ["device", "fifo"])
def test_forced_onnx_export_never_replaces_a_device_node_or_a_fifo(
    node: str, v1_checkpoint: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxscript")
    if node == "device":
        path = device_copy(tmp_path, "model.onnx")
    else:
        path = tmp_path / "model.onnx"
        os.mkfifo(path)
    result = cli("convert", v1_checkpoint, path, "--force")
    one_error_line(result, "not a regular file")
    assert is_device(path) if node == "device" else stat.S_ISFIFO(os.lstat(path).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_onnx_export_over_a_hard_link_to_the_source_is_refused(
    v1_checkpoint: Path, tmp_path: Path
) -> None:
    source = tmp_path / "weights.safetensors"
    shutil.copy(v1_checkpoint / "model.safetensors", source)
    before = source.read_bytes()
    link = tmp_path / "model.onnx"
    link.hardlink_to(source)
    result = cli("convert", source, link, "--force", "--from", "hf")
    one_error_line(result, "refusing", "checkpoint")
    assert source.read_bytes() == before


def test_a_malformed_hub_timeout_is_one_line_for_convert(
    v1_checkpoint: Path, tmp_path: Path
) -> None:
    env_result = subprocess.run(
        [sys.executable, "-m", "convnext_cli", "convert", str(v1_checkpoint), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_ETAG_TIMEOUT="abc"),
    )
    one_error_line(env_result, "HF_HUB_ETAG_TIMEOUT")
    assert not (tmp_path / "o").exists()
