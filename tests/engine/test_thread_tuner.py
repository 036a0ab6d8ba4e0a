"""The model's CPU thread count, chosen by measuring during the run (thread_tuner.py).

The tuner itself is driven by a fake clock whose cost per image depends on the thread count
it chose, so what it converges to is known; the Runner's use of it is checked on a real run:
the counts it returns are applied, the results are bit-identical to an untuned run, the
process's thread count is restored, and runs whose numbers could depend on the thread
count (bfloat16), or whose count the user chose, are left alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from types import GeneratorType
from typing import Any

import pytest
import torch

from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
from convnext_cli.engine import pipeline
from convnext_cli.engine.pipeline import Runner, default_workers, plan_workers
from convnext_cli.engine.thread_tuner import FIRST_EXPLOIT, PROBE, ThreadTuner

SETTLE = 2  # batches decoded ahead, as a run with one decoding process has them

Costs = Callable[[int, int], tuple[float, float]]


def simulate(
    cost: Costs, batches: int, choices: tuple[int, ...] = (2, 1), lag: int = 0
) -> list[int]:
    """The thread count each batch ran with, when a batch of 8 at `threads` costs
    ``cost(batch number, threads)[0]`` seconds per image, and the decoding process is busy
    the share ``cost(...)[1]`` of that time.  With `lag`, a batch costs what the count of
    `lag` batches earlier costs (it was decoded then, under that split)."""
    now = [0.0]
    tuner = ThreadTuner(choices, settle=SETTLE, clock=lambda: now[0])
    used: list[int] = []
    for n in range(batches):
        used.append(tuner.threads)
        per_image, busy = cost(n, used[max(0, n - lag)])
        now[0] += 8 * per_image
        tuner.batch_done(8, decoding=8 * per_image * busy)
    return used


DECODE_BOUND = {2: (1.0, 0.95), 1: (0.7, 1.0)}  # the decoder is always busy: one thread wins
MODEL_BOUND = {2: (0.5, 0.15), 1: (0.8, 0.1)}  # the decoder idles: every core for the model


def test_a_decode_bound_run_moves_to_fewer_threads() -> None:
    used = simulate(lambda n, t: DECODE_BOUND[t], 300)
    first_look = 1 + SETTLE + PROBE  # the clock starts at the first batch
    assert used[:first_look] == [2] * first_look  # every core first
    assert used.count(1) / len(used) > 0.9
    # the decoder stays busy on one thread: more threads are not worth a look again
    assert used[first_look:] == [1] * (len(used) - first_look)


def test_a_model_bound_run_never_leaves_every_core() -> None:
    assert simulate(lambda n, t: MODEL_BOUND[t], 300) == [2] * 300


def test_a_waiting_model_that_one_thread_does_not_help_comes_back() -> None:
    """The decoder is busy, so one thread is tried; it is slower, so the run goes back,
    and looks again only after the exploit period."""
    used = simulate(lambda n, t: {2: (1.0, 0.7), 1: (1.6, 0.45)}[t], 300)
    tried = 1 + SETTLE + PROBE
    assert used[tried : tried + SETTLE + PROBE] == [1] * (SETTLE + PROBE)
    assert used.count(2) / len(used) > 0.85
    assert used[-50:].count(2) >= 50 - (SETTLE + PROBE)  # at most one look at the other


def test_batches_decoded_before_a_switch_do_not_mislead_it() -> None:
    """After a switch, the batches decoded ahead still come at the old split's pace; they
    are not measured, so the faster count still wins, in both directions."""
    used = simulate(lambda n, t: DECODE_BOUND[t], 300, lag=SETTLE)
    assert used.count(1) / len(used) > 0.9
    slower_alone = {2: (1.0, 0.7), 1: (1.6, 0.45)}
    used = simulate(lambda n, t: slower_alone[t], 300, lag=SETTLE)
    assert used.count(2) / len(used) > 0.85


def test_noise_does_not_hide_a_clear_difference() -> None:
    rng = random.Random(7)

    def noisy(n: int, threads: int) -> tuple[float, float]:
        per_image, busy = DECODE_BOUND[threads]
        return per_image * rng.uniform(0.8, 1.25), busy * rng.uniform(0.6, 1.0)

    used = simulate(noisy, 400)
    assert used.count(1) / len(used) > 0.8


def test_a_run_that_changes_character_is_followed() -> None:
    """Small photos first (model-bound), then large ones (decode-bound): the tuner looks
    again after its exploit period and moves; large ones then small: it moves back."""
    flip = 150

    def small_then_large(n: int, threads: int) -> tuple[float, float]:
        return (MODEL_BOUND if n < flip else DECODE_BOUND)[threads]

    used = simulate(small_then_large, 600)
    assert used[:flip] == [2] * flip
    assert used[-100:] == [1] * 100
    moved = next(n for n in range(flip, 600) if used[n : n + 20] == [1] * 20)
    assert moved - flip <= 4 * FIRST_EXPLOIT  # the exploit period doubles, from 32 up

    def large_then_small(n: int, threads: int) -> tuple[float, float]:
        return (DECODE_BOUND if n < flip else MODEL_BOUND)[threads]

    used = simulate(large_then_small, 600)
    assert used[flip - 10 : flip] == [1] * 10
    assert used[-100:].count(2) >= 100 - (SETTLE + PROBE)


def test_one_choice_never_switches_and_odd_batches_are_harmless() -> None:
    now = [0.0]
    tuner = ThreadTuner([4, 4], clock=lambda: now[0])
    assert tuner.choices == [4]
    for images in [8, 0, 8, 3, 8] * 40:
        now[0] += 1.0
        assert tuner.batch_done(images) is None
    assert tuner.switches == 0
    with pytest.raises(ValueError):
        ThreadTuner([])


# --- in a run ---------------------------------------------------------------------------


class Scripted(ThreadTuner):
    """Switches every batch between its two counts, and records the count each batch ran
    with (what torch had when the batch ended)."""

    made: list[Scripted] = []

    def __init__(self, choices: list[int], **kwargs: object) -> None:
        super().__init__(choices)
        self.ran_with: list[int] = []
        Scripted.made.append(self)

    def batch_done(self, images: int, decoding: float = 0.0) -> int | None:
        assert images > 0 and decoding > 0  # the decoding process said how long it took
        self.ran_with.append(torch.get_num_threads())
        other = [n for n in self.choices if n != self.threads]
        if other:
            self.threads = other[0]
            return self.threads
        return None


needs_threads = pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: no tuning")


def _runner(checkpoint: Path, dtype: torch.dtype) -> Runner:
    loaded = load_checkpoint(str(checkpoint))
    model = build_model(loaded, torch.device("cpu"), dtype)
    return Runner(model, loaded.preprocess, torch.device("cpu"), dtype)


def _inputs(photos: list[Path], count: int) -> list[str]:
    return [str(photos[n % len(photos)]) for n in range(count)]


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> type[Scripted]:
    Scripted.made = []
    monkeypatch.setattr(pipeline, "ThreadTuner", Scripted)
    for name in pipeline.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    return Scripted


@pytest.fixture
def runner(v1_checkpoint: Path) -> Runner:
    """A float32 CPU runner of the V1 checkpoint."""
    return _runner(v1_checkpoint, torch.float32)


@needs_threads
def test_a_tuned_run_applies_the_counts_and_its_results_do_not_change(
    runner: Runner, photos: list[Path], scripted: type[Scripted]
) -> None:
    before = torch.get_num_threads()
    assert before == pipeline.DEFAULT_THREADS
    paths = _inputs(photos, 40)
    tuned = [r for batch in runner.classify(paths, top_k=5, batch_size=8) for r in batch]
    assert len(scripted.made) == 1
    ran_with = scripted.made[0].ran_with
    assert len(ran_with) == 5 and len(set(ran_with)) == 2  # the counts were applied
    assert torch.get_num_threads() == before  # and put back
    plain = [r for batch in runner.classify(paths, top_k=5, batch_size=8, workers=0) for r in batch]
    assert len(scripted.made) == 1  # decoding in this process: nothing overlaps, no tuning
    assert [r.path for r in tuned] == paths
    # bit for bit by design: the tuner's claim is that float32 results do not depend on the
    # thread counts it picks, and both runs have the same batches (batch_size=8, same paths)
    assert [[(p.index, p.score) for p in r.predictions] for r in tuned] == [
        [(p.index, p.score) for p in r.predictions] for r in plain
    ]
    # embeddings too, bit for bit
    tuned_e = [r for batch in runner.embed(paths, batch_size=8) for r in batch]
    plain_e = [r for batch in runner.embed(paths, batch_size=8, workers=0) for r in batch]
    assert len(scripted.made) == 2
    for a, b in zip(tuned_e, plain_e, strict=True):
        assert a.embedding is not None and b.embedding is not None
        assert torch.equal(a.embedding, b.embedding)


@needs_threads
def test_a_run_stopped_early_gets_its_thread_count_back(
    runner: Runner, photos: list[Path], scripted: type[Scripted]
) -> None:
    before = torch.get_num_threads()
    batches = runner.classify(_inputs(photos, 40), batch_size=8)
    assert isinstance(batches, GeneratorType)
    next(batches)
    assert torch.get_num_threads() != before  # the scripted tuner switched after batch 1
    batches.close()
    assert torch.get_num_threads() == before


def test_what_is_never_tuned(
    v1_checkpoint: Path,
    photos: list[Path],
    scripted: type[Scripted],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paths = _inputs(photos, 24)
    # bfloat16: its matrix products depend on the thread count, a run's numbers must not
    runner = _runner(v1_checkpoint, torch.bfloat16)
    assert sum(len(b) for b in runner.classify(paths, batch_size=8)) == 24
    # one batch: nothing to measure
    runner = _runner(v1_checkpoint, torch.float32)
    assert sum(len(b) for b in runner.classify(paths[:8], batch_size=8)) == 8
    # the user chose the thread count
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert sum(len(b) for b in runner.classify(paths, batch_size=8)) == 24
    monkeypatch.delenv("OMP_NUM_THREADS")
    # torch.compile'd models are not tuned (their kernels were built for a thread count)
    runner.compiled = True
    assert sum(len(b) for b in runner.classify(paths, batch_size=8)) == 24
    assert scripted.made == []


def test_the_plan_overlaps_decoding_when_tuned() -> None:
    """Where the default plan has no decoding process of its own (a small CPU), a tuned
    run's guard process decodes the next batch while the model runs."""
    plain = plan_workers(None, 100, 8, "cpu")
    tuned = plan_workers(None, 100, 8, "cpu", tuned=True)
    if default_workers(100, 8, "cpu") == 0:
        assert plain == (1, 1) and tuned == (1, 2)
    else:
        assert plain == tuned
    assert plan_workers(None, 8, 8, "cpu", tuned=True) == (1, 1)  # one batch
    assert plan_workers(2, 100, 8, "cpu", tuned=True) == plan_workers(2, 100, 8, "cpu")


