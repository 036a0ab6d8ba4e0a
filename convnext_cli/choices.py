"""The names the command line offers, kept light (no torch): the CLI's choice lists and
defaults, and the core's tables of what it accepts, are both built from these."""

from __future__ import annotations

DEFAULT_MODEL = "facebook/convnext-tiny-224"
LAYOUTS = ("hf", "fb", "fcmae", "timm", "torchvision", "tf")  # --from, besides auto
DTYPES = ("auto", "float32", "float16", "bfloat16")  # --dtype
DECODERS = ("auto", "cpu", "gpu")  # --decode
ENGINES = ("local", "ray")  # --engine
# torch.compile modes (benchmark --compile-mode); reduce-overhead is CUDA graphs, CUDA only
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
POOLS = ("avg", "none")  # embed --pool
CLASSIFY_FORMATS = ("auto", "table", "json", "jsonl", "csv", "parquet", "html")  # classify --format
EMBED_FORMATS = ("auto", "jsonl", "json", "csv", "npy", "safetensors", "parquet")  # embed --format
