"""One config dataclass for ConvNeXt V1 and V2, read from and written to config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from convnext_cli.errors import CheckpointError

MODEL_TYPES = ("convnext", "convnextv2")

# Every size the two papers define: (depths, hidden_sizes).  V1 (Liu et al. 2022) names
# tiny..xlarge; V2 (Woo et al. 2023) adds atto..nano and huge.  Both families use the
# same stage widths for a given name.
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


@dataclass
class ConvNextConfig:
    """Architecture and labels of a ConvNeXt V1 or V2 model (field names follow config.json)."""

    model_type: str = "convnext"
    num_channels: int = 3
    patch_size: int = 4
    num_stages: int = 4
    hidden_sizes: list[int] = field(default_factory=lambda: [96, 192, 384, 768])
    depths: list[int] = field(default_factory=lambda: [3, 3, 9, 3])
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    layer_scale_init_value: float = 1e-6
    image_size: int = 224
    id2label: dict[int, str] = field(default_factory=dict)

    @property
    def is_v2(self) -> bool:
        return self.model_type == "convnextv2"

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def labels(self) -> list[str]:
        return [self.id2label.get(i, f"LABEL_{i}") for i in range(self.num_labels)]

    @property
    def base_prefix(self) -> str:
        """The attribute name of the backbone in transformers' classification model."""
        return self.model_type

    @classmethod
    def from_size(cls, size: str, *, v2: bool = False, num_labels: int = 1000) -> ConvNextConfig:
        if size not in SIZES:
            raise CheckpointError(f"unknown ConvNeXt size {size!r}; known: {', '.join(SIZES)}")
        depths, widths = SIZES[size]
        return cls(
            model_type="convnextv2" if v2 else "convnext",
            depths=list(depths),
            hidden_sizes=list(widths),
            layer_scale_init_value=0.0 if v2 else 1e-6,
            id2label={i: f"LABEL_{i}" for i in range(num_labels)},
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, where: str = "config.json") -> ConvNextConfig:
        """Read a transformers config.json dict; missing fields take transformers' defaults."""
        model_type = raw.get("model_type", "convnext")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(
                f"{where}: model_type {model_type!r} is not a ConvNeXt model "
                f"(expected one of {', '.join(MODEL_TYPES)})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known and k != "id2label"}
        cfg = cls(**kwargs)
        if model_type == "convnextv2":
            cfg.layer_scale_init_value = 0.0
        cfg.patch_size = _as_int(cfg.patch_size, "patch_size", where)
        cfg.image_size = _as_int(cfg.image_size, "image_size", where)
        cfg.hidden_sizes = [int(x) for x in cfg.hidden_sizes]
        cfg.depths = [int(x) for x in cfg.depths]
        cfg.id2label = _read_id2label(raw)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config.json") -> None:
        if self.num_stages < 1 or len(self.depths) < self.num_stages:
            raise CheckpointError(
                f"{where}: num_stages={self.num_stages} but depths has {len(self.depths)} entries"
            )
        if len(self.hidden_sizes) < self.num_stages:
            raise CheckpointError(
                f"{where}: num_stages={self.num_stages} but hidden_sizes has "
                f"{len(self.hidden_sizes)} entries"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise CheckpointError(
                f"{where}: hidden_act {self.hidden_act!r} is not supported "
                f"(supported: {', '.join(sorted(ACTIVATIONS))})"
            )

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers' ConvNextConfig/ConvNextV2Config reads."""
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "num_channels": self.num_channels,
            "patch_size": self.patch_size,
            "num_stages": self.num_stages,
            "hidden_sizes": list(self.hidden_sizes),
            "depths": list(self.depths),
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "image_size": self.image_size,
        }
        if not self.is_v2:
            out["layer_scale_init_value"] = self.layer_scale_init_value
        if self.id2label:
            out["id2label"] = {str(i): name for i, name in sorted(self.id2label.items())}
            out["label2id"] = {name: i for i, name in sorted(self.id2label.items())}
        return out


# transformers' ACT2FN names that ConvNeXt configs use, mapped to torch functional names.
ACTIVATIONS: dict[str, str] = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _as_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{where}: non-square {name} {list(value)} is not supported")
        value = value[0]
    return int(value)


def _read_id2label(raw: dict[str, Any]) -> dict[int, str]:
    """id2label as ints; a config without it gets `num_labels` generic names (transformers: 2)."""
    id2label = raw.get("id2label")
    if id2label:
        return {int(k): str(v) for k, v in id2label.items()}
    num_labels = int(raw.get("num_labels", 2))
    return {i: f"LABEL_{i}" for i in range(num_labels)}
