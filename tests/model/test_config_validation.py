"""Hostile checkpoints and configs are refused up front: exit 2, one line, fast, small.

Each case copies the tiny V1 checkpoint (tests/conftest.py) to tmp_path, damages one
thing (config.json, preprocessor_config.json or the weights) and runs the real CLI,
``python -m convnext_cli classify PHOTO -m FOLDER``, as a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convnext_cli.checkpoints.checkpoint import load_checkpoint
from convnext_cli.errors import CheckpointError
from convnext_cli.imaging.preprocess import PreprocessSpec
from convnext_cli.model.config import ConvNextConfig

REPO = Path(__file__).resolve().parents[2]
PHOTO = REPO / "sample_images" / "astronaut.png"

Edit = Callable[[Path], None]


# --------------------------------------------------------------------------- editing helpers


def config(**changes) -> Edit:
    """Set (or, with the value ``...``, delete) fields of config.json."""

    def edit(folder: Path) -> None:
        data = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is ...:
                data.pop(key, None)
            else:
                data[key] = value
        (folder / "config.json").write_text(json.dumps(data))

    return edit


def preprocessor(**changes) -> Edit:
    def edit(folder: Path) -> None:
        data = json.loads((folder / "preprocessor_config.json").read_text())
        data.update(changes)
        (folder / "preprocessor_config.json").write_text(json.dumps(data))

    return edit


def raw_file(name: str, text: str | bytes) -> Edit:
    def edit(folder: Path) -> None:
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return edit


def config_text(replace: tuple[str, str]) -> Edit:
    """Edit config.json as text (for what json.dumps cannot write, like a key twice)."""

    def edit(folder: Path) -> None:
        path = folder / "config.json"
        text = path.read_text()
        assert replace[0] in text
        path.write_text(text.replace(*replace, 1))

    return edit


def tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Edit:
    def edit(folder: Path) -> None:
        path = folder / "model.safetensors"
        sd = load_file(str(path))
        change(sd)
        save_file(sd, str(path), metadata={"format": "pt"})

    return edit


def set_tensor(key_part: str, make: Callable[[torch.Tensor], torch.Tensor]):
    def change(sd: dict[str, torch.Tensor]) -> None:
        key = next(k for k in sd if key_part in k)
        sd[key] = make(sd[key])

    return change


def put_nan(value: float):
    def make(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[3] = value
        return t

    return make


def as_complex(t: torch.Tensor) -> torch.Tensor:
    return torch.complex(t, t)


def rename_key(old: str, new: str):
    def change(sd: dict[str, torch.Tensor]) -> None:
        sd[new] = sd.pop(old)

    return change


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def huge_header(folder: Path) -> None:
    """A valid-looking header claiming a 4 TB float32 tensor, in a file of a few bytes."""
    n = 1_000_000
    header = {"huge": {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]}}
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)


def header_length_past_end(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes((10**15).to_bytes(8, "little") + b"{}")


def pickle_instead(obj) -> Edit:
    def edit(folder: Path) -> None:
        (folder / "model.safetensors").unlink()
        torch.save(obj, folder / "pytorch_model.bin")

    return edit


def text_bin(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_text("these are not weights\n")


# --------------------------------------------------------------------------- the cases

# (id, edit, a word the error line must contain)
CASES: list[tuple[str, Edit, str]] = [
    # config.json: not an object, not JSON
    ("config-list", raw_file("config.json", "[1, 2, 3]"), "JSON object"),
    ("config-null", raw_file("config.json", "null"), "JSON object"),
    ("config-not-json", raw_file("config.json", '{"depths": [1,'), "JSON"),
    ("config-binary", raw_file("config.json", b"\xff\xfe\x00garbage"), "config.json"),
    ("config-duplicate-key", config_text(('"depths":', '"depths": [9], "depths":')), "twice"),
    # wrong types
    ("num-labels-string", config(num_labels="1000"), "num_labels"),
    ("num-labels-bool", config(num_labels=True), "num_labels"),
    ("depths-null", config(depths=None), "depths"),
    ("depths-string", config(depths="1,1,2,1"), "depths"),
    ("depths-nested", config(depths=[[1], [1], [2], [1]]), "depths"),
    ("depths-bool", config(depths=[True, 1, 2, 1]), "depths"),
    ("depths-float", config(depths=[1.5, 1, 2, 1]), "depths"),
    ("depths-negative", config(depths=[1, -1, 2, 1]), "depths"),
    ("depths-empty", config(depths=[]), "depths"),
    ("hidden-sizes-zero", config(hidden_sizes=[0, 16, 24, 32]), "hidden_sizes"),
    ("num-stages-zero", config(num_stages=0), "num_stages"),
    ("num-stages-disagrees", config(num_stages=3), "num_stages"),
    ("patch-size-string", config(patch_size="4"), "patch_size"),
    ("patch-size-nonsquare", config(patch_size=[4, 2]), "patch_size"),
    ("num-channels-null", config(num_channels=None), "num_channels"),
    ("image-size-negative", config(image_size=-224), "image_size"),
    ("eps-nan", config_text(('"layer_norm_eps": 1e-12', '"layer_norm_eps": NaN')), "eps"),
    ("eps-inf", config_text(('"layer_norm_eps": 1e-12', '"layer_norm_eps": Infinity')), "eps"),
    ("eps-negative", config(layer_norm_eps=-1.0), "layer_norm_eps"),
    ("eps-string", config(layer_norm_eps="1e-6"), "layer_norm_eps"),
    ("hidden-act-unknown", config(hidden_act="swiglu"), "hidden_act"),
    ("hidden-act-list", config(hidden_act=["gelu"]), "hidden_act"),
    ("model-type-vit", config(model_type="vit"), "model_type"),
    # huge sizes: refused before anything is built
    ("depths-huge", config(depths=[10_000_000], num_stages=1, hidden_sizes=[8]), "depths"),
    ("hidden-sizes-huge", config(hidden_sizes=[100_000_000, 16, 24, 32]), "hidden_sizes"),
    ("hidden-sizes-big", config(hidden_sizes=[65536] * 4), "parameters"),
    ("num-labels-huge", config(num_labels=10**12, id2label=...), "num_labels"),
    # id2label: ints 0..n-1, no gaps, no duplicates, agreeing with num_labels and the head
    ("id2label-list", config(id2label=["a", "b"]), "id2label"),
    ("id2label-key-word", config(id2label={"zero": "a", "1": "b"}), "id2label"),
    ("id2label-key-negative", config(id2label={"-1": "a", "0": "b"}), "id2label"),
    ("id2label-gap", config(id2label={str(i): f"c{i}" for i in [*range(999), 1000]}), "gaps"),
    ("id2label-duplicate", config(id2label={"0": "a", "00": "b"}), "twice"),
    ("id2label-value-null", config(id2label={"0": None}), "id2label"),
    ("id2label-vs-num-labels", config(num_labels=7), "num_labels"),
    ("id2label-vs-head", config(id2label={str(i): f"c{i}" for i in range(5)}), "classifier"),
    # config against the weights
    ("depths-vs-weights", config(depths=[1, 1, 3, 1]), "depths"),
    ("widths-vs-weights", config(hidden_sizes=[8, 16, 24, 40]), "hidden_sizes"),
    ("model-type-vs-weights", config(model_type="convnextv2"), "model_type"),
    ("channels-vs-weights", config(num_channels=4), "num_channels"),
    ("patch-vs-weights", config(patch_size=2), "patch_size"),
    # preprocessor_config.json
    ("pre-not-object", raw_file("preprocessor_config.json", '"224"'), "JSON object"),
    ("pre-not-json", raw_file("preprocessor_config.json", "{size: 224}"), "JSON"),
    ("size-height-width", preprocessor(size={"height": 224, "width": 224}), "shortest_edge"),
    ("size-string", preprocessor(size="224"), "size"),
    ("size-zero", preprocessor(size={"shortest_edge": 0}), "shortest_edge"),
    ("size-huge", preprocessor(size={"shortest_edge": 10**9}), "shortest_edge"),
    ("size-null", preprocessor(size=None), "size"),
    ("crop-pct-zero", preprocessor(crop_pct=0), "crop_pct"),
    ("crop-pct-above-one", preprocessor(crop_pct=1.5), "crop_pct"),
    ("crop-pct-tiny", preprocessor(crop_pct=1e-9), "crop_pct"),
    ("crop-pct-string", preprocessor(crop_pct="0.875"), "crop_pct"),
    ("mean-two", preprocessor(image_mean=[0.5, 0.5]), "image_mean"),
    ("mean-nested", preprocessor(image_mean=[[0.5], [0.5], [0.5]]), "image_mean"),
    ("std-zero", preprocessor(image_std=[0.2, 0.0, 0.2]), "image_std"),
    ("std-inf", preprocessor(image_std=math.inf), "image_std"),
    ("mean-nan", preprocessor(image_mean=[math.nan, 0.5, 0.5]), "image_mean"),
    ("rescale-zero", preprocessor(rescale_factor=0), "rescale_factor"),
    ("rescale-neg-inf", preprocessor(rescale_factor=-math.inf), "rescale_factor"),
    ("rescale-underflow", preprocessor(rescale_factor=1e-300), "non-finite"),
    ("resample-seven", preprocessor(resample=7), "resample"),
    ("resample-string", preprocessor(resample="bicubic"), "resample"),
    ("resample-bool", preprocessor(resample=True), "resample"),
    ("do-resize-string", preprocessor(do_resize="false"), "do_resize"),
    ("do-normalize-null", preprocessor(do_normalize=None), "do_normalize"),
    ("crop-size-negative", preprocessor(do_center_crop=True, crop_size=-5), "crop_size"),
    # weights files
    ("weights-text", raw_file("model.safetensors", "hello, I am not a weights file\n"), "safetens"),
    ("weights-empty", raw_file("model.safetensors", b""), "safetensors"),
    ("weights-truncated", truncate, "truncated"),
    ("weights-huge-header", huge_header, "huge"),
    ("weights-header-length", header_length_past_end, "header length"),
    ("weights-int", tensors(set_tensor("classifier.weight", lambda t: t.to(torch.int64))), "dtype"),
    ("weights-bool", tensors(set_tensor("dwconv.weight", lambda t: t > 0)), "dtype"),
    ("weights-complex", tensors(set_tensor("classifier.bias", as_complex)), "dtype"),
    ("weights-nan", tensors(set_tensor("pwconv1.weight", put_nan(math.nan))), "NaN"),
    ("weights-inf", tensors(set_tensor("classifier.weight", put_nan(-math.inf))), "infinite"),
    (
        "weights-block-index-huge",
        tensors(
            rename_key(
                "convnext.encoder.stages.3.layers.0.dwconv.bias",
                "convnext.encoder.stages.3.layers.10000000.dwconv.bias",
            )
        ),
        "10000000",
    ),
    ("bin-text", text_bin, "pytorch_model.bin"),
    ("bin-not-a-dict", pickle_instead([1, 2, 3]), "pytorch_model.bin"),
    ("bin-huge-view", pickle_instead({"w": torch.zeros(1).expand(10**6, 10**6)}), "elements"),
]


@pytest.fixture
def bad_folder(v1_checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(v1_checkpoint, folder)
    return folder


def run_classify(folder: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), CONVNEXT_DEBUG="0")
    return subprocess.run(
        [sys.executable, "-m", "convnext_cli", "classify", str(PHOTO), "-m", str(folder)]
        + ["--dtype", "float32", "--format", "jsonl"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_refused(result: subprocess.CompletedProcess[str], word: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert word.lower() in lines[0].lower(), lines[0]
    assert result.stdout == ""  # not one error record per image
    return lines[0]


# The CLI, as a subprocess, on a representative 30 (each costs a Python start and torch's
# import); every case runs in-process below, through the same loading function.
CLI_CASES = {
    "config-list", "config-not-json", "config-duplicate-key", "num-labels-string",
    "depths-null", "depths-nested", "depths-bool", "depths-negative", "hidden-sizes-zero",
    "num-stages-disagrees", "eps-nan", "eps-inf", "hidden-act-unknown", "model-type-vit",
    "depths-huge", "hidden-sizes-huge", "id2label-gap", "id2label-duplicate",
    "id2label-vs-head", "depths-vs-weights", "pre-not-object", "size-height-width",
    "crop-pct-above-one", "std-zero", "rescale-underflow", "resample-seven",
    "do-resize-string", "weights-text", "weights-truncated", "weights-huge-header",
    "weights-int", "weights-complex", "weights-nan", "bin-text", "bin-huge-view",
    "weights-block-index-huge",
}  # fmt: skip
FILES = ("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin")


def test_cases_are_distinct_and_many() -> None:
    names = [name for name, _, _ in CASES]
    assert len(set(names)) == len(names) >= 20
    assert CLI_CASES <= set(names) and len(CLI_CASES) >= 20


@pytest.mark.parametrize(
    ("edit", "word"),
    [c[1:] for c in CASES if c[0] in CLI_CASES],
    ids=[c[0] for c in CASES if c[0] in CLI_CASES],
)
def test_hostile_checkpoint_is_refused_in_one_line(bad_folder: Path, edit: Edit, word: str):
    edit(bad_folder)
    line = assert_refused(run_classify(bad_folder), word)
    assert any(name in line for name in FILES), line  # the line names the file at fault


@pytest.mark.parametrize(("edit", "word"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_checkpoint_is_refused_by_the_loader(bad_folder: Path, edit: Edit, word: str):
    edit(bad_folder)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(bad_folder))
    message = str(info.value)
    assert "\n" not in message and word.lower() in message.lower(), message
    assert any(f"{bad_folder}/{name}" in message for name in FILES), message


def test_the_unedited_copy_loads(bad_folder: Path) -> None:
    """The cases above fail because of their edit, not because of the copy."""
    result = run_classify(bad_folder)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["predictions"]


# --------------------------------------------------------------------------- time and memory

PEAK_RSS = r"""
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(result.stderr)
print(result.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.parametrize(
    "edit",
    [
        config(depths=[10_000_000], num_stages=1, hidden_sizes=[8]),
        config(hidden_sizes=[100_000_000, 16, 24, 32]),
        config(depths=[1000, 1000, 1000, 1000]),  # in range, far from the weights
        huge_header,
        pickle_instead({"w": torch.zeros(1).expand(10**6, 10**6)}),
    ],
    ids=[
        "depths-1e7",
        "hidden-1e8",
        "depths-1000-vs-weights",
        "safetensors-4TB-header",
        "pickle-4TB-view",
    ],
)
def test_huge_requests_are_refused_without_allocating(bad_folder: Path, edit: Edit) -> None:
    edit(bad_folder)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "convnext_cli", "classify", str(PHOTO), "-m", str(bad_folder)]
    wrapper = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *command, "--dtype", "float32"],
        capture_output=True,
        text=True,
        timeout=60,  # finishes: building 10 million blocks would take hours
        env=env,
    )
    code, peak_kib = (int(x) for x in wrapper.stdout.split())
    assert code == 2, wrapper.stderr
    assert len(wrapper.stderr.splitlines()) == 1 and wrapper.stderr.startswith("error: ")
    # torch's import alone is a few hundred MB; gigabytes would mean something was built
    assert peak_kib < 1_200_000, f"peak RSS {peak_kib / 1024:.0f} MiB"


