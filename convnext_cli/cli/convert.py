"""`convnext convert SOURCE OUTPUT_DIR`: any ConvNeXt checkpoint in, a Hub-layout folder out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from convnext_cli.choices import ConvertTarget, LayoutChoice
from convnext_cli.cli.errors import say
from convnext_cli.cli.options import hub_options
from convnext_cli.limits import MAX_IMAGE_SIZE, check_environment


class Source(str):
    """What convert reads: a weights file, a checkpoint folder or a Hub id."""


Source.__name__ = "file|folder|hub id"  # how Typer's help names the argument's type


SourceArg = Annotated[
    Source,
    typer.Argument(
        metavar="SOURCE",
        parser=Source,
        help="A weights file (.safetensors, .pth, .pt, .bin, TensorFlow .h5) in any supported "
        "layout, a folder holding model.safetensors, pytorch_model.bin or tf_model.h5, or a "
        "Hub id.",
        show_default=False,
    ),
]
OutputDirArg = Annotated[
    Path,
    typer.Argument(
        metavar="OUTPUT_DIR",
        help="Folder to write config.json, model.safetensors and preprocessor_config.json "
        "into (created; must be empty unless --force; must not hold SOURCE, symlinks "
        "resolved). Each file is written to a temporary and renamed into place. "
        "A name ending in .onnx (or --to onnx) writes an ONNX model instead.",
        show_default=False,
    ),
]


ToOpt = Annotated[
    ConvertTarget,
    typer.Option(
        "--to",
        case_sensitive=False,
        metavar="FORMAT",
        help="auto, hub or onnx. auto: onnx when OUTPUT_DIR ends in .onnx, else hub (a "
        "transformers folder). "
        "onnx: float32, dynamic batch, preprocessing and labels in its metadata; for "
        "deployment (ONNX Runtime, OpenVINO), not speed.",
    ),
]
FromOpt = Annotated[
    LayoutChoice,
    typer.Option(
        "--from",
        metavar="LAYOUT",
        case_sensitive=False,
        help="Source layout: auto (detect from the key names), hf (transformers), fb "
        "(facebookresearch ConvNeXt / ConvNeXt-V2, FCMAE included), fcmae, timm, "
        "torchvision or tf (TensorFlow/Keras tf_model.h5; needs the tf extra).",
    ),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        min=1,
        max=MAX_IMAGE_SIZE,
        metavar="N",
        help="Input resolution: sets preprocessor size.shortest_edge and config image_size "
        "(default: the source's, else 224).",
        show_default=False,
    ),
]
CropPctOpt = Annotated[
    float | None,
    typer.Option(
        "--crop-pct",
        metavar="F",
        help="Centre-crop fraction: below 384 px the short side is resized to "
        "size / crop_pct, then cropped (default: the source's, else 0.875; torchvision "
        "weights 224/236, 224/230 or 224/232).",
        show_default=False,
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        metavar="",
        help="Write into a non-empty OUTPUT_DIR, replacing its config, weights and "
        "preprocessor files (a symlink among them is replaced, never written through).",
    ),
]


@hub_options
def convert(
    source: SourceArg,
    output_dir: OutputDirArg,
    from_: FromOpt = "auto",
    image_size: ImageSizeOpt = None,
    crop_pct: CropPctOpt = None,
    force: ForceOpt = False,
    to: ToOpt = "auto",
    **hub: Any,
) -> None:
    """Convert a ConvNeXt / ConvNeXt V2 checkpoint to a transformers (Hub-layout) folder.

    The layout (transformers, facebookresearch, FCMAE, timm, torchvision), V1 vs V2,
    depths, widths and head size are read from the weights.  Heads of 1000 and 21841
    classes get the ImageNet-1k / ImageNet-22k names; a headless checkpoint becomes a
    feature model.  The output folder path is printed on stdout.

    Examples:
      $ convnext convert convnext_tiny_1k_224_ema.pth convnext-tiny/
      $ convnext convert convnextv2_tiny_22k_384_ema.pt v2-384/ --image-size 384
      $ convnext convert timm-weights.safetensors out/ --from timm
      $ convnext classify photos/ -m convnext-tiny/
      $ convnext convert facebook/convnext-tiny-224 convnext-tiny.onnx
    """
    check_environment()  # before huggingface_hub is imported: it parses HF_HUB_* itself
    from convnext_cli.checkpoints import convert as conversion

    options = conversion.ConvertOptions(from_, image_size, crop_pct, force, **hub)
    if to == "onnx" or (to == "auto" and output_dir.suffix.lower() == ".onnx"):
        exported = conversion.export_onnx(source, output_dir, options)
        done, written = f"exported {source} ({exported.summary()})", exported.output
    else:
        result = conversion.convert(source, output_dir, options)
        done, written = f"converted {source} ({result.summary()})", result.output_dir
    say(f"{done} -> {written}")
    typer.echo(str(written))
