"""GPU behaviour that is logic, tested on the CPU: the dtype and batch chosen for a GPU
(against mocked device capabilities), out-of-memory backoff and sticky device errors
(simulated), one compilation per run (Inductor on the CPU), results read back one batch
behind (call order recorded), decode workers scaled to the usable cores."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
from convnext_cli.cli import app
from convnext_cli.engine import device as device_mod
from convnext_cli.engine import pipeline
from convnext_cli.engine.pipeline import Runner
from convnext_cli.errors import DeviceFailure
from convnext_cli.model.convnext import ConvNeXtForClassification

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def backend_flags():
    """resolve() sets these process-wide: put them back after each test."""
    cuda_matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cuda_matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark)
    precision = torch.get_float32_matmul_precision()
    cudnn.benchmark = False
    yield
    cuda_matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = saved
    torch.set_float32_matmul_precision(precision)


def fake_gpu(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], memory_gib: float = 80
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda *a: SimpleNamespace(total_memory=int(memory_gib * 2**30)),
    )


@pytest.mark.parametrize(
    "capability,expected",
    [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16)],
)
def test_dtype_auto_on_cuda_follows_the_compute_capability(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: torch.dtype
) -> None:
    fake_gpu(monkeypatch, capability)
    placement = device_mod.resolve("cuda", "auto")
    assert placement.dtype == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in placement.reason
    assert torch.backends.cudnn.benchmark is True
    # bfloat16/float16 runs may use TF32 for what stays float32
    assert torch.backends.cuda.matmul.allow_tf32 is True


def test_float32_on_cuda_is_exact_tf32_off(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, (9, 0))
    placement = device_mod.resolve("cuda", "float32")
    assert placement.dtype == torch.float32 and placement.reason == ""
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.benchmark is True


def test_cpu_dtype_and_flags_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod, "cpu_has_fast_bfloat16", lambda: False)
    assert device_mod.resolve("cpu", "auto").dtype == torch.float32
    assert torch.backends.cudnn.benchmark is False


def test_default_batch_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, (9, 0), memory_gib=141)
    assert device_mod.default_batch_size(CUDA) == 256
    assert device_mod.default_batch_size(CUDA, 384) == 80
    assert device_mod.default_batch_size(CUDA, 4000) == 8
    fake_gpu(monkeypatch, (7, 5), memory_gib=8)
    assert device_mod.default_batch_size(CUDA) == 64
    assert device_mod.default_batch_size(CPU) == 8
    assert pipeline.default_batch_size("cpu") == 8


def test_decode_workers_scale_to_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert pipeline.default_workers(10_000, 256, "cuda") == 59  # 64 - 1 - 64 // 16
    assert pipeline.default_workers(10_000, 8, "cpu") == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert pipeline.default_workers(10_000, 256, "cuda") == 1
    assert pipeline.default_workers(100, 256, "cuda") == 0  # one batch: no workers


# ------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def runner_parts(v1_checkpoint: Path):
    checkpoint = load_checkpoint(str(v1_checkpoint))
    model = build_model(checkpoint, CPU, torch.float32)
    return model, checkpoint.preprocess


def results_of(runner: Runner, paths: list[str], batch_size: int = 2) -> list:
    return [r for batch in runner.classify(paths, top_k=5, batch_size=batch_size, workers=0)
            for r in batch]  # fmt: skip


def same(a: list, b: list) -> None:
    assert [r.path for r in a] == [r.path for r in b]
    assert [r.error for r in a] == [r.error for r in b]
    for x, y in zip(a, b, strict=True):
        assert [p.index for p in x.predictions] == [p.index for p in y.predictions]
        for p, q in zip(x.predictions, y.predictions, strict=True):
            assert p.score == pytest.approx(q.score, abs=1e-5)


def test_out_of_memory_halves_the_batch_and_goes_on(runner_parts, photos: list[Path]) -> None:
    model, spec = runner_parts
    paths = [str(p) for p in photos] * 2
    expected = results_of(Runner(model, spec, CPU, torch.float32), paths, batch_size=4)
    runner = Runner(model, spec, CPU, torch.float32)
    notes: list[str] = []
    runner.on_note = notes.append
    seen: list[int] = []

    def limited(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        if batch.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return model(batch)

    runner.logits_fn = limited
    got = results_of(runner, paths, batch_size=4)
    same(got, expected)
    assert all(r.error is None for r in got)
    assert notes == ["the device ran out of memory at batch 4; going on with batch 2 (-b sets it)"]
    assert runner.max_rows == 1
    # once halved, later batches start at the smaller size: 4, 2, then only ones
    assert seen[:3] == [4, 2, 1] and 4 not in seen[3:]


def test_a_single_image_out_of_memory_is_its_own_error(runner_parts, photos) -> None:
    model, spec = runner_parts
    runner = Runner(model, spec, CPU, torch.float32)

    def never(batch: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    runner.logits_fn = never
    got = results_of(runner, [str(photos[0])], batch_size=1)
    assert got[0].error is not None and "CUDA out of memory" in got[0].error


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors"),
        torch.AcceleratorError("CUDA error: unspecified launch failure"),
    ],
)
def test_a_sticky_device_error_stops_the_run(runner_parts, photos, error) -> None:
    model, spec = runner_parts
    runner = Runner(model, spec, CPU, torch.float32)
    calls = []

    def dies(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        if len(calls) > 1:
            raise error
        return model(batch)

    runner.logits_fn = dies
    batches = runner.classify([str(p) for p in photos], batch_size=2, workers=0)
    assert len(next(batches)) == 2
    with pytest.raises(DeviceFailure, match="^the device failed, stopping"):
        next(batches)
    assert calls == [2, 2]  # no image-by-image retry, no error record per image


def test_cli_exits_70_on_a_sticky_device_error_keeping_finished_records(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ConvNeXtForClassification.forward
    calls = []

    def forward(self, x):
        calls.append(x.shape[0])
        if len(calls) > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, x)

    monkeypatch.setattr(ConvNeXtForClassification, "forward", forward)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        app,
        ["classify", *map(str, photos), "-m", str(v1_checkpoint), "--device", "cpu",
         "--dtype", "float32", "-b", "2", "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 70, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the device failed, stopping"), lines
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in photos[:2]]
    assert all(r.get("error") is None for r in records)


def test_results_are_read_back_two_batches_behind(runner_parts, photos: list[Path]) -> None:
    """Batches i+1 and i+2 are queued on the device before batch i's outputs are read back
    (one batch behind with read_behind 1)."""
    model, spec = runner_parts
    paths = [str(p) for p in photos[:6]]
    assert Runner(model, spec, CPU, torch.float32).read_behind == 2
    expected = results_of(Runner(model, spec, CPU, torch.float32), paths)
    log: list[str] = []
    runner = Runner(model, spec, CPU, torch.float32)
    runner.overlap = True  # as on CUDA

    def logged(batch: torch.Tensor) -> torch.Tensor:
        log.append("queue")
        return model(batch)

    runner.logits_fn = logged
    real_finish = pipeline.Readback.finish

    def finish(self: pipeline.Readback) -> None:
        log.append("read")
        real_finish(self)

    pipeline.Readback.finish = finish  # type: ignore[method-assign]
    try:
        got = []
        for batch in runner.classify(paths, top_k=5, batch_size=2, workers=0):
            log.append("yield")
            got += batch
    finally:
        pipeline.Readback.finish = real_finish  # type: ignore[method-assign]
    assert log == ["queue", "queue", "queue", "read", "yield", "read", "yield", "read", "yield"]
    same(got, expected)


def test_on_the_cpu_results_come_as_each_batch_finishes(runner_parts, photos) -> None:
    model, spec = runner_parts
    runner = Runner(model, spec, CPU, torch.float32)
    assert runner.overlap is False
    log: list[str] = []

    def logits(batch: torch.Tensor) -> torch.Tensor:
        log.append("queue")
        return model(batch)

    runner.logits_fn = logits
    for _ in runner.classify([str(p) for p in photos[:4]], batch_size=2, workers=0):
        log.append("yield")
    assert log == ["queue", "yield", "queue", "yield"]


def test_mean_and_std_are_built_once_per_run(runner_parts, photos, monkeypatch) -> None:
    model, spec = runner_parts
    runner = Runner(model, spec, CPU, torch.float32)
    built = []
    real = type(spec).normalization

    def normalization(self: Any, device: Any) -> Any:
        built.append(1)
        return real(self, device)

    monkeypatch.setattr(type(spec), "normalization", normalization)
    results_of(runner, [str(p) for p in photos[:6]])
    assert len(built) == 1


# ---------------------------------------------------------------------- compile once


def counting_backend(compilations: list[list[tuple[int, ...]]], modes: list[str | None]):
    """Inductor, counting its compilations and hearing the mode torch.compile passes on
    (a callable backend gets ``mode`` as a keyword; Inductor's own wrapper turns it into
    these config patches)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    def counting(gm, example_inputs, mode: str | None = None, **options: Any):
        compilations.append([tuple(t.shape) for t in example_inputs if hasattr(t, "shape")])
        modes.append(mode)
        patches = {**(list_mode_options(mode) if mode else {}), **options}
        return compile_fx(gm, example_inputs, config_patches=patches)

    return counting


