"""The names the command line offers, kept light (no torch): one table.

Each choice list is a :data:`~typing.Literal` type and, built from it, the tuple of its
values.  The CLI's options are annotated with the types (Typer offers, completes and checks
their values, and hands the command plain strings); the core checks what it is given
against the tuples.  A new value is added here, once.
"""

from __future__ import annotations

from typing import Literal, get_args

DEFAULT_MODEL = "facebook/convnext-tiny-224"

LayoutName = Literal["hf", "fb", "fcmae", "timm", "torchvision", "tf"]
LayoutChoice = Literal["auto", LayoutName]  # convert --from
Dtype = Literal["auto", "float32", "float16", "bfloat16"]  # --dtype
Decoder = Literal["auto", "cpu", "gpu"]  # --decode
Engine = Literal["local", "ray"]  # --engine
Pool = Literal["avg", "none"]  # embed --pool
ClassifyFormat = Literal["auto", "table", "json", "jsonl", "csv", "parquet", "html"]
EmbedFormat = Literal["auto", "jsonl", "json", "csv", "npy", "safetensors", "parquet"]
Scores = Literal["probs", "logits", "log-probs"]  # classify --scores
ConvertTarget = Literal["auto", "hub", "onnx"]  # convert --to
ReportFormat = Literal["table", "json"]  # benchmark --format
# torch.compile modes (benchmark --compile-mode); reduce-overhead is CUDA graphs, CUDA only
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

LAYOUTS: tuple[str, ...] = get_args(LayoutName)  # --from, besides auto
LAYOUT_CHOICES: tuple[str, ...] = get_args(LayoutChoice)
DTYPES: tuple[str, ...] = get_args(Dtype)
DECODERS: tuple[str, ...] = get_args(Decoder)
ENGINES: tuple[str, ...] = get_args(Engine)
POOLS: tuple[str, ...] = get_args(Pool)
CLASSIFY_FORMATS: tuple[str, ...] = get_args(ClassifyFormat)
EMBED_FORMATS: tuple[str, ...] = get_args(EmbedFormat)
SCORES: tuple[str, ...] = get_args(Scores)
CONVERT_TARGETS: tuple[str, ...] = get_args(ConvertTarget)
REPORT_FORMATS: tuple[str, ...] = get_args(ReportFormat)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
