"""The ranges of every number the tool takes from a flag or an environment variable.

A value outside its range is a usage error (exit 2, one line naming the flag or variable
and the range), raised where it is parsed: Typer's ``min=``/``max=`` on the options, and
:func:`env_int` / :func:`env_float` for environment variables.  The Python API's arguments
are checked against the same table, by the same code, wherever it takes them
(:func:`check_job_fields` for :class:`~convnext_cli.engine.job.Job` and ``run``; the
``as_*`` functions for ``ImageModel``): a type the docstrings do not name, a ``bool`` or a
float where a whole number goes, a value outside its range or its choices is a UsageError.
The bounds are far above any useful setting and far below what would overflow an index or
exhaust memory before a single image is read.

Nothing here imports torch, PIL or numpy.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from convnext_cli.choices import DECODERS, DTYPES, ENGINES, POOLS, SCORES
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


# ------------------------------------------------------- the Python API's arguments
# The numbers a job takes, by field, with the flag that sets them and their range.
JOB_INTS = {
    "batch_size": ("--batch-size", 1, MAX_BATCH_SIZE),
    "workers": ("--workers", 0, MAX_WORKERS),
    "replicas": ("--replicas", 1, MAX_REPLICAS),
}
# the choices a job's text fields take (None: auto, for device, dtype and decode)
JOB_CHOICES = {
    "scores": ("--scores", SCORES),
    "pool": ("--pool", POOLS),
    "engine": ("--engine", ENGINES),
    "dtype": ("--dtype", DTYPES),
    "decode": ("--decode", DECODERS),
}
JOB_FLAGS = (
    "normalize",
    "backbone",
    "recursive",
    "null",
    "compile_model",
    "resume",
    "retry_errors",
    "force_resume",
    "verbose",
    "quiet",
    "progress",
)
JOB_TEXTS = ("fmt", "image_column", "id_column", "ray_address", "revision", "token")
JOB_PATHS = ("output", "cache_dir", "labels")


def _name(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def as_int(value: Any, what: str, low: int, high: int) -> int:
    """A whole number in [low, high], given as an int (a NumPy integer too) or as text (read
    by :func:`parse_int`, as the CLI reads it); a bool, a float (2.5, nan) or anything else
    is a UsageError naming ``what``."""
    if isinstance(value, str):
        return parse_int(value, what, low, high)
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise UsageError(
            f"{what}: {_name(value)} is not a whole number (use {low} to {high})"
        ) from None
    return parse_int(str(number), what, low, high)


def parse_top_k(value: Any) -> int:
    """``-k`` / ``top_k``: 1 to :data:`MAX_TOP_K` labels per image, or ``all`` (or 0):
    every class, as 0."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return 0
    try:
        return as_int(value, "--top-k", 0, MAX_TOP_K)
    except UsageError:
        raise UsageError(
            f"--top-k: {_name(value)} is not a number from 1 to {MAX_TOP_K}, or all "
            "(every class; 0 too)"
        ) from None


def as_bool(value: Any, what: str) -> bool:
    """True or False (a NumPy bool too); ``"no"``, 0 or None are not taken for one."""
    if type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise UsageError(f"{what}: {_name(value)} is not True or False")


def as_text(value: Any, what: str, choices: Iterable[str] | None = None) -> str:
    """A string (one of ``choices`` when given)."""
    if not isinstance(value, str):
        raise UsageError(f"{what}: {_name(value)} is not a string")
    if choices is not None and value not in tuple(choices):
        raise UsageError(f"{what}: {value!r} is not one of {', '.join(choices)}")
    return value


def as_path(value: Any, what: str) -> str:
    """A path given as ``str``, ``bytes`` or ``os.PathLike``, as a string (``bytes``
    decoded as the file system does, ``os.fsdecode``: any name comes back whole)."""
    if isinstance(value, (str, bytes, os.PathLike)):
        try:
            path = os.fsdecode(value)
        except TypeError:  # a PathLike whose __fspath__ gives something else
            path = None
        if isinstance(path, str):
            return path
    raise UsageError(f"{what}: {_name(value)} is not a path (str, bytes or os.PathLike)")


def as_paths(value: Any, what: str) -> list[str]:
    """One path (``str``, ``bytes``, ``os.PathLike``: one input, never one per character
    or per byte) or an iterable of them, as strings."""
    if isinstance(value, (str, bytes, os.PathLike)):
        return [as_path(value, what)]
    if not isinstance(value, Iterable) or isinstance(value, (dict, bytearray, memoryview)):
        raise UsageError(f"{what}: {_name(value)} is not a path or a list of paths")
    return [as_path(one, f"{what}[{n}]") for n, one in enumerate(value)]


def as_device(value: Any, what: str = "--device") -> str:
    """A device name (``"auto"``, ``"cpu"``, ``"cuda:1"``, a ``torch.device``); None: auto.
    Whether this machine has it is checked when the model loads."""
    if value is None:
        return "auto"
    if type(value).__module__ == "torch" and type(value).__name__ == "device":
        return str(value)
    return as_text(value, what)


def as_dtype(value: Any, what: str = "--dtype") -> str:
    """One of :data:`~convnext_cli.choices.DTYPES` (a ``torch.dtype`` too); None: auto."""
    if value is None:
        return "auto"
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        value = str(value).removeprefix("torch.")
    return as_text(value, what, DTYPES)


def check_job_fields(job: Any) -> None:
    """Every field of a :class:`~convnext_cli.engine.job.Job` checked (and normalised) as the
    CLI's flags are: paths to strings, numbers to their ranges, texts to their choices.
    (The CLI's values pass unchanged; the API's are held to the same table.)"""
    job.inputs = as_paths(job.inputs, "inputs")
    job.model = as_path(job.model, "model")
    job.top_k = parse_top_k(job.top_k)
    job.device = as_device(job.device)
    job.dtype = as_dtype(job.dtype)
    if job.decode is None:
        job.decode = "auto"
    for name, (flag, low, high) in JOB_INTS.items():
        if getattr(job, name) is not None:
            setattr(job, name, as_int(getattr(job, name), flag, low, high))
    for name, (flag, choices) in JOB_CHOICES.items():
        as_text(getattr(job, name), flag, choices)
    for name in JOB_FLAGS:
        as_bool(getattr(job, name), name)
    for name in JOB_TEXTS:
        if getattr(job, name) is not None:
            as_text(getattr(job, name), name)
    for name in JOB_PATHS:
        if getattr(job, name) is not None:
            setattr(job, name, Path(as_path(getattr(job, name), name)))
    stages = [job.stages] if isinstance(job.stages, str) else job.stages
    if not isinstance(stages, Iterable):
        raise UsageError(f"stages: {_name(stages)} is not a stage name or a list of them")
    job.stages = [as_text(stage, "--stage") for stage in stages]
