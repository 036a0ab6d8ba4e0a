"""Option and argument aliases shared by the commands (one definition, one help text).

- Choice lists are the ``Literal`` types of :mod:`convnext_cli.choices`, the one table the
  core's tuples are built from too: Typer shows them in ``--help``, completes them in the
  shell, refuses anything else with its usage message (exit 2) and hands the commands plain
  strings.
- Every value shows a readable metavar (``PATH``, ``N``, ``MODEL``, ``DEVICE``...); flags show
  none, ``--help`` included (:data:`HelpOpt` replaces Typer's own).
- :data:`SHARED` declares the options classify and embed share exactly once (their
  :func:`shared_options`); :func:`model_options` (benchmark) and :func:`hub_options`
  (convert) hand out parts of them; :func:`with_parameters` is the mechanism.

Nothing here imports torch, PIL or numpy: ``convnext --help`` stays fast.
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from convnext_cli.choices import DEFAULT_MODEL, Decoder, Dtype, Engine
from convnext_cli.limits import MAX_BATCH_SIZE, MAX_REPLICAS, MAX_WORKERS

F = TypeVar("F", bound=Callable[..., Any])

# ------------------------------------------------------------------------------- devices

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def parse_device(value: str) -> str:
    """``--device``: auto, cpu, cuda, cuda:N or mps (whether it exists is checked at load)."""
    if isinstance(value, str) and _DEVICE.fullmatch(value.strip().lower()):
        return value.strip().lower()
    raise typer.BadParameter(f"{value!r} is not auto, cpu, cuda, cuda:N or mps")


def _complete_device(incomplete: str) -> list[str]:
    return [d for d in ("auto", "cpu", "cuda", "cuda:0", "mps") if d.startswith(incomplete)]


# ------------------------------------------------------------------------------- panels

MODEL_PANEL = "Model and device"
INPUT_PANEL = "Inputs"
OUTPUT_PANEL = "Output, progress and resuming"
RESUME_PANEL = OUTPUT_PANEL  # one box: --help stays short
RAY_PANEL = "Ray engine"

# ------------------------------------------------------------------------------- aliases


def _show_help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help(), nl=False)
        raise typer.Exit()


HelpOpt = Annotated[
    bool,
    typer.Option(
        "--help",
        "-h",
        metavar="",
        is_eager=True,
        expose_value=False,
        callback=_show_help,
        help="Show this message and exit.",
    ),
]
InputsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="INPUTS",
        help="Image files, folders, globs, .tar shards, .parquet files; '-': paths on stdin.",
        show_default=False,
    ),
]

# what --help says of each option (by its long name), read together; short, so that
# `classify -h` fits a screen or two at 80 columns (docs/reference.md says the rest)
HELP = {
    "--model": "Hub id (ID@REV too), Hub-layout folder or weights file (any layout).",
    "--revision": "Hub revision (branch, tag or commit); the same as ID@REV.",
    "--cache-dir": "Hub download cache (default: huggingface_hub's, under HF_HOME).",
    "--token": "Hub token for gated or private models (default: HF_TOKEN, or hf auth login's).",
    "--labels": "Class names instead of the checkpoint's: one a line, a JSON list or object.",
    "--device": "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.",
    "--dtype": (
        "auto: float32 on the CPU (bfloat16 with AMX), bfloat16 or float16 on CUDA, said "
        "on stderr; float32 is exact everywhere."
    ),
    "--batch-size": "Images per batch (default: 8 on the CPU; on a GPU by its memory).",
    "--workers": "Decoding processes; 0: decode in this one (default: by device and cores).",
    "--compile": "torch.compile the model (slow first batch; pays off on long runs).",
    "--decode": (
        "Where JPEGs are decoded: cpu (Pillow, bit-exact with transformers; what auto "
        "is) or gpu (nvjpeg, faster)."
    ),
    "--recursive": "Descend into sub-folders of folder inputs.",
    "--null": "Paths on stdin ('-') are NUL-separated (find -print0).",
    "--shard": "Every N-th input from the I-th (0 <= I < N), by listing order.",
    "--image-column": "Parquet inputs: the image bytes column (default: image, jpg, png ...).",
    "--id-column": "Parquet inputs: the column records name (default: id, key, path ...).",
    "--output": (
        "Write to FILE, not stdout; its extension picks the format. Moved into place "
        "when done; never over an input or a checkpoint."
    ),
    "--quiet": "No notes, progress bar or summary; warnings and errors still print.",
    "--no-progress": "No progress bar (shown only when stderr is a terminal).",
    "--resume": "Continue an interrupted run into the same -o FILE (jsonl, csv, parquet).",
    "--retry-errors": "With --resume: do the inputs that failed again.",
    "--force-resume": "With --resume: add to FILE even if another model or setting wrote it.",
    "--engine": "local, or ray (Ray Data: the ray extra).",
    "--ray-address": "--engine ray: the cluster (default: RAY_ADDRESS, else a local Ray).",
    "--replicas": "--engine ray: model replicas (default: one per GPU).",
    "--verbose": "--engine ray: show Ray's own logs and progress.",
    "--no-server": "Run in this process even when `convnext serve` runs (or CONVNEXT_SERVER=0).",
}


def option(panel: str, *names: str, **more: Any) -> Any:
    """An option in ``panel``'s box of --help, its help text from :data:`HELP`."""
    return typer.Option(*names, help=HELP[names[0]], rich_help_panel=panel, **more)


