"""Ctrl-C in the first moments of start-up: one line and exit 130 from our first instruction.

The signal is sent at delays spread over 0-0.3 s after the process starts (every other
run: after our handler is in place, so that a slow machine tests our code too), to both ways
the tool starts (``python -m convnext_cli`` and the installed ``convnext`` script, whose
launcher is recreated here), many times.  A signal can land before any of our code runs
(interpreter start-up, ``site``): Python's own handler is in charge then and we cannot
answer for it.  So every run must show no traceback through a frame of ours, and every
run whose signal arrived once our handler was in place (seen in ``/proc/PID/status``:
Python never catches SIGTERM itself, our start-up handler does) must end with exactly
``interrupted`` and exit 130.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import repeated_paths, start_with_stdin

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="/proc (Linux)")

REPO = Path(__file__).resolve().parents[2]
RUNS = 20  # per way of starting
LAUNCHER = (  # what pip writes for the console script `convnext = convnext_cli.cli:main`
    "import sys\n"
    "from convnext_cli.cli import main\n"
    "if __name__ == '__main__':\n"
    "    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n"
    "    sys.exit(main())\n"
)


def handler_installed(pid: int) -> bool:
    """Whether the process catches SIGTERM (only our start-up handler does)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("way", ["module", "script"])
def test_ctrl_c_during_start_up_is_one_line_and_130(
    way: str, v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    if way == "module":
        command = [sys.executable, "-m", "convnext_cli"]
    else:
        script = tmp_path / "convnext"
        script.write_text(LAUNCHER)
        command = [sys.executable, str(script)]
    command += ["classify", "-", "-m", str(v1_checkpoint), "--device", "cpu", "-b", "2"]
    listing = "".join(f"{p}\n" for p in repeated_paths(photos, 400)).encode()  # fits a pipe
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CONVNEXT_DEBUG", None)
    ours = 0
    for run in range(RUNS):
        delay = 0.3 * run / (RUNS - 1)
        proc = start_with_stdin(command, listing, stdout=subprocess.DEVNULL, env=env)
        if run % 2:  # from when our handler is in place (a slow machine starts late)
            deadline = time.monotonic() + 30
            while not handler_installed(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.001)
        time.sleep(delay)
        installed = handler_installed(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err_bytes = proc.communicate(timeout=60)
        err = err_bytes.decode("utf-8", "replace")
        assert f"convnext_cli{os.sep}" not in err, (delay, err)  # no traceback through our code
        if installed:
            ours += 1
            assert proc.returncode == 130, (delay, err)
            assert err.strip().splitlines() == ["interrupted"], (delay, err)
    assert ours >= RUNS // 2, f"our handler was in place in only {ours} of {RUNS} runs"
