"""The ranges of every number the tool takes from a flag or an environment variable.

A value outside its range is a usage error (exit 2, one line naming the flag or variable
and the range), raised where it is parsed: Typer's ``min=``/``max=`` on the options, and
:func:`env_int` / :func:`env_float` for environment variables.  The bounds are far above
any useful setting and far below what would overflow an index or exhaust memory before a
single image is read.

Nothing here imports torch, PIL or numpy.
"""

from __future__ import annotations

import os
import re

from convnext_cli.errors import UsageError

MAX_BATCH_SIZE = 4096  # -b: images per batch (classify, embed, benchmark)
MAX_WORKERS = 256  # --workers: decoding processes
MAX_TOP_K = 100_000  # -k: labels per image (clamped to the model's labels anyway)
MAX_REPLICAS = 1024  # --replicas: Ray model replicas
MAX_SHARDS = 1_000_000  # --shard I/N: N
MAX_ITERS = 100_000  # benchmark --iters
MAX_WARMUP = 100_000  # benchmark --warmup
MAX_BATCH_SIZES = 64  # benchmark -b 1,8,32,...: how many sizes
MAX_IMAGE_SIZE = 8192  # convert --image-size, in pixels
MAX_PARQUET_ROWS_PER_PART = 1_000_000  # CONVNEXT_PARQUET_ROWS_PER_PART
MAX_HUB_TIMEOUT = 86_400  # HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT (seconds)
MAX_DECODE_TIMEOUT = 604_800  # CONVNEXT_DECODE_TIMEOUT (seconds)
# huggingface_hub parses these with int() when it is imported (a ValueError there otherwise)
HUB_INT_ENV = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")

_INTEGER = re.compile(r"[+-]?[0-9]{1,30}")  # ASCII digits only: int() also takes '²'-like digits


def is_int(text: str) -> bool:
    """Whether ``text`` is a plain ASCII whole number (at most 30 digits, a sign allowed)."""
    return _INTEGER.fullmatch(text.strip()) is not None


def parse_int(text: str, what: str, low: int, high: int) -> int:
    """``text`` as an integer in [low, high]; else a one-line UsageError naming ``what``."""
    stripped = text.strip()
    if not is_int(stripped):
        raise UsageError(f"{what}: {text!r} is not a whole number (use {low} to {high})")
    value = int(stripped)
    if not low <= value <= high:
        raise UsageError(f"{what}: {stripped} is out of range (use {low} to {high})")
    return value


def env_int(name: str, default: int, low: int, high: int) -> int:
    """Environment variable ``name`` as an integer in [low, high]; ``default`` when unset."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    return parse_int(raw, name, low, high)


def env_seconds(name: str, default: float, high: float) -> float:
    """Environment variable ``name`` as seconds in (0, high]; ``default`` when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= high:  # nan and inf too; above the bound: a typo, too long for a wait
        raise UsageError(f"{name}={raw!r}: use a positive number of seconds, at most {high}")
    return value


FLAG_VALUES = {"": None, "1": True, "true": True, "yes": True, "on": True}
FLAG_VALUES.update({"0": False, "false": False, "no": False, "off": False})


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off (any case; unset or
    empty: `default`); anything else is a UsageError naming it."""
    raw = os.environ.get(name, "")
    if raw.strip().lower() not in FLAG_VALUES:
        raise UsageError(f"{name}={raw!r}: use 1 or 0 (or true/false, yes/no, on/off)")
    value = FLAG_VALUES[raw.strip().lower()]
    return default if value is None else value


def check_environment() -> None:
    """Every environment variable the tool parses as a number, checked once before a run:
    a malformed or out-of-range value is one UsageError naming it, not a failure later (in
    every input, at an import, or deep in a wait).  ``COLUMNS``/``LINES`` are not errors: see
    :func:`convnext_cli.startup.sane_terminal_size`."""
    from convnext_cli.reading import check_limits

    check_limits()
    env_seconds("CONVNEXT_DECODE_TIMEOUT", 30.0, MAX_DECODE_TIMEOUT)  # decode_pool.TIMEOUT_ENV
    env_int("CONVNEXT_PARQUET_ROWS_PER_PART", 1, 1, MAX_PARQUET_ROWS_PER_PART)
    env_flag("CONVNEXT_STAGING", True)  # engine/staging.STAGING_ENV
    for name in HUB_INT_ENV:
        env_int(name, 0, 0, MAX_HUB_TIMEOUT)