def counted_runner(
    checkpoint: Path, spec: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[Runner, list[list[tuple[int, ...]]], list[str | None]]:
    """A fresh runner whose torch.compile goes through :func:`counting_backend`: the runner,
    its compilations (input shapes) and the modes torch passed on."""
    compilations: list[list[tuple[int, ...]]] = []
    modes: list[str | None] = []
    counting = counting_backend(compilations, modes)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting, **kw))
    torch._dynamo.reset()
    own = build_model(load_checkpoint(str(checkpoint)), CPU, torch.float32)
    return Runner(own, spec, CPU, torch.float32), compilations, modes


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_compile_compiles_once_with_a_partial_batch_and_a_failed_image(
    runner_parts,
    v1_checkpoint: Path,
    photos: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:

    model, spec = runner_parts
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    small = tmp_path / "small.png"
    Image.open(photos[0]).convert("RGB").resize((40, 30)).save(small)
    # batch 4: [4 good], [3 good + broken] (shrunk), [1] (partial)
    paths = [str(p) for p in photos[:4]] + [str(p) for p in photos[4:6]] + [str(broken)]
    paths += [str(small), str(photos[0])]
    expected = results_of(Runner(model, spec, CPU, torch.float32), paths, batch_size=4)

    runner, compilations, modes = counted_runner(v1_checkpoint, spec, monkeypatch)
    runner.compile(mode)
    try:
        got = results_of(runner, paths, batch_size=4)
    finally:
        torch._dynamo.reset()
    assert len(compilations) == 1, compilations
    assert modes == [None if mode == "default" else mode]  # torch passes "default" as none
    assert runner.compile_mode == mode
    assert sum(r.error is not None for r in got) == 1
    same(got, expected)


def test_reduce_overhead_off_cuda_compiles_as_default_with_a_note(
    runner_parts, v1_checkpoint: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU torch would skip the CUDA graphs of reduce-overhead without a word: the
    runner says so in one note and compiles as default."""
    _, spec = runner_parts
    runner, compilations, modes = counted_runner(v1_checkpoint, spec, monkeypatch)
    notes: list[str] = []
    runner.on_note = notes.append
    runner.compile("reduce-overhead")
    try:
        got = results_of(runner, [str(p) for p in photos[:3]], batch_size=2)
    finally:
        torch._dynamo.reset()
    assert len(notes) == 1 and "CUDA graphs" in notes[0] and "default" in notes[0]
    assert runner.compile_mode == "default" and modes == [None] and len(compilations) == 1
    assert all(r.error is None for r in got)
    with pytest.raises(ValueError, match="choose from default"):
        runner.compile("fastest")


def test_results_hold_no_view_of_a_pinned_readback_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a batch's outputs land in pinned buffers; the embeddings the results keep
    are copies in pageable memory (a kept result must not keep page-locked memory alive).
    The pinned buffer is stood in for by a tensor that says it is pinned."""
    buffer = torch.arange(12.0).view(3, 4)
    pinned_at = buffer.untyped_storage().data_ptr()
    monkeypatch.setattr(
        torch.Tensor, "is_pinned", lambda self: self.untyped_storage().data_ptr() == pinned_at
    )
    results = [pipeline.Result(path=f"img{n}") for n in range(3)]

    def store(outputs: tuple[torch.Tensor, ...], done: list[pipeline.Result]) -> None:
        for result, row in zip(done, outputs[0], strict=True):
            result.embedding = row

    readback = pipeline.Readback([(results, (buffer,))], pipeline.Head(lambda b: (b,), store))
    readback.finish()
    for n, result in enumerate(results):
        assert result.embedding is not None
        assert torch.equal(result.embedding, buffer[n])
        assert result.embedding.untyped_storage().data_ptr() != pinned_at
        assert not result.embedding.is_pinned()
    assert readback.seconds is None  # no device events on the CPU


def test_a_batch_is_one_decode_task_per_worker() -> None:
    """A batch of 256 for 15 workers is 15 tasks (every worker starts on the first batch
    and decodes a share of it); tasks are never smaller than MIN_TASK_FILES."""
    files = list(range(256))
    tasks = pipeline.split_tasks(files, 15)
    assert len(tasks) == 15 and [f for task in tasks for f in task] == files
    assert max(map(len, tasks)) - min(map(len, tasks)) <= 18
    small = pipeline.split_tasks(list(range(8)), 15)
    assert [len(t) for t in small] == [pipeline.MIN_TASK_FILES] * 2
    assert pipeline.split_tasks([], 4) == []


def test_every_batch_is_padded_to_one_shape_on_cuda(runner_parts, photos: list[Path]) -> None:
    """On CUDA every batch is padded to the run's batch size (cuDNN's autotuner sees one
    shape), not only under --compile; on the CPU eager batches keep their size.  The pad
    itself is checked on the CPU with the padding switched on as CUDA has it."""
    model, spec = runner_parts
    assert Runner(model, spec, torch.device("cuda"), torch.float32).pads_batches
    assert not Runner(model, spec, CPU, torch.float32).pads_batches
    runner = Runner(model, spec, CPU, torch.float32)
    seen: list[int] = []

    def logits(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        return model(batch)

    runner.logits_fn = logits
    runner.compiled = True  # padding on, as on CUDA
    paths = [str(p) for p in photos[:5]]
    got = [r for batch in runner.classify(paths, batch_size=4, workers=0) for r in batch]
    assert seen == [4, 4] and len(got) == 5  # the last batch of 1 padded to 4
    same(got, results_of(Runner(model, spec, CPU, torch.float32), paths))


def test_a_batchs_model_time_is_the_devices_between_its_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CUDA the summary's model time is the device's: from the event where the batch's
    work began to the one after its outputs' copy, read once the copy is waited for (the
    GPU's wait included), not the host's enqueue.  Events stood in for by fakes."""
    waited: list[str] = []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            self.timing = enable_timing
            self.at = 0.0

        def record(self, stream: object = None) -> None:
            self.at = 2.5 if self.timing else 0.0  # the device finished 2.5 s later

        def synchronize(self) -> None:
            waited.append("synchronize")

        def elapsed_time(self, end: FakeEvent) -> float:
            return (end.at - self.at) * 1000

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    begin = FakeEvent(enable_timing=True)
    begin.at = 1.0
    stored: list[list[pipeline.Result]] = []
    head = pipeline.Head(lambda b: (b,), lambda outputs, results: stored.append(results))
    results = [pipeline.Result(path="a")]
    readback = pipeline.Readback([(results, (torch.zeros(1, 4),))], head, begin)
    assert readback.seconds is None  # not known before the wait
    readback.finish()
    assert waited == ["synchronize"] and stored == [results]
    assert readback.seconds == pytest.approx(1.5)
