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
    native = mode == "nearest-exact" or uint8_kernel(resample, image.device)
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


def _filter_box(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x <= 0.5)).to(x.dtype)


def _filter_bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_min(0.0)


def _filter_hamming(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    window = torch.sinc(x) * (0.54 + 0.46 * torch.cos(x * math.pi))
    return torch.where(x >= 1.0, torch.zeros_like(x), window)


def _filter_bicubic(x: torch.Tensor) -> torch.Tensor:
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _filter_lanczos(x: torch.Tensor) -> torch.Tensor:
    inside = (x >= -3.0) & (x < 3.0)
    return torch.sinc(x) * torch.sinc(x / 3.0) * inside


# resample -> (support, filter): Pillow's Resample.c, which torch's antialiased kernels follow
_FILTERS = {
    1: (3.0, _filter_lanczos),
    2: (1.0, _filter_bilinear),
    3: (2.0, _filter_bicubic),
    4: (0.5, _filter_box),
    5: (1.0, _filter_hamming),
}


def filter_taps(
    in_sizes: torch.Tensor,
    out_sizes: torch.Tensor,
    starts: torch.Tensor,
    count: int,
    resample: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The taps of a 1-D resize (Pillow's weights, which torch's antialiased kernels share)
    for output indices ``starts[k] .. starts[k] + count - 1`` of `n` resizes at once (sizes
    and starts: (n,) int64 tensors on the CPU).

    Returns (low, taps): output j of resize k is the sum over t of
    ``taps[k, j, t] * input[low[k, j] + t]`` (float64 weights, zero past its last tap).
    """
    f64 = torch.float64
    ins = in_sizes.to(f64)[:, None]
    scale = ins / out_sizes.to(f64)[:, None]
    index = (starts[:, None] + torch.arange(count)).to(f64)  # (n, count)
    if resample == 0:  # nearest-exact
        low = torch.minimum(torch.floor((index + 0.5) * scale), ins - 1)
        return low.long(), torch.ones((*low.shape, 1), dtype=f64)
    support, kernel = _FILTERS[resample]
    filterscale = scale.clamp_min(1.0)
    center = (index + 0.5) * scale
    low = torch.trunc(center - support * filterscale + 0.5).clamp_min(0.0)
    high = torch.minimum(torch.trunc(center + support * filterscale + 0.5), ins)
    x = low[..., None] + torch.arange(max(1, int((high - low).max())), dtype=f64)
    taps = kernel((x - center[..., None] + 0.5) / filterscale[..., None]) * (x < high[..., None])
    total = taps.sum(dim=-1, keepdim=True)
    taps = torch.where(total != 0, taps / torch.where(total != 0, total, 1.0), taps)
    return low.long(), taps


def _dense(low: torch.Tensor, taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first input index (n,), weights (n, count, width)) from :func:`filter_taps`: row j
    of resize k weighs inputs ``first[k] ..`` (the taps move right with j)."""
    first = low[:, 0]
    offsets = (low - first[:, None])[..., None] + torch.arange(taps.shape[-1])
    width = int(offsets.masked_fill(taps == 0, 0).max()) + 1
    weights = torch.zeros((*low.shape, width + taps.shape[-1]), dtype=taps.dtype)
    weights.scatter_(-1, offsets, taps)
    return first, weights[..., :width]


def _axis_weights(
    in_size: int, out_size: int, start: int, stop: int, resample: int
) -> tuple[int, torch.Tensor]:
    """Weights of output indices start..stop-1 of a 1-D resize: (first input index, rows)."""
    ins, outs, starts = (torch.tensor([n]) for n in (in_size, out_size, start))
    first, weights = _dense(*filter_taps(ins, outs, starts, stop - start, resample))
    return int(first[0]), weights[0]


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
    v = to_device(vertical.to(torch.float32), device)
    h = to_device(horizontal.to(torch.float32), device)
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


# The batched resize (resize_crop_batch) keeps its zero-padded float32 batch under this
BATCH_RESIZE_BUDGET = 512 << 20  # bytes
BATCHED_FILTERS = frozenset({2, 3})  # bilinear, bicubic: the filters resize_crop_batch runs


def resize_crop_batch(
    images: list[torch.Tensor],
    sizes: list[tuple[int, int]],
    resample: int,
    crop: tuple[int, int],
    budget: int = BATCH_RESIZE_BUDGET,
    rounds: bool | None = None,
) -> torch.Tensor:
    """Resize each (C, H, W) uint8 image to its `sizes` entry and centre-crop `crop` from it
    (no larger than any size), all as one batch: (n, C, *crop) uint8.

    The antialiased resize is separable and linear: with each image's filter weights
    restricted to its crop window (:func:`filter_taps`), the batch is
    ``Wy @ window @ Wx^T``, two batched matmuls on the zero-padded windows, in chunks whose
    padded float32 copy stays under `budget` bytes (one image at least).  Rounding follows
    :func:`resize` on the images' device: on the CPU, where it is torch's (and Pillow's)
    uint8 kernel, each pass rounds to uint8 values; elsewhere (the float path) only the end
    is clamped and rounded (`rounds` True or False chooses).  Equal to :func:`resize_crop`
    per image within a grey level or two (fixed-point weights in torch's uint8 kernels).
    """
    count = len(images)
    device = images[0].device
    out = torch.empty((count, images[0].shape[0], *crop), dtype=torch.uint8, device=device)
    # similar sizes together, so that little of each chunk is padding
    order = sorted(range(count), key=lambda k: tuple(images[k].shape[-2:]))
    if rounds is None:
        rounds = uint8_kernel(resample, device)
    chunk: list[int] = []
    tallest = widest = 0
    for k in order:
        height, width = images[k].shape[-2:]
        tall, wide = max(tallest, height), max(widest, width)
        per_image = images[k].shape[0] * tall * (wide + crop[1]) * 4
        if chunk and per_image * (len(chunk) + 1) > budget:
            out[chunk] = resize_chunk([images[n] for n in chunk], [sizes[n] for n in chunk],
                                       resample, crop, rounds)  # fmt: skip
            chunk, tall, wide = [], height, width
        chunk.append(k)
        tallest, widest = tall, wide
    out[chunk] = resize_chunk(
        [images[n] for n in chunk], [sizes[n] for n in chunk], resample, crop, rounds
    )
    return out


def resize_chunk(
    images: list[torch.Tensor],
    sizes: list[tuple[int, int]],
    resample: int,
    crop: tuple[int, int],
    rounds: bool,
) -> torch.Tensor:
    """One chunk of :func:`resize_crop_batch`: (n, C, *crop) uint8."""
    device = images[0].device
    axes = []
    for axis in (0, 1):  # rows, then columns
        ins = torch.tensor([image.shape[-2 + axis] for image in images])
        outs = torch.tensor([size[axis] for size in sizes])
        low, taps = filter_taps(ins, outs, (outs - crop[axis]) // 2, crop[axis], resample)
        # the window each image is cut to: from its first tap to past its last one
        end = torch.minimum(low[:, -1] + taps.shape[-1], ins)
        axes.append((low, taps, int((end - low[:, 0]).max())))
    (rows, vertical, tall), (cols, horizontal, wide) = axes
    windows = torch.zeros(
        (len(images), images[0].shape[0], tall, wide), dtype=torch.uint8, device=device
    )
    for window, image, top, left in zip(
        windows, images, rows[:, 0].tolist(), cols[:, 0].tolist(), strict=True
    ):
        part = image[:, top : top + tall, left : left + wide]
        window[:, : part.shape[1], : part.shape[2]] = part
    pixels = _banded(windows.to(torch.float32), cols - cols[:, :1], horizontal)  # rows first
    if rounds:  # as the uint8 kernels do between their passes (rounding half up)
        pixels = pixels.add_(0.5).floor_().clamp_(0, 255)
    pixels = _banded(pixels.transpose(-1, -2), rows - rows[:, :1], vertical).transpose(-1, -2)
    if rounds:
        pixels = pixels.add_(0.5).floor_()
    elif resample == 2:
        return pixels.round_().to(torch.uint8)
    return pixels.clamp_(0, 255).round_().to(torch.uint8)


BAND_BLOCK = 16  # outputs per block of _banded


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table (taps, gather indices) on `device`.  On CUDA it goes through
    pinned memory with ``non_blocking``: a pageable copy would block the host thread until
    the stream had finished everything queued before it (the batch's decoding), so decoding
    and resizing could never overlap.  The caching host allocator keeps the pinned block
    until the copy has run."""
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def _banded(
    pixels: torch.Tensor, low: torch.Tensor, taps: torch.Tensor, block: int = BAND_BLOCK
) -> torch.Tensor:
    """One resize pass over the last axis: (n, C, R, L) -> (n, C, R, O), output j of image
    k weighing inputs ``low[k, j] + t`` by ``taps[k, j, t]`` (:func:`filter_taps`, on the
    CPU).  Blocks of `block` outputs are batched matmuls on the span of inputs their taps
    cover (gathered): the arithmetic grows with the taps, not with the input width."""
    count, outputs, width = taps.shape
    blocks = -(-outputs // block)
    extra = blocks * block - outputs  # padding rows: the last row's start, no weight
    low = torch.cat([low, low[:, -1:].expand(-1, extra)], 1).view(count, blocks, block)
    taps = torch.nn.functional.pad(taps, (0, 0, 0, extra)).view(count, blocks, block, width)
    start = low[..., 0]  # (n, blocks): the taps move right with the output
    span = int((low[..., -1] - start).max()) + width
    offsets = (low - start[..., None])[..., None] + torch.arange(width)
    parts = torch.zeros((count, blocks, block, span), dtype=taps.dtype)
    parts.scatter_(-1, offsets, taps)
    device = pixels.device
    parts = to_device(parts.to(torch.float32), device)
    index = start[..., None] + torch.arange(span)  # (n, blocks, span) input positions
    index = to_device(index.clamp_max(pixels.shape[-1] - 1), device).view(count, 1, 1, -1)
    gathered = pixels.gather(-1, index.expand(*pixels.shape[:-1], -1))
    gathered = gathered.view(*pixels.shape[:-1], blocks, span)  # (n, C, R, blocks, span)
    out = torch.einsum("ncrbs,nbjs->ncrbj", gathered, parts)
    return out.reshape(*pixels.shape[:-1], blocks * block)[..., :outputs]


_INTERPOLATE_MODES = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


@lru_cache(maxsize=1)
def _torch_has_lanczos() -> bool:
    """Newer torch has an antialiased Lanczos interpolate (torchvision >= 0.27 relies on it)."""
    try:
        F.interpolate(torch.zeros(1, 1, 4, 4), size=[2, 2], mode="lanczos", antialias=True)
    except (ValueError, NotImplementedError, RuntimeError):
        return False
    return True


def uint8_kernel(resample: int, device: torch.device) -> bool:
    """Whether torch resizes uint8 natively there (else: float, clamp, round): on the CPU,
    bicubic and Lanczos always, bilinear on AVX2/AVX-512/Arm (torchvision's rule)."""
    return device.type == "cpu" and (resample != 2 or _native_uint8_bilinear())


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
