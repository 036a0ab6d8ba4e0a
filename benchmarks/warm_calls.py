"""Warm calls: ``convnext classify img.jpg -m M`` with ``convnext serve`` running (model
loaded) against the same call in-process (cold), and a shell-style loop of one call per file
with and without the server.

    python benchmarks/warm_calls.py --repeats 5 --loop 20 --clients 16

The checkpoint is ConvNeXt-T's architecture with random weights, built offline
(``benchmarks/assets.py``); each call is a fresh ``python -m convnext_cli`` process, as a
script calling the CLI would start it.  The server runs in a runtime folder of its own
(``XDG_RUNTIME_DIR``), started before and stopped after the measurements.  Results are
printed as one JSON object (and a short table on stderr).  ``--clients 16`` also times 16
clients at once, each classifying its share of the loop's files, against one in-process
run over all of them (a throughput ratio of 1.0: as fast as one run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from assets import make_checkpoint, make_photos

REPO = Path(__file__).resolve().parent.parent


def call(args: list[str], env: dict[str, str]) -> float:
    """Seconds of wall time of one ``convnext ARGS`` process (which must succeed)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "convnext_cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"convnext {' '.join(args)} failed:\n{done.stderr.decode()}")
    return seconds


def start_server(env: dict[str, str], model: Path, log: Path) -> subprocess.Popen[bytes]:
    """``convnext serve -m MODEL``, its log in ``log`` (a file: a pipe nobody reads would
    fill up and stop the server), once the model is loaded."""
    command = [sys.executable, "-m", "convnext_cli", "serve", "--idle-timeout", "0"]
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [*command, "-m", str(model)], env=env, stdin=subprocess.DEVNULL, stderr=out
        )
    deadline = time.monotonic() + 300
    while b"loaded " not in log.read_bytes():  # "loaded MODEL" once the preload is done
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return server


def server_seconds(log: Path, count: int) -> list[float]:
    """The server's own time for each of the first ``count`` requests it logged (``classify
    N inputs ...: S s``; it logs a request just after answering it: waited for)."""
    deadline = time.monotonic() + 10
    while True:
        found = [
            float(line.rsplit(": ", 1)[1].removesuffix(" s"))
            for line in log.read_text().splitlines()
            if " inputs (" in line and line.endswith(" s")
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found[:count]
        time.sleep(0.05)


def loop_seconds(files: list[Path], model: Path, env: dict[str, str], extra: list[str]) -> float:
    """One process per file, one after the other (``for f in *.jpg; do convnext ...``)."""
    started = time.perf_counter()
    for path in files:
        call(["classify", str(path), "-m", str(model), *extra], env)
    return time.perf_counter() - started


def concurrent_seconds(files: list[Path], model: Path, env: dict[str, str], clients: int) -> float:
    """``clients`` processes at once, each classifying its share of ``files``."""
    command = [sys.executable, "-m", "convnext_cli", "classify", "-m", str(model), "-q"]
    started = time.perf_counter()
    running = [
        subprocess.Popen(
            [*command, *map(str, files[i::clients])], env=env, stdout=subprocess.DEVNULL
        )
        for i in range(min(clients, len(files)))
    ]
    if any(process.wait() != 0 for process in running):
        raise SystemExit("a concurrent client failed")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help="ConvNeXt size of the checkpoint")
    parser.add_argument("--repeats", type=int, default=5, help="calls timed per mode")
    parser.add_argument("--loop", type=int, default=20, help="files in the shell-style loop")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (0: none)")
    parser.add_argument("--work", type=Path, default=REPO / "bench-out")
    args = parser.parse_args()
    model = make_checkpoint(args.work / f"convnext-{args.size}", args.size)
    photos = sorted(make_photos(args.work / "photos", max(args.loop, 1)).glob("*.jpg"))
    image = [str(photos[0]), "-m", str(model)]  # the command, summary and all
    with tempfile.TemporaryDirectory(prefix="warm-calls-") as runtime:
        os.chmod(runtime, 0o700)
        env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_RUNTIME_DIR": runtime}
        call(["classify", *image, "--no-server"], env)  # the page cache warm for both
        cold = [call(["classify", *image, "--no-server"], env) for _ in range(args.repeats)]
        cold_loop = loop_seconds(photos[: args.loop], model, env, ["--no-server"])
        files = [str(p) for p in photos[: args.loop]]
        one_run = None
        if args.clients:
            one_run = call(["classify", *files, "-m", str(model), "-q", "--no-server"], env)
        log = Path(runtime) / "server.log"
        server = start_server(env, model, log)
        try:
            call(["classify", *image], env)  # the server's first forward
            warm = [call(["classify", *image], env) for _ in range(args.repeats)]
            in_server = server_seconds(log, args.repeats + 1)[1:]  # the warm calls, in there
            warm_loop = loop_seconds(photos[: args.loop], model, env, [])
            together = None
            if args.clients:
                together = concurrent_seconds(photos[: args.loop], model, env, args.clients)
        finally:
            server.terminate()
            server.wait(timeout=120)
    result: dict[str, object] = {
        "model": f"convnext-{args.size} (random weights)",
        "cpu_cores": len(os.sched_getaffinity(0)),
        "cold_median_s": round(statistics.median(cold), 3),
        "warm_median_s": round(statistics.median(warm), 3),
        "warm_over_cold": round(statistics.median(warm) / statistics.median(cold), 3),
        "warm_in_server_median_s": round(statistics.median(in_server), 3),
        "loop_files": args.loop,
        "loop_cold_s": round(cold_loop, 2),
        "loop_warm_s": round(warm_loop, 2),
        "loop_speedup": round(cold_loop / warm_loop, 1),
    }
    if one_run is not None and together is not None:
        result["one_in_process_run_s"] = round(one_run, 2)  # the loop's files, one process
        result["concurrent_clients"] = args.clients
        result["concurrent_s"] = round(together, 2)  # the same files over the clients, warm
        result["concurrent_over_one_run"] = round(one_run / together, 2)  # throughput ratio
    for key, value in result.items():
        print(f"{key:>16}: {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
