"""convnext_cli: exact ConvNeXt / ConvNeXt V2 inference, from the command line or from Python.

    from convnext_cli import Classifier
    top5 = Classifier("facebook/convnext-tiny-224").classify("cat.jpg")[0].predictions

Inputs are paths (one string is one input), PIL images, NumPy arrays or uint8 tensors, or
a list of them (see :mod:`convnext_cli.api`).

Heavy imports (torch) happen on first use of these names, not on ``import convnext_cli``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Classifier", "load_model", "load_checkpoint", "__version__"]

if TYPE_CHECKING:
    from convnext_cli.api import Classifier
    from convnext_cli.checkpoints import load_checkpoint
    from convnext_cli.loading import load_model


def __getattr__(name: str) -> Any:
    if name == "Classifier":
        from convnext_cli.api import Classifier

        return Classifier
    if name == "load_model":
        from convnext_cli.loading import load_model

        return load_model
    if name == "load_checkpoint":
        from convnext_cli.checkpoints import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'convnext_cli' has no attribute {name!r}")