def value(panel: str, *names: str, metavar: str, **more: Any) -> Any:
    """An option with a value whose default (none, or the engine's) its help text says."""
    return option(panel, *names, metavar=metavar, show_default=False, **more)


def flag(panel: str, *names: str) -> Any:
    """An on/off flag (no ``<bool>`` metavar)."""
    return option(panel, *names, metavar="")


def choice(panel: str, name: str) -> Any:
    """One of the values of its ``Literal`` annotation, in any case."""
    return option(panel, name, case_sensitive=False)


ModelOpt = Annotated[str, option(MODEL_PANEL, "--model", "-m", metavar="MODEL")]
RevisionOpt = Annotated[str | None, value(MODEL_PANEL, "--revision", metavar="REV")]
CacheDirOpt = Annotated[Path | None, value(MODEL_PANEL, "--cache-dir", metavar="DIR")]
TokenOpt = Annotated[str | None, value(MODEL_PANEL, "--token", metavar="TOKEN")]
LabelsOpt = Annotated[Path | None, value(MODEL_PANEL, "--labels", metavar="FILE")]
DeviceOpt = Annotated[
    str,
    option(
        MODEL_PANEL,
        "--device",
        metavar="DEVICE",
        parser=parse_device,
        autocompletion=_complete_device,
    ),
]
DtypeOpt = Annotated[Dtype, choice(MODEL_PANEL, "--dtype")]
BatchOpt = Annotated[
    int | None, value(MODEL_PANEL, "--batch-size", "-b", metavar="N", min=1, max=MAX_BATCH_SIZE)
]
WorkersOpt = Annotated[
    int | None, value(MODEL_PANEL, "--workers", metavar="N", min=0, max=MAX_WORKERS)
]
CompileOpt = Annotated[bool, flag(MODEL_PANEL, "--compile")]
DecodeOpt = Annotated[Decoder, choice(MODEL_PANEL, "--decode")]
RecursiveOpt = Annotated[bool, flag(INPUT_PANEL, "--recursive", "-r")]
NullOpt = Annotated[bool, flag(INPUT_PANEL, "--null", "-0")]
ShardOpt = Annotated[str | None, value(INPUT_PANEL, "--shard", metavar="I/N")]
ImageColumnOpt = Annotated[str | None, value(INPUT_PANEL, "--image-column", metavar="NAME")]
IdColumnOpt = Annotated[str | None, value(INPUT_PANEL, "--id-column", metavar="NAME")]
OutputOpt = Annotated[Path | None, value(OUTPUT_PANEL, "--output", "-o", metavar="FILE")]
QuietOpt = Annotated[bool, flag(OUTPUT_PANEL, "--quiet", "-q")]
NoProgressOpt = Annotated[bool, flag(OUTPUT_PANEL, "--no-progress")]
ResumeOpt = Annotated[bool, flag(RESUME_PANEL, "--resume")]
RetryErrorsOpt = Annotated[bool, flag(RESUME_PANEL, "--retry-errors")]
ForceResumeOpt = Annotated[bool, flag(RESUME_PANEL, "--force-resume")]
EngineOpt = Annotated[Engine, choice(RAY_PANEL, "--engine")]
RayAddressOpt = Annotated[str | None, value(RAY_PANEL, "--ray-address", metavar="ADDR")]
ReplicasOpt = Annotated[
    int | None, value(RAY_PANEL, "--replicas", metavar="N", min=1, max=MAX_REPLICAS)
]
VerboseOpt = Annotated[bool, flag(RAY_PANEL, "--verbose", "-v")]
NoServerOpt = Annotated[bool, flag(MODEL_PANEL, "--no-server")]


# ------------------------------------------------------------------- one declaration


