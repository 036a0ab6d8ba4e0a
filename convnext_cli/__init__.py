"""convnext_cli: exact ConvNeXt / ConvNeXt V2 inference, from the command line or from Python.

    from convnext_cli import ImageModel
    model = ImageModel("facebook/convnext-tiny-224")
    top5 = model.classify("cat.jpg")[0].predictions
    features = model.embed("cat.jpg")[0].embedding

``Classifier`` is the same class under its earlier name.

Inputs are paths (one string is one input), PIL images, NumPy arrays or uint8 tensors, or
a list of them (see :mod:`convnext_cli.api`).

What the CLI runs (inputs, shard, ``-o``, formats, ``--resume``, ``--engine ray``) runs from
Python too, and returns the CLI's exit code (see :mod:`convnext_cli.engine.job`)::

    import convnext_cli
    convnext_cli.run("classify", ["photos/"], output="labels.jsonl", resume=True, top_k=3)

Heavy imports (torch) happen on first use of these names, not on ``import convnext_cli``.
"""

from __future__ import annotations

import sys as _sys


def _started_as_cli() -> bool:
    """The `convnext` script or ``python -m convnext_cli``; not ``import convnext_cli``, and
    not a decoding worker (multiprocessing copies the parent's ``sys.argv`` into a spawned
    child, but not its ``sys.orig_argv``)."""
    argv = getattr(_sys, "orig_argv", [])
    script = _sys.argv[0] if _sys.argv else ""
    name = script.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".exe")
    if name == "convnext" and script in argv:
        return True
    modules = ("convnext_cli", "convnext_cli.__main__")
    return any(a == "-m" and b in modules for a, b in zip(argv, argv[1:], strict=False))


if _started_as_cli():
    # Ctrl-C from our first instruction on: one line and exit 130 (SIGTERM: 143), never a
    # traceback from a half-done import; convnext_cli.engine._interrupts takes over from here.
    # (_signal, the built-in module under `signal`, imports in microseconds: `signal`
    # imports enum first, a window in which Python's own handler would still answer.)
    import _signal
    import os as _os

    def _leave_at_once(signum: int, _frame: object) -> None:
        terminated = signum == _signal.SIGTERM
        try:
            _os.write(2, b"terminated\n" if terminated else b"interrupted\n")
        except OSError:
            pass
        _os._exit(143 if terminated else 130)

    for _signum in (_signal.SIGINT, _signal.SIGTERM):
        try:
            _signal.signal(_signum, _leave_at_once)
        except (ValueError, OSError):  # not the main thread
            pass

from typing import TYPE_CHECKING, Any  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ImageModel",
    "Classifier",
    "Job",
    "load_model",
    "load_checkpoint",
    "run",
    "__version__",
]

if TYPE_CHECKING:
    from convnext_cli.api import Classifier, ImageModel
    from convnext_cli.checkpoints.checkpoint import load_checkpoint
    from convnext_cli.engine.job import Job, run
    from convnext_cli.engine.loading import load_model


def __getattr__(name: str) -> Any:
    if name in ("ImageModel", "Classifier"):
        from convnext_cli import api

        return getattr(api, name)
    if name in ("run", "Job"):
        from convnext_cli.engine import job

        return getattr(job, name)
    if name == "load_model":
        from convnext_cli.engine.loading import load_model

        return load_model
    if name == "load_checkpoint":
        from convnext_cli.checkpoints.checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'convnext_cli' has no attribute {name!r}")