# --------------------------------------------------------------------------- in-process rules


def test_transformers_config_files_still_load(v1_checkpoint: Path, v2_checkpoint: Path) -> None:
    for folder in (v1_checkpoint, v2_checkpoint):
        checkpoint = load_checkpoint(str(folder))
        assert checkpoint.config.num_labels in (1000, 7)


def test_config_accepts_what_transformers_writes() -> None:
    transformers = pytest.importorskip("transformers")
    for cls in (transformers.ConvNextConfig, transformers.ConvNextV2Config):
        raw = cls(depths=[2, 2], hidden_sizes=[8, 16], num_stages=2, num_labels=3).to_dict()
        cfg = ConvNextConfig.from_dict(raw)
        assert cfg.depths == [2, 2] and cfg.num_labels == 3
    # patch_size / image_size as [n, n], labels without id2label
    cfg = ConvNextConfig.from_dict({"patch_size": [4, 4], "image_size": [224, 224]})
    assert (cfg.patch_size, cfg.image_size, cfg.num_labels) == (4, 224, 2)
    assert ConvNextConfig.from_dict({"num_labels": 5}).num_labels == 5


def test_preprocessor_accepts_what_transformers_writes() -> None:
    transformers = pytest.importorskip("transformers")
    raw = transformers.ConvNextImageProcessor(crop_pct=0.9, resample=4).to_dict()
    spec = PreprocessSpec.from_dict(raw)
    assert spec.crop_pct == 0.9 and spec.resample == 4 and spec.shortest_edge == 384
    # one number for mean/std, an int size, null crop extras
    spec = PreprocessSpec.from_dict(
        {"size": 224, "image_mean": 0.5, "image_std": 0.25, "crop_size": None}
    )
    assert spec.image_mean == (0.5,) * 3 and spec.image_std == (0.25,) * 3


@pytest.mark.parametrize("resample", range(6))
def test_every_resample_value_is_accepted(resample: int) -> None:
    assert PreprocessSpec.from_dict({"resample": resample}).resample == resample


def test_library_callers_get_checkpoint_errors(bad_folder: Path) -> None:
    config(depths="x")(bad_folder)
    with pytest.raises(CheckpointError, match=r"config\.json: depths: expected"):
        load_checkpoint(str(bad_folder))


def test_a_model_for_other_than_rgb_is_refused_for_classify_but_converts(tmp_path: Path) -> None:
    import factories

    from convnext_cli.checkpoints.convert import convert_checkpoint

    folder = factories.save_hf(factories.hf_model(num_channels=1), tmp_path / "grey")
    assert_refused(run_classify(folder), "num_channels")
    out = convert_checkpoint(folder, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_channels"] == 1