# the defaults and names the rule in parameter() does not give
DEFAULTS: dict[str, Any] = {"--model": DEFAULT_MODEL, "--device": "auto"}
NAMES = {"--compile": "compile_model"}  # not the builtin


def parameter(alias: Any) -> inspect.Parameter:
    """The keyword-only parameter an option alias declares: named after its long name
    (``--cache-dir``: ``cache_dir``), its default none for an optional value, off for a
    flag, the first of a choice's values, else as :data:`DEFAULTS` says."""
    kind, info = typing.get_args(alias)
    long_name = info.default  # Typer keeps an Annotated option's first name there
    name = NAMES.get(long_name, long_name.lstrip("-").replace("-", "_"))
    if long_name in DEFAULTS:
        default = DEFAULTS[long_name]
    elif kind is bool:
        default = False
    elif typing.get_origin(kind) is typing.Literal:
        default = typing.get_args(kind)[0]
    else:  # X | None
        default = None
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=alias
    )


# classify's and embed's options, in the order --help shows them, a line a panel
SHARED = [
    parameter(alias)
    for panel in (
        (ModelOpt, RevisionOpt, CacheDirOpt, TokenOpt, LabelsOpt),
        (DeviceOpt, DtypeOpt, BatchOpt, WorkersOpt, CompileOpt, DecodeOpt, NoServerOpt),
        (RecursiveOpt, NullOpt, ShardOpt, ImageColumnOpt, IdColumnOpt),
        (OutputOpt, QuietOpt, NoProgressOpt),
        (ResumeOpt, RetryErrorsOpt, ForceResumeOpt),
        (EngineOpt, RayAddressOpt, ReplicasOpt, VerboseOpt),
    )
    for alias in panel
]
SHARED_PARAMETERS = tuple(p.name for p in SHARED)
SOURCE_PARAMETERS = ("model", "revision", "cache_dir", "token", "labels")
HUB_PARAMETERS = ("revision", "cache_dir", "token")


def _help_parameter(help: HelpOpt = False) -> None:
    """Where :data:`HelpOpt` is read from as a parameter."""


def parameters_of(function: Callable[..., Any]) -> list[inspect.Parameter]:
    """``function``'s parameters with their annotations evaluated (Typer reads them)."""
    hints = typing.get_type_hints(function, include_extras=True)
    return [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(function).parameters.values()
    ]


def with_parameters(command: F, extra: list[inspect.Parameter], keep: bool = True) -> F:
    """``command`` with ``extra`` keyword-only parameters added to the signature Typer sees.

    The command keeps its own parameters; a ``**kwargs`` of it receives the extra ones, or,
    with ``keep=False``, they are not passed on (Typer hands every parameter of the signature
    to the callback, ``expose_value=False`` ones too).
    """
    own = [
        p
        for p in parameters_of(command)
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    ]
    names = {p.name for p in own}
    clash = names & {p.name for p in extra}
    if clash:
        raise TypeError(f"{command.__name__}: parameters declared twice: {sorted(clash)}")
    added = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in extra]
    dropped = set() if keep else {p.name for p in extra}

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        passed = {k: v for k, v in kwargs.items() if k not in dropped}
        return command(*args, **passed)

    parameters = [*own, *added]
    wrapper.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper  # type: ignore[return-value]


def shared_options(command: F) -> F:
    """Give a command the options classify and embed share (:data:`SHARED`).

    The command declares only its own parameters and a ``**shared`` that receives these;
    every choice (its own too) arrives as a plain string.
    """
    return with_parameters(command, SHARED)


def embed_options(command: F) -> F:
    """:func:`shared_options` less ``--labels`` (class names: an embedding has none)."""
    return with_parameters(command, [p for p in SHARED if p.name != "labels"])


def model_options(command: F) -> F:
    """Give a command (benchmark) the checkpoint options, --device, --workers and --decode;
    its ``**model`` receives them."""
    return with_parameters(command, pick(*SOURCE_PARAMETERS, "device", "workers", "decode"))


def hub_options(command: F) -> F:
    """Give a command (convert) --revision, --cache-dir and --token; its ``**hub`` receives
    them."""
    return with_parameters(command, pick(*HUB_PARAMETERS))


def pick(*names: str) -> list[inspect.Parameter]:
    """Some of :data:`SHARED`, in its order."""
    return [p for p in SHARED if p.name in names]


def with_help_option(command: F) -> F:
    """``-h/--help`` without Typer's ``<bool>`` metavar (see :data:`HelpOpt`)."""
    return with_parameters(command, parameters_of(_help_parameter), keep=False)
