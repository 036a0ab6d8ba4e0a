"""One config dataclass for ConvNeXt V1 and V2, read from and written to config.json."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from convnext_cli.errors import CheckpointError
from convnext_cli.model._fields import Fields, is_int, is_number, json_kind
from convnext_cli.model.labels import label_name, labels_for

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
    # transformers' backbone (ConvNextBackbone): the stages whose LayerNorm the weights hold
    # (``hidden_states_norms.<stage>``), and the config.json's out_features / out_indices
    backbone_norms: list[str] = field(default_factory=list)
    out_features: list[str] | None = None

    @property
    def stage_names(self) -> list[str]:
        """``stem``, ``stage1`` .. ``stageN``: transformers' names of ``hidden_states[i]``."""
        return ["stem", *(f"stage{i}" for i in range(1, self.num_stages + 1))]

    @property
    def is_v2(self) -> bool:
        return self.model_type == "convnextv2"

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def labels(self) -> list[str]:
        return [self.id2label.get(i, label_name(i)) for i in range(self.num_labels)]

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
            id2label={i: label_name(i) for i in range(num_labels)},
        )

    @classmethod
    def from_dict(cls, raw: Any, *, where: str = "config.json") -> ConvNextConfig:
        """Read a transformers config.json dict; missing fields take transformers' defaults.

        Every field the model uses is checked for type and range first (see
        :data:`LIMITS`), so a hostile config is refused with one line naming the file and
        the field before anything is built from it.
        """
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: expected a JSON object, found {json_kind(raw)}")
        model_type = raw.get("model_type", "convnext")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(
                f"{where}: model_type {model_type!r} is not a ConvNeXt model "
                f"(expected one of {', '.join(MODEL_TYPES)})"
            )
        field_check = _Fields(raw, where)
        depths = field_check.int_list("depths", LIMITS["depths"], [3, 3, 9, 3])
        hidden_sizes = field_check.int_list("hidden_sizes", LIMITS["hidden_sizes"], None)
        num_stages = field_check.integer("num_stages", LIMITS["num_stages"], len(depths))
        if hidden_sizes is None:
            hidden_sizes = [96, 192, 384, 768]
        cfg = cls(
            model_type=model_type,
            num_channels=field_check.integer("num_channels", LIMITS["num_channels"], 3),
            patch_size=field_check.square("patch_size", LIMITS["patch_size"], 4),
            num_stages=num_stages,
            hidden_sizes=hidden_sizes,
            depths=depths,
            hidden_act=field_check.choice("hidden_act", ACTIVATIONS, "gelu"),
            layer_norm_eps=field_check.number("layer_norm_eps", 0.0, 1.0, 1e-12, low_open=True),
            layer_scale_init_value=field_check.number(
                "layer_scale_init_value", 0.0, 1e6, 1e-6, low_open=False
            ),
            image_size=field_check.square("image_size", LIMITS["image_size"], 224),
            id2label=field_check.id2label(),
        )
        if model_type == "convnextv2":
            cfg.layer_scale_init_value = 0.0
        cfg.validate(where)
        cfg.out_features = _out_features(raw, cfg.stage_names, where)
        return cfg

    @classmethod
    def from_state_dict(
        cls, body: Mapping[str, Tensor], *, layer_norm_eps: float = 1e-6, where: str = "weights"
    ) -> ConvNextConfig:
        """What transformers-named tensors (without the backbone prefix) describe.

        V1 vs V2 from GRN keys, depths from block indices, widths, patch size, channels and
        labels from shapes (ImageNet names for 1000 or 21841 classes, ``LABEL_i`` otherwise;
        none for a headless model).  Keys and shapes are checked once, by the strict load
        of the model built from this config.
        """
        stem = body.get("embeddings.patch_embeddings.weight")
        if stem is None or stem.ndim != 4 or stem.shape[2] != stem.shape[3]:
            shape = None if stem is None else list(stem.shape)
            raise CheckpointError(f"{where}: no square patch-embedding convolution ({shape})")
        depths = _stage_depths(body, where)
        hidden = [int(stem.shape[0])]
        for stage in range(1, len(depths)):
            down = body.get(f"encoder.stages.{stage}.downsampling_layer.1.weight")
            if down is None or down.ndim != 4:
                shape = None if down is None else list(down.shape)
                raise CheckpointError(f"{where}: stage {stage} has no downsampling conv ({shape})")
            hidden.append(int(down.shape[0]))
        classifier = body.get("classifier.weight")
        if classifier is not None and classifier.ndim != 2:
            raise CheckpointError(f"{where}: classifier.weight {list(classifier.shape)} is not 2-D")
        v2 = any(".grn." in k for k in body)
        layer_scale = any(k.endswith(".layer_scale_parameter") for k in body)
        num_labels = 0 if classifier is None else int(classifier.shape[0])
        names = ["stem", *(f"stage{i}" for i in range(1, len(depths) + 1))]
        norms = {m.group(1) for k in body if (m := _NORM_KEY.fullmatch(k))}
        return cls(
            model_type="convnextv2" if v2 else "convnext",
            num_channels=int(stem.shape[1]),
            patch_size=int(stem.shape[2]),
            num_stages=len(depths),
            hidden_sizes=hidden,
            depths=depths,
            layer_norm_eps=layer_norm_eps,
            layer_scale_init_value=1e-6 if layer_scale and not v2 else 0.0,
            id2label=dict(enumerate(labels_for(num_labels))),
            backbone_norms=[n for n in names if n in norms] + sorted(norms - set(names)),
        )

    def architecture_differences(self, other: ConvNextConfig) -> str | None:
        """The first architecture field (or label count) in which ``other`` differs, as a
        phrase: ``depths is [3, 3, 9, 3] but the weights have [2, 2, 6, 2]``."""
        for name in ("model_type", "num_stages", "depths", "hidden_sizes", "num_channels"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} is {mine!r} but the weights have {theirs!r}"
        if self.patch_size != other.patch_size:
            return f"patch_size is {self.patch_size!r} but the weights have {other.patch_size!r}"
        if other.num_labels and self.num_labels != other.num_labels:
            return (
                f"num_labels/id2label name {self.num_labels} labels but the classifier has "
                f"{other.num_labels} rows"
            )
        return None

    def describe(self) -> str:
        """``ConvNeXt V2, depths [2, 2, 6, 2], widths [40, 80, 160, 320], 1000 labels``."""
        family = "ConvNeXt V2" if self.is_v2 else "ConvNeXt V1"
        head = f"{self.num_labels} labels" if self.num_labels else "no head (feature model)"
        return f"{family}, depths {self.depths}, widths {self.hidden_sizes}, {head}"

    def validate(self, where: str = "config.json") -> None:
        """Fields that must agree with each other, and a bound on the model's size."""
        if len(self.depths) != self.num_stages:
            raise CheckpointError(
                f"{where}: num_stages is {self.num_stages} but depths has "
                f"{len(self.depths)} entries"
            )
        if len(self.hidden_sizes) != self.num_stages:
            raise CheckpointError(
                f"{where}: num_stages is {self.num_stages} but hidden_sizes has "
                f"{len(self.hidden_sizes)} entries"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise CheckpointError(
                f"{where}: hidden_act {self.hidden_act!r} is not supported "
                f"(supported: {', '.join(sorted(ACTIVATIONS))})"
            )
        params = self.approx_parameters()
        if params > MAX_PARAMETERS:
            raise CheckpointError(
                f"{where}: depths {self.depths} and hidden_sizes {self.hidden_sizes} describe "
                f"a model of about {params:.3g} parameters (the limit is {MAX_PARAMETERS:.0e})"
            )

    def approx_parameters(self) -> int:
        """The parameter count this config describes (to within the small norm/bias terms)."""
        total = self.num_channels * self.hidden_sizes[0] * self.patch_size**2
        prev = self.hidden_sizes[0]
        for depth, width in zip(self.depths, self.hidden_sizes, strict=False):
            total += prev * width * 4  # downsampling conv (2x2)
            total += depth * (8 * width * width + 49 * width + 10 * width)
            prev = width
        return total + prev * self.num_labels

    def to_dict(self) -> dict[str, Any]:
        """transformers' config.json for this model (a classifier, or a feature model when
        there are no labels), read back by ``AutoConfig``/``from_pretrained`` and by
        :meth:`from_dict`."""
        base = "ConvNextV2" if self.is_v2 else "ConvNext"
        out: dict[str, Any] = {
            "architectures": [f"{base}ForImageClassification" if self.id2label else f"{base}Model"],
            "model_type": self.model_type,
            "num_channels": self.num_channels,
            "patch_size": self.patch_size,
            "num_stages": self.num_stages,
            "depths": list(self.depths),
            "hidden_sizes": list(self.hidden_sizes),
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "image_size": self.image_size,
            "drop_path_rate": 0.0,
            "initializer_range": 0.02,
        }
        if not self.is_v2:
            out["layer_scale_init_value"] = self.layer_scale_init_value
        if self.id2label:
            out["id2label"] = {str(i): name for i, name in sorted(self.id2label.items())}
            out["label2id"] = {name: i for i, name in sorted(self.id2label.items())}
        if self.backbone_norms:  # a backbone's weights: which maps it gives
            out["out_features"] = list(self.out_features or self.backbone_norms)
            out["stage_names"] = self.stage_names
        return out


_NORM_KEY = re.compile(r"hidden_states_norms\.(\w+)\.weight")


def _out_features(raw: dict[str, Any], names: list[str], where: str) -> list[str] | None:
    """config.json's ``out_features`` (stage names) or ``out_indices`` (0 = stem), checked."""
    features, indices = raw.get("out_features"), raw.get("out_indices")
    if features is None and indices is None:
        return None
    if features is not None:
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise CheckpointError(f"{where}: out_features must be a list of stage names")
        unknown = [f for f in features if f not in names]
        if unknown:
            raise CheckpointError(
                f"{where}: out_features {unknown} are not stages (use {', '.join(names)})"
            )
        return [n for n in names if n in features]
    if not isinstance(indices, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and -len(names) <= i < len(names)
        for i in indices
    ):
        raise CheckpointError(f"{where}: out_indices must be stage numbers 0..{len(names) - 1}")
    chosen = {names[i] for i in indices}
    return [n for n in names if n in chosen]


_STAGE_KEY = re.compile(r"encoder\.stages\.(\d+)\.(?:layers\.(\d+)|downsampling_layer)\.")


def _stage_depths(body: Mapping[str, Tensor], where: str) -> list[int]:
    """Blocks per stage, from the key names (stages and blocks numbered 0..n-1)."""
    blocks_of: dict[int, set[int]] = {}
    for key in body:
        m = _STAGE_KEY.match(key)
        if m:
            found = blocks_of.setdefault(int(m.group(1)), set())
            if m.group(2) is not None:
                found.add(int(m.group(2)))
    num_stages = max(blocks_of, default=-1) + 1
    if num_stages == 0 or sorted(blocks_of) != list(range(num_stages)):
        raise CheckpointError(f"{where}: stages {_numbers(blocks_of)} are not numbered 0..n-1")
    for stage, blocks in blocks_of.items():
        if sorted(blocks) != list(range(len(blocks))):
            raise CheckpointError(
                f"{where}: stage {stage}: blocks {_numbers(blocks)} are not numbered 0..n-1"
            )
    return [len(blocks_of[s]) for s in range(num_stages)]


def _numbers(values: Iterable[int], limit: int = 8) -> str:
    shown = sorted(values)
    return str(shown[:limit])[:-1] + (", ...]" if len(shown) > limit else "]")


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


# Ranges a config.json field must lie in (inclusive).  Generous next to every published
# ConvNeXt (depth 27, width 2816, 21841 labels, 512 px), tight enough that a hostile
# config is refused before anything is built from it.
LIMITS: dict[str, tuple[int, int]] = {
    "depths": (1, 1024),
    "hidden_sizes": (1, 65536),
    "num_stages": (1, 16),
    "num_channels": (1, 64),
    "patch_size": (1, 1024),
    "image_size": (1, 65536),
    "num_labels": (1, 1_000_000),
}
MAX_PARAMETERS = 20_000_000_000


# Limits on preprocessor_config.json (published ConvNeXt checkpoints use 224..512 pixels),
# checked by PreprocessSpec.from_dict.
MAX_EDGE = 4096  # size.shortest_edge and crop_size
MAX_RESIZE_EDGE = 8192  # int(shortest_edge / crop_pct): the short side before the crop
FLOAT32_MAX = 3.4028234663852886e38


def float32(value: float) -> float:
    """``value`` as float32 would hold it, as far as range goes (inf past float32's range)."""
    return value if abs(value) < FLOAT32_MAX else math.copysign(math.inf, value)


class _Fields(Fields):
    """Typed, range-checked reads of config.json fields; errors name the file and field."""

    def integer(self, name: str, limits: tuple[int, int], default: int) -> int:
        if name not in self.raw:
            return default
        return self.bounded_int(name, self.raw[name], limits)

    def int_list(self, name: str, limits: tuple[int, int], default: list[int] | None) -> list[int]:
        if name not in self.raw:
            return default  # type: ignore[return-value]
        value = self.raw[name]
        if not isinstance(value, (list, tuple)) or not value:
            raise self.fail(
                name, f"expected a non-empty list of integers, found {json_kind(value)}"
            )
        if len(value) > LIMITS["num_stages"][1]:
            raise self.fail(name, f"{len(value)} entries (at most {LIMITS['num_stages'][1]})")
        return [self.bounded_int(name, v, limits) for v in value]

    def square(self, name: str, limits: tuple[int, int], default: int) -> int:
        """An integer, or a list of equal integers (transformers accepts [4, 4])."""
        if name not in self.raw:
            return default
        value = self.raw[name]
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise self.fail(name, f"expected an integer or [h, w], found {len(value)} entries")
            sides = [self.bounded_int(name, v, limits) for v in value]
            if sides[0] != sides[1]:
                raise self.fail(name, f"non-square {sides} is not supported")
            return sides[0]
        return self.bounded_int(name, value, limits)

    def number(
        self, name: str, low: float, high: float, default: float, *, low_open: bool
    ) -> float:
        if name not in self.raw:
            return default
        value = self.raw[name]
        if not is_number(value):
            raise self.fail(name, f"expected a number, found {json_kind(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise self.fail(name, f"{value} is not finite")
        if value > high or value < low or (low_open and value == low):
            interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            raise self.fail(name, f"{value} is out of range {interval}")
        return value

    def choice(self, name: str, choices: dict[str, str], default: str) -> str:
        if name not in self.raw:
            return default
        value = self.raw[name]
        if not isinstance(value, str) or value not in choices:
            raise self.fail(
                name,
                f"{json_kind(value)} is not supported (supported: {', '.join(sorted(choices))})",
            )
        return value

    def id2label(self) -> dict[int, str]:
        """Labels 0..n-1 from ``id2label`` (keys are integer strings, no gaps, no duplicates),
        else ``num_labels`` generic names (transformers' default: 2); the two must agree."""
        num_labels = self.raw.get("num_labels")
        if num_labels is not None:
            num_labels = self.bounded_int("num_labels", num_labels, LIMITS["num_labels"])
        raw = self.raw.get("id2label")
        if raw is None:
            count = 2 if num_labels is None else num_labels
            return {i: label_name(i) for i in range(count)}
        if not isinstance(raw, dict):
            raise self.fail("id2label", f"expected an object, found {json_kind(raw)}")
        if not raw:
            raise self.fail("id2label", "is empty")
        if len(raw) > LIMITS["num_labels"][1]:
            raise self.fail("id2label", f"{len(raw)} labels (at most {LIMITS['num_labels'][1]})")
        labels: dict[int, str] = {}
        for key, name in raw.items():
            index = _label_index(key)
            if index is None:
                raise self.fail("id2label", f"key {key!r} is not a non-negative integer")
            if index in labels:
                raise self.fail("id2label", f"index {index} appears twice")
            if not isinstance(name, str):
                raise self.fail("id2label", f"label {key!r} is {json_kind(name)}, not a string")
            labels[index] = name
        missing = next((i for i in range(len(labels)) if i not in labels), None)
        if missing is not None:
            raise self.fail(
                "id2label",
                f"keys must be 0..{len(labels) - 1} without gaps (no {missing}, but {max(labels)})",
            )
        if num_labels is not None and num_labels != len(labels):
            raise self.fail("num_labels", f"{num_labels} but id2label names {len(labels)} labels")
        return dict(sorted(labels.items()))


def _label_index(key: Any) -> int | None:
    """A JSON key as a label index: ASCII digits only (``"7"``; not ``"-1"``, ``"1.0"``)."""
    if is_int(key):
        return key if key >= 0 else None
    if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9:
        return int(key)
    return None
