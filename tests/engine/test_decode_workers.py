"""Decode workers that cannot take a run down: a worker killed (SIGKILL as the OOM killer
sends it, SIGSEGV, ``kill -9`` from outside) or hung costs at most its input, the run goes
on to the end with one record per input, in order.

The hostile decoders are real: the CLI runs in a subprocess through a small wrapper that
replaces ``images.decode_bytes`` for files whose bytes start with a marker (the fork-started
workers inherit it), and the processes really die or sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import HOSTILE_DECODER

from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
from convnext_cli.engine.decode_pool import DEFAULT_DECODE_TIMEOUT, decode_timeout
from convnext_cli.engine.pipeline import Runner, cap_workers, plan_workers, usable_cores
from convnext_cli.errors import UsageError

REPO = Path(__file__).resolve().parents[2]

HOOK = (
    HOSTILE_DECODER
    + """
images.decode_bytes = hostile
sys.argv[0] = "convnext"
from convnext_cli.cli import main
main()
"""
)


def run_cli(
    tmp_path: Path, args: list[str], env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    wrapper = tmp_path / "hostile_cli.py"
    wrapper.write_text(HOOK)
    return subprocess.run(
        [sys.executable, str(wrapper), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def base_args(checkpoint: Path) -> list[str]:
    return ["-m", str(checkpoint), "--device", "cpu", "--dtype", "float32", "--format", "jsonl"]


@pytest.fixture()
def hostile_folder(tmp_path: Path, photos: list[Path]) -> list[Path]:
    """Photos with inputs that kill their decoder (twice: real culprits) and one that kills
    it only the first time (retried alone, it succeeds)."""
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for n, photo in enumerate(photos * 2):
        paths.append(folder / f"{n:02d}-{photo.name}")
        paths[-1].write_bytes(photo.read_bytes())
    paths.insert(3, folder / "kill.png")
    paths[3].write_bytes(b"KILL")
    paths.insert(7, folder / "segv.png")
    paths[7].write_bytes(b"SEGV")
    paths.insert(9, folder / "once.png")
    paths[9].write_bytes(f"ONCE:{tmp_path / 'died-once'}\n".encode() + photos[0].read_bytes())
    return paths


@pytest.mark.parametrize("workers", [None, 1, 2])
def test_dead_workers_cost_only_their_culprits(
    tmp_path: Path, v1_checkpoint: Path, hostile_folder: list[Path], workers: int | None
) -> None:
    extra = [] if workers is None else ["--workers", str(workers)]
    result = run_cli(
        tmp_path,
        ["classify", *map(str, hostile_folder), "-b", "4", *extra, *base_args(v1_checkpoint)],
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    got = records(result.stdout)
    assert [r["path"] for r in got] == [str(p) for p in hostile_folder]
    failed = {Path(r["path"]).name: r["error"] for r in got if "error" in r}
    assert set(failed) == {"kill.png", "segv.png"}
    assert failed["kill.png"].startswith("the decoding process died on this image")
    assert "SIGKILL" in failed["kill.png"] and "SIGSEGV" in failed["segv.png"]
    # the others, the input that died once included, have the same predictions as an
    # in-process run of the clean files
    clean = [p for p in hostile_folder if p.name not in failed]
    clean[clean.index(hostile_folder[9])] = clean[0].parent / "00-copy.png"
    (clean[0].parent / "00-copy.png").write_bytes(hostile_folder[9].read_bytes().split(b"\n", 1)[1])
    expected = run_cli(
        tmp_path,
        ["classify", *map(str, clean), "-b", "4", "--workers", "0", *base_args(v1_checkpoint)],
    )
    assert expected.returncode == 0, expected.stderr
    want = [r["predictions"] for r in records(expected.stdout)]
    have = [r["predictions"] for r in got if "error" not in r]
    assert [[(p["label"], p["index"]) for p in ps] for ps in have] == [
        [(p["label"], p["index"]) for p in ps] for ps in want
    ]
    # scores are written at full precision: another batch may change their last float32 bits
    flat = [p["score"] for ps in have for p in ps]
    assert flat == pytest.approx([p["score"] for ps in want for p in ps], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("workers", [None, 2])
def test_a_hung_decoder_gets_an_error_within_the_deadline(
    tmp_path: Path, v1_checkpoint: Path, photos: list[Path], workers: int | None
) -> None:
    slow = tmp_path / "slow.jpg"
    slow.write_bytes(b"SLOW")
    inputs = [str(p) for p in photos[:3]] + [str(slow)] + [str(p) for p in photos[3:]]
    extra = [] if workers is None else ["--workers", str(workers)]
    started = time.monotonic()
    result = run_cli(
        tmp_path,
        ["classify", *inputs, "-b", "2", *extra, *base_args(v1_checkpoint)],
        env={"CONVNEXT_DECODE_TIMEOUT": "2"},
        timeout=120,  # the sleep is 600 s: this bound fails unless the deadline works
    )
    assert time.monotonic() - started < 120
    assert result.returncode == 1, result.stderr
    got = records(result.stdout)
    assert [r["path"] for r in got] == inputs
    assert [r.get("error") for r in got] == [None] * 3 + ["decoding took longer than 2 s"] + [
        None
    ] * (len(photos) - 3)


def children_of(pid: int) -> list[int]:
    """Child processes of `pid`, found by walking /proc (no psutil)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_kill_9_of_a_worker_from_outside(
    tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    """A worker killed by someone else mid-run: its inputs are redone, nothing is lost."""
    inputs = []
    for n in range(24):
        path = tmp_path / f"nap{n:02d}.png"
        path.write_bytes(b"NAP\n" + photos[n % len(photos)].read_bytes())
        inputs.append(str(path))
    wrapper = tmp_path / "hostile_cli.py"
    wrapper.write_text(HOOK)
    args = ["classify", *inputs, "-b", "2", "--workers", "2", *base_args(v1_checkpoint)]
    proc = subprocess.Popen(
        [sys.executable, str(wrapper), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    watchdog = threading.Timer(180, proc.kill)  # "it finishes": a hang fails the test
    watchdog.start()
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first batch is out: the workers are busy
        assert first.startswith("{")
        workers = children_of(proc.pid)
        assert workers, "no decode worker found"
        os.kill(workers[0], signal.SIGKILL)
        # read on through the same buffered stream (communicate() would skip its buffer);
        # stderr holds a line or two, so it cannot fill its pipe meanwhile
        rest = proc.stdout.read()
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        proc.wait(timeout=180)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    got = records(first + rest)
    assert [r["path"] for r in got] == inputs
    assert all("predictions" in r for r in got)


def test_an_image_the_model_cannot_take_fails_alone(tmp_path: Path, photos: list[Path]) -> None:
    """``do_resize: false``: a tiny image makes the forward fail; only it gets the error,
    the images batched with it keep their predictions."""
    import factories
    from PIL import Image

    pre = dict(factories.IMAGENET_PREPROCESSOR, do_resize=False)
    folder = factories.save_hf(factories.hf_model(seed=3), tmp_path / "ckpt", pre)
    checkpoint = load_checkpoint(str(folder))
    model = build_model(checkpoint, torch.device("cpu"), torch.float32)
    runner = Runner(model, checkpoint.preprocess, torch.device("cpu"), torch.float32)
    paths: list[str] = []
    for name, size in [("a", 64), ("tiny1", 2), ("b", 64), ("tiny2", 2), ("c", 48)]:
        path = tmp_path / f"{name}.png"
        Image.open(photos[len(paths)]).convert("RGB").resize((size, size)).save(path)
        paths.append(str(path))
    got = [r for batch in runner.classify(paths, top_k=2, batch_size=8, workers=0) for r in batch]
    assert [r.path for r in got] == paths
    errors = [r.error for r in got]
    assert errors[0] is None and errors[2] is None and errors[4] is None
    for error in (errors[1], errors[3]):
        assert error is not None and error.startswith(
            "the model cannot run on this image (3x2x2 after preprocessing)"
        )
    alone = [r for batch in runner.classify([paths[2]], top_k=2, workers=0) for r in batch]
    assert [p.index for p in got[2].predictions] == [p.index for p in alone[0].predictions]
    assert got[2].predictions[0].score == pytest.approx(alone[0].predictions[0].score, abs=1e-6)


def test_worker_caps_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = usable_cores()
    assert cap_workers(64, 1000, 8) == min(64, cores)
    assert cap_workers(8, 10, 4) == min(3, cores)  # 3 batches
    assert cap_workers(0, 10, 4) == 0
    assert plan_workers(0, 100, 8, "cpu")[0] == 0  # in this process
    # a single batch, or a small CPU: one guard process, one batch at a time
    assert plan_workers(None, 3, 8, "cpu") == (1, 1)
    workers, prefetch = plan_workers(2, 100, 8, "cpu")
    assert workers == min(2, cores) and prefetch == 2 * workers
    monkeypatch.delenv("CONVNEXT_DECODE_TIMEOUT", raising=False)
    assert decode_timeout() == DEFAULT_DECODE_TIMEOUT == 30
    monkeypatch.setenv("CONVNEXT_DECODE_TIMEOUT", "2.5")
    assert decode_timeout() == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("CONVNEXT_DECODE_TIMEOUT", bad)
        with pytest.raises(UsageError, match="CONVNEXT_DECODE_TIMEOUT"):
            decode_timeout()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux")
def test_no_worker_process_to_be_had_decodes_in_process(
    v1_checkpoint: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When no process can be started (fork fails: EAGAIN, ENOMEM), the run goes on, decoding
    in the main process."""
    forks: list[int] = []

    def refuse() -> int:
        forks.append(1)
        raise BlockingIOError(11, "Resource temporarily unavailable")

    checkpoint = load_checkpoint(str(v1_checkpoint))
    model = build_model(checkpoint, torch.device("cpu"), torch.float32)
    runner = Runner(model, checkpoint.preprocess, torch.device("cpu"), torch.float32)
    paths = [str(p) for p in photos]
    expected = [r for b in runner.classify(paths, batch_size=2, workers=0) for r in b]
    monkeypatch.setattr(os, "fork", refuse)  # what the system says when it has no process left
    got = [r for b in runner.classify(paths, batch_size=2, workers=2) for r in b]
    assert forks, "the run never tried to start a worker process"
    assert [r.path for r in got] == paths
    for a, b in zip(got, expected, strict=True):
        assert a.error is None
        assert [p.index for p in a.predictions] == [p.index for p in b.predictions]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("workers", [None, 2])
def test_ctrl_c_stops_the_workers_too(
    tmp_path: Path, v1_checkpoint: Path, photos: list[Path], workers: int | None
) -> None:
    """SIGINT to the whole process group, as a terminal sends it: exit 130, one line, no
    traceback from any worker, and no decode process left behind."""
    inputs = []
    for n in range(40):
        path = tmp_path / f"nap{n:02d}.png"
        path.write_bytes(b"NAP\n" + photos[n % len(photos)].read_bytes())
        inputs.append(str(path))
    wrapper = tmp_path / "hostile_cli.py"
    wrapper.write_text(HOOK)
    extra = [] if workers is None else ["--workers", str(workers)]
    proc = subprocess.Popen(
        [sys.executable, str(wrapper), "classify", *inputs, "-b", "2", *extra,
         *base_args(v1_checkpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,  # its own process group, to signal as a terminal does
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("{")
        decoders = children_of(proc.pid)
        assert decoders
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "interrupted"
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in decoders):
        assert time.monotonic() < deadline, "a decode worker outlived the run"
        time.sleep(0.1)
