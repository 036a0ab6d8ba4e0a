"""Resize kernels: the processor's resize and centre crop on (C, H, W) uint8 tensors.

:class:`convnext_cli.imaging.preprocess.PreprocessSpec` says what to do (sizes, filter, crop);
this module does it: :func:`resize` and :func:`center_crop` as transformers' processor and
torchvision's antialiased ``resize`` do, and :func:`resize_crop`, which past
:data:`RESIZE_PIXEL_LIMIT` computes only the pixels the crop keeps.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Above this many pixels (100 MB of uint8 RGB), a resize computes only what the centre crop
# keeps (see resize_crop).  A 256-pixel short side reaches it at an aspect ratio of 512.
RESIZE_PIXEL_LIMIT = 1 << 25


def resize_crop(
    image: torch.Tensor, size: tuple[int, int], resample: int, crop: tuple[int, int] | None
) -> torch.Tensor:
    """Resize a (C, H, W) uint8 image to `size`, then centre-crop `crop` (None: no crop).

    Up to :data:`RESIZE_PIXEL_LIMIT` output pixels this is :func:`resize` then
    :func:`center_crop`, bit-identical to the processor.  Beyond it (extreme aspect ratios:
    a 65500x1 image resized to a 256-pixel short side is 16.8 million pixels long), the
    full resize would take gigabytes, so only the cropped pixels are computed, from the same
    filter weights (PIL's, which torch's antialiased kernels share), in float32, rounding
    between the horizontal and the vertical pass as both do: equal to the full resize but
    for rare one- or two-level differences (fixed-point weights there), in a few kilobytes.
    """
    if size[0] * size[1] <= RESIZE_PIXEL_LIMIT:
        image = resize(image, size, resample)
        return center_crop(image, *crop) if crop else image
    return _resize_window(image, size, resample, crop or size)


def resize(image: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """Resize a (C, H, W) uint8 image exactly as the processor does.

    Nearest, bilinear, bicubic and Lanczos: as torchvision's ``resize(antialias=True)``.
    torchvision's tensor resize is a thin layer over ``torch.nn.functional.interpolate``;
    this is that layer, so that a run does not import torchvision, whose package import
    pulls in ``torch._dynamo`` (``benchmarks/README.md``, "Importing torchvision").  On CPU,
    bicubic and Lanczos (and bilinear on AVX2/AVX-512/Arm) run torch's native uint8
    kernels; elsewhere it is float, clamp (cubic kernels overshoot), round, back to uint8.

    Box (4) and Hamming (5): torch has no such kernels, and transformers' torchvision
    processor fails on them; its PIL processor (``ConvNextImageProcessorPil``) resizes with
    Pillow, and so does this.
    """

    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if resample in _PIL_ONLY:
        return _pil_resize(image, size, resample)
    mode = _INTERPOLATE_MODES.get(resample)
    if mode is None or (mode == "lanczos" and not _torch_has_lanczos()):
        from torchvision.transforms.v2 import functional as tvF

        return tvF.resize(image, list(size), interpolation=_interpolation(resample), antialias=True)
    batch = image[None]
    native = mode == "nearest-exact" or (
        image.device.type == "cpu" and (mode != "bilinear" or _native_uint8_bilinear())
    )
    if not native:
        batch = batch.to(torch.float32)
    smooth = mode != "nearest-exact"
    out = F.interpolate(
        batch,
        size=list(size),
        mode=mode,
        align_corners=False if smooth else None,
        antialias=smooth,
    )
    if not native:
        if mode in ("bicubic", "lanczos"):
            out = out.clamp_(0, 255)
        out = out.round_().to(torch.uint8)
    return out[0]


_PIL_ONLY = frozenset({4, 5})  # box, hamming


def _pil_resize(image: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """Pillow's resize of a (C, H, W) uint8 image (C = 3 or 1), as transformers' PIL
    processor does it (``image_transforms.resize``: ``PIL.Image.resize`` on the uint8 image)."""

    channels = image.shape[0]
    array = image.permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(np.ascontiguousarray(array if channels != 1 else array[..., 0]))
    resized = np.asarray(pil.resize((size[1], size[0]), resample=resample))
    if resized.ndim == 2:
        resized = resized[..., None]
    return torch.from_numpy(resized.copy()).permute(2, 0, 1).to(image.device)


def _filter_box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _filter_bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _filter_hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x *= math.pi
    return math.sin(x) / x * (0.54 + 0.46 * math.cos(x))


def _filter_bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _filter_lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


# resample -> (support, filter): Pillow's Resample.c, which torch's antialiased kernels follow
_FILTERS = {
    1: (3.0, _filter_lanczos),
    2: (1.0, _filter_bilinear),
    3: (2.0, _filter_bicubic),
    4: (0.5, _filter_box),
    5: (1.0, _filter_hamming),
}


def _axis_weights(
    in_size: int, out_size: int, start: int, stop: int, resample: int
) -> tuple[int, list[list[float]]]:
    """Weights of output indices start..stop-1 of a 1-D resize: (first input index, rows)."""
    scale = in_size / out_size
    spans: list[tuple[int, list[float]]] = []
    if resample == 0:  # nearest-exact
        for i in range(start, stop):
            spans.append((min(int((i + 0.5) * scale), in_size - 1), [1.0]))
    else:
        support, kernel = _FILTERS[resample]
        filterscale = max(scale, 1.0)
        support *= filterscale
        for i in range(start, stop):
            center = (i + 0.5) * scale
            xmin = max(int(center - support + 0.5), 0)
            xmax = min(int(center + support + 0.5), in_size)
            weights = [kernel((x - center + 0.5) / filterscale) for x in range(xmin, xmax)]
            total = sum(weights)
            spans.append((xmin, [w / total for w in weights] if total else weights))
    first = min(x for x, _ in spans)
    last = max(x + len(w) for x, w in spans)
    rows = []
    for x, weights in spans:
        row = [0.0] * (last - first)
        row[x - first : x - first + len(weights)] = weights
        rows.append(row)
    return first, rows


def _crop_span(out_size: int, crop: int) -> tuple[int, int, int]:
    """Where a centre crop of `crop` falls on an axis of `out_size` (zero-padded as
    center_crop pads): (first resized index, last + 1, position of the first in the crop)."""
    if crop > out_size:
        before = (crop - out_size) // 2
        return 0, out_size, before
    top = (out_size - crop) // 2
    return top, top + crop, 0


def _resize_window(
    image: torch.Tensor, size: tuple[int, int], resample: int, crop: tuple[int, int]
) -> torch.Tensor:
    """resize(image, size) then center_crop(crop), computing only the cropped pixels."""
    in_h, in_w = image.shape[-2:]
    row0, row1, at_row = _crop_span(size[0], crop[0])
    col0, col1, at_col = _crop_span(size[1], crop[1])
    first_row, vertical = _axis_weights(in_h, size[0], row0, row1, resample)
    first_col, horizontal = _axis_weights(in_w, size[1], col0, col1, resample)
    device = image.device
    v = torch.tensor(vertical, dtype=torch.float32, device=device)
    h = torch.tensor(horizontal, dtype=torch.float32, device=device)
    window = image[:, first_row : first_row + v.shape[1], first_col : first_col + h.shape[1]]
    # horizontal pass, then vertical, each rounded to uint8 values as Pillow and torch do
    # (rounding half up, as their fixed-point arithmetic does)
    pixels = (window.to(torch.float32) @ h.T).add_(0.5).floor_().clamp_(0, 255)
    pixels = v @ pixels  # (C, rows, cols)
    out = torch.zeros((image.shape[0], *crop), dtype=torch.uint8, device=device)
    out[:, at_row : at_row + pixels.shape[1], at_col : at_col + pixels.shape[2]] = (
        pixels.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)
    )
    return out


_INTERPOLATE_MODES = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


@lru_cache(maxsize=1)
def _torch_has_lanczos() -> bool:
    """Newer torch has an antialiased Lanczos interpolate (torchvision >= 0.27 relies on it)."""
    try:
        F.interpolate(torch.zeros(1, 1, 4, 4), size=[2, 2], mode="lanczos", antialias=True)
    except (ValueError, NotImplementedError, RuntimeError):
        return False
    return True


def _native_uint8_bilinear() -> bool:
    """torchvision's rule: uint8 bilinear runs natively on AVX2/AVX-512 x86 and on Arm."""
    import platform

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or (
        platform.machine() in ("aarch64", "arm64")
    )


def center_crop(image: torch.Tensor, crop_height: int, crop_width: int) -> torch.Tensor:
    """Centre crop with offsets rounded down; zero-pad first when the image is smaller."""
    height, width = image.shape[-2:]
    if crop_width > width or crop_height > height:
        pad_w = max(crop_width - width, 0)
        pad_h = max(crop_height - height, 0)
        padding = [pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2]
        image = F.pad(image, padding, mode="constant", value=0)
        height, width = image.shape[-2:]
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    return image[..., top : top + crop_height, left : left + crop_width]


def _interpolation(resample: int):
    from torchvision.transforms.v2 import InterpolationMode

    return {
        0: InterpolationMode.NEAREST_EXACT,
        1: InterpolationMode.LANCZOS,
        2: InterpolationMode.BILINEAR,
        3: InterpolationMode.BICUBIC,
        4: InterpolationMode.BOX,
        5: InterpolationMode.HAMMING,
    }[resample]
