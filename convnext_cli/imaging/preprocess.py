"""Resize, crop and normalise exactly as transformers' ``ConvNextImageProcessor`` does.

The spec comes from a checkpoint's ``preprocessor_config.json``; fields it lacks take that
processor's defaults (short side 384, crop_pct 224/256, bicubic, rescale 1/255, mean and
std 0.5).  The geometry:

- ``shortest_edge < 384``: resize the short side to ``int(shortest_edge / crop_pct)``, the
  long side to ``int(new_short * long / short)``, then centre-crop ``shortest_edge`` square
  (offsets rounded down, zero padding if the image is smaller);
- ``shortest_edge >= 384``: warp to ``shortest_edge`` square, no crop.

Resizing runs on uint8 (C, H, W) tensors with the antialiased kernels torchvision's resize
uses, as the processor does, so the pixels are bit-identical.  The split between
:meth:`resize_and_crop` (uint8, in DataLoader workers) and :meth:`normalize` (float, on the
target device) keeps the bytes that cross processes and the host-to-device copy 4x smaller.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convnext_cli.errors import CheckpointError
from convnext_cli.imaging.resize import (
    BATCHED_FILTERS,
    center_crop,
    resize_crop,
    resize_crop_batch,
)
from convnext_cli.model._fields import Fields, is_int, is_number, json_kind, read_json_object
from convnext_cli.model.config import (
    FLOAT32_MAX,
    MAX_EDGE,
    MAX_RESIZE_EDGE,
    ConvNextConfig,
    float32,
)

# PIL.Image.Resampling values, as preprocessor_config.json stores them (the one table of
# filters: timm's ``interpolation`` names are the same words).
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
RESAMPLE_CODES = {name: code for code, name in RESAMPLE_NAMES.items()}
BICUBIC, BILINEAR = RESAMPLE_CODES["bicubic"], RESAMPLE_CODES["bilinear"]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# What a checkpoint without a preprocessor_config.json gets (SPEC): short side 224, crop_pct
# 0.875, bicubic, ImageNet mean/std.
DEFAULT_IMAGE_SIZE = 224
DEFAULT_CROP_PCT = 0.875

# torchvision's ConvNeXt weights: the eval transform resizes the short side (bilinear) to
# this, then centre-crops 224.  Keyed by (depths, hidden_sizes).
TORCHVISION_RESIZE: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {
    ((3, 3, 9, 3), (96, 192, 384, 768)): 236,  # convnext_tiny
    ((3, 3, 27, 3), (96, 192, 384, 768)): 230,  # convnext_small
    ((3, 3, 27, 3), (128, 256, 512, 1024)): 232,  # convnext_base
    ((3, 3, 27, 3), (192, 384, 768, 1536)): 232,  # convnext_large
}
TORCHVISION_CROP = 224


@dataclass(frozen=True)
class PreprocessSpec:
    """What a checkpoint's preprocessor_config.json asks for (transformers' defaults otherwise)."""

    shortest_edge: int = 384
    crop_pct: float = 224 / 256
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = IMAGENET_STANDARD_STD
    do_center_crop: bool = False
    crop_size: tuple[int, int] | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str = "preprocessor_config.json") -> PreprocessSpec:
        """Read a preprocessor_config.json dict, every field checked (one line naming it).

        Missing fields take the processor's defaults.  Refused: a size without
        ``shortest_edge`` or outside 1..:data:`MAX_EDGE`; ``crop_pct`` outside (0, 1] or
        resizing past :data:`MAX_RESIZE_EDGE`; ``resample`` other than 0..5; mean/std not
        one number or three, or not finite; a std of 0 or below; ``rescale_factor`` not
        finite and > 0; flags that are not JSON booleans; null for any of these; and any
        combination whose normalisation cannot give finite float32 pixels.
        """
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: expected a JSON object, found {json_kind(raw)}")
        spec = cls(**_SpecFields(raw, where).read())
        _check_resize(spec, where)
        _check_normalisation(spec, where)
        return spec

    @classmethod
    def from_file(cls, path: Path) -> PreprocessSpec:
        """:meth:`from_dict` on a JSON file (duplicate keys refused)."""
        return cls.from_dict(read_json_object(path), where=str(path))

    @classmethod
    def imagenet(
        cls,
        size: int = DEFAULT_IMAGE_SIZE,
        crop_pct: float = DEFAULT_CROP_PCT,
        resample: int = BICUBIC,
        mean: Iterable[float] = IMAGENET_DEFAULT_MEAN,
        std: Iterable[float] = IMAGENET_DEFAULT_STD,
    ) -> PreprocessSpec:
        """A complete spec with every field explicit (transformers' own defaults, size 384
        and mean/std 0.5, are not the ImageNet ones)."""
        return cls(
            shortest_edge=int(size),
            crop_pct=float(crop_pct),
            resample=int(resample),
            image_mean=tuple(float(x) for x in mean),
            image_std=tuple(float(x) for x in std),
        )

    @classmethod
    def for_layout(cls, layout: str, config: ConvNextConfig) -> PreprocessSpec:
        """What a checkpoint of ``layout`` that comes without a preprocessor config gets.

        SPEC defaults (short side ``config.image_size``, crop_pct 0.875, bicubic, ImageNet
        mean/std), except torchvision's tiny/small/base/large weights: bilinear, short side
        to 236/230/232 then a 224 crop, written as crop_pct = 224/236 etc.
        """
        if layout == "torchvision":
            shape = (tuple(config.depths), tuple(config.hidden_sizes))
            resize = TORCHVISION_RESIZE.get(shape)
            if resize is not None:
                crop_pct = exact_crop_pct(TORCHVISION_CROP, resize)
                return cls.imagenet(config.image_size, crop_pct, BILINEAR)
        return cls.imagenet(config.image_size)

    @classmethod
    def from_timm_config(cls, raw: Mapping[str, Any]) -> PreprocessSpec | None:
        """The preprocessing a timm Hub repo's ``config.json`` (``pretrained_cfg``) describes.

        None when it has no ``pretrained_cfg``.  timm resizes the short side to
        ``floor(size / crop_pct)`` and centre-crops, the rule transformers applies below 384;
        timm's 384 weights use ``crop_mode: squash`` with crop_pct 1.0, which is
        transformers' warp at 384 and above.
        """
        cfg = raw.get("pretrained_cfg")
        if not isinstance(cfg, Mapping):
            return None
        input_size = cfg.get("input_size") or (3, DEFAULT_IMAGE_SIZE)
        return cls.imagenet(
            size=int(input_size[-1]),
            crop_pct=float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
            resample=RESAMPLE_CODES.get(str(cfg.get("interpolation", "bicubic")), BICUBIC),
            mean=cfg.get("mean") or IMAGENET_DEFAULT_MEAN,
            std=cfg.get("std") or IMAGENET_DEFAULT_STD,
        )

    def to_dict(self) -> dict[str, Any]:
        """A preprocessor_config.json dict that transformers reads back to the same spec."""
        out: dict[str, Any] = {
            "image_processor_type": "ConvNextImageProcessor",
            "do_resize": self.do_resize,
            "size": {"shortest_edge": self.shortest_edge},
            "crop_pct": self.crop_pct,
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
        if self.do_center_crop and self.crop_size:
            out["do_center_crop"] = True
            out["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        return out

    @property
    def resample_name(self) -> str:
        return RESAMPLE_NAMES[self.resample]

    def resize_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image is resized to, before any crop."""
        edge = self.shortest_edge
        if edge >= 384:
            return edge, edge
        short_target = int(edge / self.crop_pct)
        if width <= height:
            return int(short_target * height / width), short_target
        return short_target, int(short_target * width / height)

    def resize_and_crop(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, h, w) uint8: the processor's resize and crop steps.

        When the resize's full output would be over
        :data:`~convnext_cli.imaging.resize.RESIZE_PIXEL_LIMIT` pixels (an
        extreme aspect ratio: 16000x1 would become 256 x 4,096,000), only the pixels the
        centre crop keeps are computed (see :func:`resize_crop`).
        """
        if self.do_resize:
            height, width = image.shape[-2:]
            crop = (self.shortest_edge, self.shortest_edge) if self.shortest_edge < 384 else None
            image = resize_crop(image, self.resize_size(height, width), self.resample, crop)
        if self.do_center_crop and self.crop_size:
            image = center_crop(image, *self.crop_size)
        return image

    def resize_and_crop_batch(self, images: list[torch.Tensor]) -> torch.Tensor | None:
        """:meth:`resize_and_crop` for images of any sizes as one batched operation
        (:func:`~convnext_cli.imaging.resize.resize_crop_batch`): (n, 3, h, w) uint8, equal
        to the per-image result within a grey level.  None where it does not apply (no
        resizing, or a filter other than bilinear and bicubic): resize image by image."""
        if not images or not self.do_resize or self.resample not in BATCHED_FILTERS:
            return None
        sizes = [self.resize_size(*image.shape[-2:]) for image in images]
        # below 384 a centre crop of edge x edge; from 384 on resized to that, not cropped
        crop = (self.shortest_edge, self.shortest_edge)
        if any(h < crop[0] or w < crop[1] for h, w in sizes):
            return None
        batch = resize_crop_batch(images, sizes, self.resample, crop)
        if self.do_center_crop and self.crop_size:
            batch = center_crop(batch, *self.crop_size)
        return batch

    def normalization(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) as (3, 1, 1) float32 tensors on `device`, the rescale folded in, or
        None without normalisation: built once per run (a tensor made from a list on a GPU
        is a host-to-device copy and a synchronisation)."""
        if not self.do_normalize:
            return None
        mean = torch.tensor(self.image_mean, device=device)
        std = torch.tensor(self.image_std, device=device)
        if self.do_rescale:
            # The processor folds the rescale into mean and std, in float32: (x - m/r) / (s/r).
            mean = mean * (1.0 / self.rescale_factor)
            std = std * (1.0 / self.rescale_factor)
        return mean[:, None, None], std[:, None, None]

    def normalize(
        self,
        batch: torch.Tensor,
        dtype: torch.dtype | None = None,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """uint8 (N, 3, h, w) on any device -> float32 pixel values (rescale, mean/std);
        `stats` is :meth:`normalization` for the batch's device, when the caller keeps it."""
        pixels = batch.to(torch.float32)
        if self.do_normalize:
            mean, std = stats if stats is not None else self.normalization(batch.device)  # type: ignore[misc]
            pixels = (pixels - mean) / std
        elif self.do_rescale:
            pixels = pixels * self.rescale_factor
        return pixels if dtype is None else pixels.to(dtype)


class _SpecFields(Fields):
    """Reading preprocessor_config.json's fields, each failure one line naming the field."""

    def given(self, name: str) -> bool:
        if name not in self.raw:
            return False
        if self.raw[name] is None:
            raise self.fail(name, "is null (leave the field out for the default)")
        return True

    def edge(self, name: str, value: Any, limit: int = MAX_EDGE) -> int:
        return self.bounded_int(name, value, (1, limit), "an integer number of pixels")

    def number(self, name: str) -> float:
        value = self.raw[name]
        if not is_number(value) or not math.isfinite(float(value)):
            raise self.fail(name, f"expected a finite number, found {json_kind(value)}")
        return float(value)

    def read(self) -> dict[str, Any]:
        """The dataclass fields the config gives (missing ones keep the defaults)."""
        kwargs: dict[str, Any] = {}
        for read in (self._size, self._numbers, self._resample, self._flags, self._mean_std):
            kwargs.update(read())
        if any(s <= 0 for s in kwargs.get("image_std", ())):
            raise self.fail(
                "image_std", f"{list(kwargs['image_std'])}: every entry must be above 0"
            )
        kwargs.update(self._center_crop())
        return kwargs

    def _size(self) -> dict[str, Any]:
        if not self.given("size"):
            return {}
        size = self.raw["size"]
        if not isinstance(size, dict):
            return {"shortest_edge": self.edge("size", size)}
        if "shortest_edge" not in size:
            raise self.fail("size", f"ConvNeXt preprocessing needs size.shortest_edge, got {size}")
        return {"shortest_edge": self.edge("size.shortest_edge", size["shortest_edge"])}

    def _numbers(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.given("crop_pct"):
            crop_pct = self.number("crop_pct")
            if not 0 < crop_pct <= 1:
                raise self.fail("crop_pct", f"{crop_pct} is out of range (0, 1]")
            out["crop_pct"] = crop_pct
        if self.given("rescale_factor"):
            factor = self.number("rescale_factor")
            if factor <= 0:
                raise self.fail("rescale_factor", f"{factor} must be greater than 0")
            out["rescale_factor"] = factor
        return out

    def _resample(self) -> dict[str, Any]:
        if not self.given("resample"):
            return {}
        resample = self.raw["resample"]
        if not is_int(resample) or resample not in RESAMPLE_NAMES:
            filters = ", ".join(f"{k} {v}" for k, v in RESAMPLE_NAMES.items())
            raise self.fail("resample", f"{json_kind(resample)} is not a filter (0..5: {filters})")
        return {"resample": int(resample)}

    def _flags(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if self.given(key):
                if not isinstance(self.raw[key], bool):
                    raise self.fail(
                        key, f"expected true or false, found {json_kind(self.raw[key])}"
                    )
                out[key] = self.raw[key]
        return out

    def _mean_std(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("image_mean", "image_std"):
            if self.given(key):
                value = self.raw[key]
                values = [value] * 3 if is_number(value) else value
                if (
                    not isinstance(values, (list, tuple))
                    or len(values) != 3
                    or not all(is_number(v) and math.isfinite(float(v)) for v in values)
                ):
                    raise self.fail(
                        key, f"expected 3 finite numbers (or one), found {json_kind(value)}"
                    )
                out[key] = tuple(float(v) for v in values)
        return out

    def _center_crop(self) -> dict[str, Any]:
        """Optional extras: null means not set (transformers writes them so)."""
        out: dict[str, Any] = {}
        center = self.raw.get("do_center_crop")
        if center is not None:
            if not isinstance(center, bool):
                raise self.fail(
                    "do_center_crop", f"expected true or false, found {json_kind(center)}"
                )
            out["do_center_crop"] = center
        crop = self.raw.get("crop_size")
        if crop is None:
            return out
        if isinstance(crop, dict) and "height" in crop and "width" in crop:
            height = self.edge("crop_size.height", crop["height"])
            out["crop_size"] = (height, self.edge("crop_size.width", crop["width"]))
        elif isinstance(crop, dict):
            raise self.fail("crop_size", f"expected height and width, found {json_kind(crop)}")
        else:
            side = self.edge("crop_size", crop)
            out["crop_size"] = (side, side)
        return out


def _check_resize(spec: PreprocessSpec, where: str) -> None:
    """The short side after ``size / crop_pct`` stays under MAX_RESIZE_EDGE."""
    if spec.do_resize and spec.shortest_edge < 384:
        target = int(spec.shortest_edge / spec.crop_pct)
        if target > MAX_RESIZE_EDGE:
            raise CheckpointError(
                f"{where}: crop_pct: size {spec.shortest_edge} / crop_pct {spec.crop_pct} "
                f"resizes the short side to {target} pixels (at most {MAX_RESIZE_EDGE})"
            )


def _check_normalisation(spec: PreprocessSpec, where: str) -> None:
    """Normalisation is affine per channel: pixels 0 and 255 bound all others, and must
    stay finite in float32."""
    if spec.do_rescale and spec.do_normalize:
        scale = 1.0 / spec.rescale_factor
        means = [float32(m * scale) for m in spec.image_mean]
        stds = [float32(s * scale) for s in spec.image_std]
    elif spec.do_normalize:
        means, stds = list(spec.image_mean), list(spec.image_std)
    else:
        means, stds = [0.0] * 3, [float32(1.0 / spec.rescale_factor)] * 3
    for m, s in zip(means, stds, strict=True):
        values = [m, s] + [(p - m) / s if s else math.inf for p in (0.0, 255.0)]
        if not all(math.isfinite(v) and abs(v) < FLOAT32_MAX for v in values):
            raise CheckpointError(
                f"{where}: image_mean, image_std and rescale_factor give non-finite "
                f"pixel values (mean {list(spec.image_mean)}, std {list(spec.image_std)}, "
                f"rescale_factor {spec.rescale_factor})"
            )


def exact_crop_pct(crop: int, resize: int) -> float:
    """A crop_pct for which ``int(crop / crop_pct) == resize`` holds exactly in float arithmetic."""
    if not 0 < crop <= resize:
        raise ValueError(f"crop {crop} must be positive and at most resize {resize}")
    pct = crop / resize
    for _ in range(64):
        got = int(crop / pct)
        if got == resize:
            return pct
        pct = math.nextafter(pct, 0.0 if got < resize else 1.0)
    raise ValueError(f"no float crop_pct gives int({crop} / crop_pct) == {resize}")
