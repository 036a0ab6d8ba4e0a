"""What a Ray run is made of: its settings, its actors' plan, the checkpoint facts the driver
reads, and the loading of the model in an actor.

Ray is optional: importing this module never imports it; :func:`require_ray` raises
:class:`UsageError` naming the extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from convnext_cli.checkpoints.checkpoint import Checkpoint
from convnext_cli.choices import DECODERS
from convnext_cli.engine.loading import ModelSource, RunOptions, load_runner, read_source
from convnext_cli.engine.pipeline import Runner
from convnext_cli.engine.task import Task
from convnext_cli.errors import UsageError
from convnext_cli.imaging.preprocess import PreprocessSpec

NEEDS_RAY = "--engine ray needs Ray: pip install 'convnext-cli[ray]'"

# Test-only: a folder named by this variable (set only by the tests) gets a line in its
# ``pids`` file per stage call ("decode|actor-start|actor-call PID FIRST_ID TIME"), so
# that a test can kill the process from outside; a number in its ``delay-decode`` /
# ``delay-actor`` file is a pause in seconds per call, so that a kill lands mid-run.
TEST_DIR_ENV = "CONVNEXT_RAY_TEST_DIR"

DECODE_ROWS = 16  # inputs per decode task batch
PART_ROWS = 256  # inputs per model-actor call when writing parts


@dataclass(frozen=True)
class RaySettings:
    """What only a Ray run has: the cluster and its actors.

    - ``replicas``: model actors (None: one per GPU in the cluster, or CPU actors when
      there is no GPU or the device is ``cpu``: see :func:`plan_actors`).  All of them
      are started at once (``min_size == max_size``); more than the GPUs of a cluster is
      a usage error when the model runs on CUDA.
    - ``address``: a Ray cluster to join (None: ``RAY_ADDRESS``, else a local Ray started
      for the run, on 127.0.0.1 only and with a token of its own, and shut down at its
      end).  When Ray is already initialised in this process, that instance is used and
      left running.
    - ``verbose``: Ray's own logging and the workers' output on stderr (else only errors).
    - ``temp_dir``: a local Ray's temporary folder (None: a fresh one under /tmp, removed
      at the end unless ``verbose``).
    """

    replicas: int | None = None
    address: str | None = None
    verbose: bool = False
    temp_dir: str | None = None

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise UsageError(f"--replicas {self.replicas}: use 1 or more")


@dataclass(frozen=True)
class RayRun:
    """What a Ray run needs besides its inputs: the objects the local engine runs from,
    which the model actors receive as they are (pickled by Ray).

    - ``source`` / ``options``: as :func:`~convnext_cli.engine.loading.load_runner` takes
      them; each actor loads through it, on its own device (:func:`actor_options`: ``auto``
      picks the actor's GPU when it has one, ``cuda:N`` means the actor's own GPU, which
      Ray assigns; the decode tasks decode on the CPU whatever ``options.decode`` says,
      and :func:`decode_notice` says so for ``gpu``).
    - ``task``: what the head computes (:class:`~convnext_cli.engine.task.Task`); its
      ``batch_size`` None: 32 per call on a GPU, 8 on the CPU.
    - ``cluster``: the Ray-only settings (:class:`RaySettings`).
    - ``facts``: the checkpoint's preprocessing and feature width, when the caller has
      read it (:func:`checkpoint_facts`): the driver then does not read it a second time.
    """

    source: ModelSource
    options: RunOptions = field(default_factory=RunOptions)
    task: Task = field(default_factory=Task)
    cluster: RaySettings = field(default_factory=RaySettings)
    facts: tuple[PreprocessSpec, int] | None = None

    def __post_init__(self) -> None:
        if self.options.decode.lower() not in DECODERS:
            raise UsageError(
                f"unknown --decode {self.options.decode!r} (use {', '.join(DECODERS)})"
            )
        if self.task.features:
            raise UsageError("--stage/--backbone run on the local engine only")


@dataclass(frozen=True)
class PartFiles:
    """Where the cluster writes each unit's Parquet part and status (``-o DIR``), and the
    ``convnext_cli`` key-value metadata (the run's provenance) each part carries."""

    folder: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


def actor_options(options: RunOptions) -> RunOptions:
    """The run options as an actor applies them: Ray gives each GPU actor its own GPU
    (CUDA_VISIBLE_DEVICES), so ``cuda:N`` means ``cuda`` there; JPEGs are decoded by the
    CPU decode tasks, so the actor's runner decodes nothing."""
    device = "cuda" if options.device.startswith("cuda") else options.device
    return dataclasses.replace(options, device=device, decode="cpu")


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and what each asks Ray for."""

    replicas: int
    num_cpus: float
    num_gpus: float
    threads: int | None  # torch threads in a CPU actor (None: leave torch's default)
    decode_cpus: float  # what each decode task asks for
    batch_size: int
    decode_tasks: int | None = None  # decode tasks at once (None: as many as fit)


def decode_notice(decode: str) -> str | None:
    """The line to say for a ``--decode`` the Ray engine does not honour: its decode tasks
    run on the CPU (Pillow) and send pixels to the model actors, which never see the JPEG
    bytes; ``gpu`` (nvjpeg in the actors) is not done there.  None for auto and cpu."""
    if decode.lower() == "gpu":
        return (
            "warning: --engine ray decodes JPEGs in CPU tasks (Pillow): --decode gpu is "
            "not used there (use the local engine for nvjpeg)"
        )
    return None


def require_ray() -> Any:
    """The ``ray`` module, or the one-line usage error naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise UsageError(NEEDS_RAY) from exc
    return ray


# --- loading: the one place an actor gets its model --------------------------------------


def load_runner_in_actor(run: RayRun) -> Runner:
    """Load the model once, on this actor's device, through the core's one loading path."""
    return load_runner(run.source, actor_options(run.options)).runner


def read_preprocessing(source: ModelSource, task: str) -> tuple[PreprocessSpec, int]:
    """On the driver, before Ray starts: the checkpoint's preprocessing and feature width,
    and the usage errors a bad model or a classify on a feature model should give."""
    return checkpoint_facts(read_source(source), task)


def checkpoint_facts(checkpoint: Checkpoint, task: str) -> tuple[PreprocessSpec, int]:
    """What the decode tasks and the driver need of a checkpoint already read: its
    preprocessing and feature width (and the refusal of a classify on a feature model)."""
    if task == "classify" and not checkpoint.config.labels:
        raise UsageError(
            "this checkpoint has no classification head (a feature model): use `convnext embed`"
        )
    return checkpoint.preprocess, int(checkpoint.config.hidden_sizes[-1])


def plan_actors(resources: Mapping[str, float], run: RayRun) -> ActorPlan:
    """Model actors for the cluster's resources (``ray.cluster_resources()``).

    - GPUs (and ``device`` not ``cpu``): ``replicas`` or one per GPU, one GPU each;
      ``replicas`` above the GPU count is a usage error (those actors would wait forever
      for a GPU), and so is a ``cuda`` device on a cluster without one.
    - no GPU: ``replicas`` or one CPU actor per 8 CPUs (at least 1), each running torch on
      its share of the CPUs (``threads``).
    - CPUs asked: on a small machine (4 CPUs or fewer) a decode task asks for half a CPU
      and an actor for a quarter, so that an actor pool plus a decode task can never wait
      on each other for a whole CPU; elsewhere a decode task asks for 1 CPU, a GPU actor
      for 1, a CPU actor for its threads less one (at least 2).  An actor never asks for
      what a decode task asks for: Ray Data fuses stages with equal resources into one,
      which would decode inside the actors.
    """
    device, replicas, batch_size = run.options.device, run.cluster.replicas, run.task.batch_size
    cpus = float(resources.get("CPU", 1.0))
    gpus = int(resources.get("GPU", 0))
    small = cpus <= 4
    decode_cpus = 0.5 if small else 1.0
    if gpus == 0 and device.startswith("cuda"):
        raise UsageError(f"--device {device}: the Ray cluster reports no GPU")
    if gpus > 0 and device not in ("cpu", "mps"):
        if replicas is not None and replicas > gpus:
            # each actor asks for a whole GPU: the ones above the count would never start
            raise UsageError(
                f"--replicas {replicas}: the Ray cluster reports {gpus} GPU(s), one "
                f"per replica; use --replicas {gpus} or fewer (or --device cpu)"
            )
        replicas = replicas or gpus
        actor_cpus = 0.25 if small else 1.0
        return ActorPlan(replicas, actor_cpus, 1.0, None, decode_cpus, batch_size or 32)
    replicas = replicas or max(1, int(cpus) // 8)
    threads = max(1, int(cpus) // replicas)
    actor_cpus = 0.25 if small else float(max(2, threads - 1))
    # CPU actors: one decode task per core at most.  A model-bound run's decode tasks wait
    # on Ray Data's backpressure most of the time; a decode-bound one (a small model, large
    # photos) needs them all (measured on 2 cores: one task gave 82% of the local engine's
    # rate, two 110%; ConvNeXt-T's shape 112% and 103%)
    decode_tasks = max(1, int(cpus))
    return ActorPlan(replicas, actor_cpus, 0.0, threads, decode_cpus, batch_size or 8, decode_tasks)


# --- test hooks ----------------------------------------------------------------------------


def test_hook(event: str, first_id: int = -1) -> None:
    """Test-only (see TEST_DIR_ENV): record this process and pause; nothing otherwise."""
    folder = os.environ.get(TEST_DIR_ENV)
    if not folder:
        return
    with open(os.path.join(folder, "pids"), "a", encoding="utf-8") as out:
        out.write(f"{event} {os.getpid()} {first_id} {time.time():.3f}\n")
    with contextlib.suppress(OSError, ValueError):
        stage = event.split("-")[0]
        with open(os.path.join(folder, f"delay-{stage}"), encoding="utf-8") as delay:
            time.sleep(float(delay.read().strip() or 0))