@pytest.mark.parametrize("faster", [1, 2])
def test_a_blind_tuner_measures_every_count_each_round(faster: int) -> None:
    """A Ray model actor does not see its decoders' load (``blind``): each round measures
    both counts and keeps the faster one, fewer threads or more, whatever the decoders do."""
    now = [0.0]
    tuner = ThreadTuner([2, 1], clock=lambda: now[0], blind=True)
    used: list[int] = []
    for _ in range(400):
        used.append(tuner.threads)
        now[0] += 8 * (0.5 if tuner.threads == faster else 1.0)
        tuner.batch_done(8)  # decoding unknown: 0
    assert used.count(faster) / len(used) > 0.9
    slower = 3 - faster
    assert used.count(slower) >= 2 * PROBE  # it looked again after the first round
    # without `blind`, idle decoders (0) mean fewer threads are never worth a look
    now[0] = 0.0
    seeing = ThreadTuner([2, 1], clock=lambda: now[0])
    for _ in range(100):
        now[0] += 8.0
        seeing.batch_done(8)
    assert seeing.threads == 2 and seeing.switches == 0


def test_a_ray_actor_tunes_only_float32_eager_cpu_runs() -> None:
    from types import SimpleNamespace

    from convnext_cli.engine.ray.settings import ActorPlan
    from convnext_cli.engine.ray.stages import actor_tuner

    def runner(
        device: str = "cpu", dtype: torch.dtype = torch.float32, compiled: bool = False
    ) -> Any:  # what actor_tuner reads of a Runner
        return SimpleNamespace(device=torch.device(device), dtype=dtype, compiled=compiled)

    def plan(threads: int | None) -> ActorPlan:
        return ActorPlan(1, 0.25, 0.0, threads, 0.5, 8, 2)

    tuner = actor_tuner(plan(4), runner())
    assert tuner is not None and tuner.choices == [4, 3] and tuner.blind
    assert actor_tuner(plan(1), runner()) is None
    assert actor_tuner(plan(None), runner()) is None  # a GPU actor
    assert actor_tuner(plan(4), runner(dtype=torch.bfloat16)) is None
    assert actor_tuner(plan(4), runner(compiled=True)) is None
    assert actor_tuner(plan(4), runner("cuda")) is None
