"""classify and embed on Ray Data: decoding in CPU tasks, the model in an actor pool.

The pipeline, for the ordered list of inputs ``paths``::

    rows (id, file bytes)                                         -- the driver's list
      -> decode: read, decode and resize with our own code        -- CPU tasks (retried)
         (decode_pool.decode_one: the SPEC's decoding policy and the checkpoint's
         preprocessing), rows of (id, error, shape, uint8 pixel bytes)
      -> model: a pool of actors, each loading the model once     -- ActorPoolStrategy,
         (one per GPU by default, CPU actors otherwise), rows of     min = max = replicas
         (id, error, labels/indices/scores) or (id, error, embedding)
      -> the driver, in input order (preserve_order), as pipeline.Result batches;
         or Parquet part files written by the actors (write_parts_on_ray).

Every input yields exactly one record: an image that cannot be decoded, or that the model
cannot run on, is an error row (the same one-line reasons as the local engine), never an
exception in a task or an actor.  A worker process killed mid-run (OOM killer, kill -9)
is Ray's to retry: decode tasks are retried (Ray's default for tasks: 3 times), model
actors are restarted and their unfinished batches retried (Ray Data's defaults for actor
pools: ``max_restarts=-1``, ``max_task_retries=-1``); ``preserve_order`` keeps one output
block per input block, so nothing is duplicated.  Parquet parts are named by their first
and last input ids and written under a temporary name then renamed, so that a retried
batch rewrites the same file.

Ray is optional: importing this module never imports it; calling into it without Ray
raises :class:`UsageError` naming the extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cli.checkpoints.checkpoint import Checkpoint
from convnext_cli.choices import DECODERS
from convnext_cli.engine.loading import ModelSource, RunOptions, load_runner, read_source
from convnext_cli.engine.pipeline import Runner
from convnext_cli.engine.task import Task
from convnext_cli.errors import UsageError
from convnext_cli.imaging.preprocess import PreprocessSpec
from convnext_cli.inputs.datasets import Item
from convnext_cli.inputs.expand import InputRef, input_id
from convnext_cli.outputs.parquet import CLASSIFY_SCHEMA, METADATA_KEY, embed_schema, parquet_row
from convnext_cli.results import Result

if TYPE_CHECKING:
    import pyarrow as pa

NEEDS_RAY = "--engine ray needs Ray: pip install 'convnext-cli[ray]'"

# Test-only: a folder named by this variable (set only by the tests) gets a line in its
# ``pids`` file per stage call ("decode|actor-start|actor-call PID FIRST_ID TIME"), so
# that a test can kill the process from outside; a number in its ``delay-decode`` /
# ``delay-actor`` file is a pause in seconds per call, so that a kill lands mid-run.
TEST_DIR_ENV = "CONVNEXT_RAY_TEST_DIR"

DECODE_ROWS = 16  # inputs per decode task batch
PART_ROWS = 256  # inputs per model-actor call, and so per Parquet part, when writing parts
PART_GLOB = "part-*.parquet"
REACH_TIMEOUT = 5.0  # seconds for a --ray-address to answer
# set to 0, Ray takes 127.0.0.1 for its node address (see _loopback_only)
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
    """Where the model actors write their Parquet parts (``-o DIR``), and the
    ``convnext_cli`` key-value metadata (the run's provenance) each part carries."""

    folder: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    run_tag: str = ""  # in the part names: set by write_parts_on_ray, one per run


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


# --- Ray's life cycle ----------------------------------------------------------------------


def quiet_ray_data(verbose: bool) -> None:
    """No progress bars or execution banners from Ray Data; its loggers at ERROR."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.execution_options.preserve_order = True
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ray", "ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _silenced_stderr(enabled: bool) -> Iterator[None]:
    """File descriptor 2 to /dev/null (what C++ code and started processes write there);
    Python exceptions still propagate.  The processes ray.init starts keep logging to
    files in Ray's session folder."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _environ(changes: Mapping[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``changes`` (None: unset) for the block, restored after it."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        _set_environ(changes)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _reload_auth_settings()


def _reload_auth_settings() -> None:
    """Ray reads ``RAY_AUTH_MODE`` into its config and caches the token it loads: make this
    process see the environment as it is now (what Ray itself does when it turns token
    authentication on)."""
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's servers on 127.0.0.1 only.

    ``_node_ip_address="127.0.0.1"`` does not do it: ``ray.init`` replaces a loopback
    address by the machine's routable one, and its servers (GCS, raylet, every worker) then
    listen on all interfaces.  Without a node address, Ray takes 127.0.0.1 when it believes
    clusters are off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ``ray`` is
    imported, hence the constant too), and its servers then bind 127.0.0.1 alone.
    """
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _environ({LOOPBACK_ENV: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _private_token() -> Iterator[dict[str, str | None]]:
    """A fresh random token for one local Ray, in a file in a private (0700) folder removed
    at the end; the environment that gives it to the driver and, by inheritance, to every
    process Ray starts (the user's own ``RAY_AUTH_TOKEN`` and ``~/.ray`` token unused)."""
    folder = tempfile.mkdtemp(prefix="convnext-ray-auth-")  # mode 0700
    try:
        path = os.path.join(folder, "token")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secrets.token_hex(32))
        yield {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": path, "RAY_AUTH_TOKEN": None}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS address ``HOST:PORT`` (or ``ray://HOST:PORT``); None for what
    is not one (``auto``, a bare host)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(address: str, timeout: float = REACH_TIMEOUT) -> None:
    """A usage error, at once, when nothing answers at ``address`` (Ray itself would retry
    for a minute or more)."""
    target = split_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError) or reason == "timed out":
            reason = f"no answer within {timeout:g} s"
        raise UsageError(f"--ray-address {address}: cannot reach a Ray cluster ({reason})") from exc


def cluster_requires_token(address: str) -> bool | None:
    """Whether the GCS at ``address`` refuses a caller without a token: a call with
    authentication off in this process.  None when it cannot be told (a Ray Client
    ``ray://`` address, or no answer)."""
    if address.startswith("ray://") or split_address(address) is None:
        return None
    from ray.exceptions import AuthenticationError

    with _environ({"RAY_AUTH_MODE": "disabled"}):
        from ray._raylet import GcsClient  # type: ignore[attr-defined]

        try:
            client = GcsClient(address=address)
            client.internal_kv_get(b"convnext-probe", None, timeout=REACH_TIMEOUT)
        except AuthenticationError:
            return True
        except Exception as exc:  # RpcError and the like
            if "auth" in str(exc).lower():
                return True
            return None
    return False


NO_AUTH_WARNING = (
    "warning: the Ray cluster at {address} has no authentication: anyone who can reach it "
    "can run code there (start it with RAY_AUTH_MODE=token)"
)


def join_settings(address: str, verbose: bool = False) -> dict[str, str | None]:
    """The environment to join the user's cluster with: the user's own token (Ray's lookup:
    ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) when the cluster
    asks for one, which Ray does not send to an explicit address unless
    ``RAY_AUTH_MODE=token``; one warning line when the cluster has no authentication."""
    if os.environ.get("RAY_AUTH_MODE"):
        return {}  # the user's explicit choice
    with _silenced_stderr(not verbose):  # Ray's C++ line about the refused probe
        requires = cluster_requires_token(address)
    if requires is False:
        with contextlib.suppress(OSError, ValueError):
            print(NO_AUTH_WARNING.format(address=address), file=sys.stderr, flush=True)
        return {}
    if requires is None:
        return {}
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise UsageError(
            f"--ray-address {address}: the cluster needs its token: set RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH (or put it in ~/.ray/auth_token)"
        )
    return {"RAY_AUTH_MODE": "token"}


@contextlib.contextmanager
def ray_session(cluster: RaySettings | None = None) -> Iterator[Any]:
    """Ray for one run: the instance already initialised here, the cluster at
    ``cluster.address`` / ``RAY_ADDRESS``, or a local one started for the run: on 127.0.0.1
    only, with a token of its own (:func:`_private_token`).  Only what this function
    started is shut down (never ``ray stop``)."""
    cluster = cluster or RaySettings()
    ray = require_ray()
    if ray.is_initialized():
        quiet_ray_data(cluster.verbose)
        yield ray
        return
    level = logging.INFO if cluster.verbose else logging.ERROR
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not cluster.verbose:
        # the driver's C++ log lines on stderr (Ray Data's actor pools always trigger a
        # warning about constructor arguments in the object store); setting it is itself
        # logged, inside ray.init, where stderr is silenced
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    address = cluster.address or os.environ.get("RAY_ADDRESS") or None
    temp_dir = None
    with contextlib.ExitStack() as stack:
        if address:
            check_reachable(address)
            stack.enter_context(_environ(join_settings(address, cluster.verbose)))
            target = split_address(address)
            # a cluster on this machine's loopback: this driver's node address is 127.0.0.1
            # too (else Ray looks for a node on the routable address, and waits)
            on_loopback = target is not None and _is_loopback(target[0])
            with contextlib.ExitStack() as init:
                if on_loopback and not address.startswith("ray://"):
                    init.enter_context(_loopback_only())
                init.enter_context(_silenced_stderr(not cluster.verbose))
                ray.init(address=address, logging_level=level, log_to_driver=cluster.verbose)
        else:
            stack.enter_context(_environ(stack.enter_context(_private_token())))
            temp_dir = cluster.temp_dir or tempfile.mkdtemp(prefix="convnext-ray-", dir="/tmp")
            with _loopback_only(), _silenced_stderr(not cluster.verbose):
                ray.init(
                    address="local",  # never join an instance found through ray_current_cluster
                    include_dashboard=False,
                    logging_level=level,
                    log_to_driver=cluster.verbose,
                    _temp_dir=temp_dir,
                )
        try:
            quiet_ray_data(cluster.verbose)
            yield ray
        finally:
            ray.shutdown()
            if temp_dir and not cluster.temp_dir and not cluster.verbose:
                shutil.rmtree(temp_dir, ignore_errors=True)


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
    # CPU actors: the model is the slow stage, decoding needs a fraction of the cores (as
    # the local engine's one decode worker per four cores); every extra decode process
    # only pays torch's import and competes with the model for the same cores
    decode_tasks = max(1, int(cpus) // 4)
    return ActorPlan(replicas, actor_cpus, 0.0, threads, decode_cpus, batch_size or 8, decode_tasks)


# --- the stages ----------------------------------------------------------------------------


def _test_hook(event: str, first_id: int = -1) -> None:
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


_ITEM = b"\0item\0"  # a file path never holds NUL: a dataset member or row follows, as JSON


def encode_ref(ref: InputRef) -> bytes:
    """An input for the ``file`` column: a path's bytes (``os.fsencode``, any name the file
    system allows), or a tar member / Parquet row as JSON."""
    if isinstance(ref, str):
        return os.fsencode(ref)
    return _ITEM + json.dumps(dataclasses.asdict(ref)).encode("ascii")


def decode_ref(raw: bytes) -> InputRef:
    if raw.startswith(_ITEM):
        return Item(**json.loads(raw[len(_ITEM) :]))
    return os.fsdecode(raw)


def decode_rows(batch: pa.Table, spec: PreprocessSpec) -> pa.Table:
    """Decode stage (a CPU task): (id, file) -> (id, error, shape, pixels).

    ``file`` holds the path's bytes (``os.fsencode``: any name the file system allows);
    ``pixels`` a uint8 (3, h, w) image as bytes, resized and cropped per ``spec``.
    """
    import pyarrow as pa
    import torch

    from convnext_cli.engine.decode_pool import decode_one

    ids = batch.column("id").to_pylist()
    _test_hook("decode", ids[0] if ids else -1)
    errors: list[str | None] = []
    shapes: list[list[int] | None] = []
    pixels: list[bytes | None] = []
    for raw in batch.column("file").to_pylist():
        outcome = decode_one(decode_ref(raw), spec, False)
        if isinstance(outcome, torch.Tensor):
            errors.append(None)
            shapes.append(list(outcome.shape))
            pixels.append(outcome.contiguous().numpy().tobytes())
        else:  # the one-line reason (decode_one never raises)
            errors.append(str(outcome))
            shapes.append(None)
            pixels.append(None)
    return pa.table(
        {
            "id": batch.column("id"),
            "error": pa.array(errors, pa.string()),
            "shape": pa.array(shapes, pa.list_(pa.int32())),
            "pixels": pa.array(pixels, pa.binary()),
        }
    )


class ModelActor:
    """Model stage: one actor per replica, the model loaded once in the constructor.

    Rows in: (id, error, shape, pixels) [+ file when writing parts]; rows out: (id, error,
    labels, indices, scores) for classify, (id, error, embedding) for embed, or, with
    ``parts``, (id, error) after writing the batch as a Parquet part.  ``run`` is the
    driver's, as it is: the model loads from its source and options, and its task runs.
    """

    def __init__(self, run: RayRun, plan: ActorPlan, parts: PartFiles | None = None) -> None:
        import torch

        if plan.threads:
            torch.set_num_threads(plan.threads)  # Ray sets OMP_NUM_THREADS to the actor's CPUs
        _test_hook("actor-start")
        self.task = run.task
        self.batch_size = plan.batch_size
        self.runner = load_runner_in_actor(run)
        # The decode tasks resized and cropped already: the runner only normalises.
        self.runner.spec = dataclasses.replace(
            self.runner.spec, do_resize=False, do_center_crop=False
        )
        self.parts = parts

    def __call__(self, batch: pa.Table) -> pa.Table:
        import numpy as np
        import torch

        from convnext_cli.results import InMemoryImage

        ids = batch.column("id").to_pylist()
        items = []
        for i, error, shape, data in zip(
            ids,
            batch.column("error").to_pylist(),
            batch.column("shape").to_pylist(),
            batch.column("pixels").to_pylist(),
            strict=True,
        ):
            if error is not None:
                items.append(InMemoryImage(str(i), None, error))
                continue
            array = np.frombuffer(data, dtype=np.uint8).reshape(shape)
            items.append(InMemoryImage(str(i), torch.from_numpy(array.copy())))
        batches = self.task.run(self.runner, items, workers=0, batch_size=self.batch_size)
        results = [r for results in batches for r in results]
        _test_hook("actor-call", ids[0] if ids else -1)
        if self.parts is not None:
            files = [input_id(decode_ref(f)) for f in batch.column("file").to_pylist()]
            return self._write_part(ids, files, results)
        return self._columns(ids, results)

    def _columns(self, ids: list[int], results: list[Result]) -> pa.Table:
        import pyarrow as pa

        errors = [r.error for r in results]
        if self.task.command == "embed":
            vectors = [
                None if r.error is not None or r.embedding is None else r.embedding.numpy()
                for r in results
            ]
            return pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "error": pa.array(errors, pa.string()),
                    "embedding": pa.array(
                        [None if v is None else v.tolist() for v in vectors],
                        pa.list_(pa.float32()),
                    ),
                }
            )
        return pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "error": pa.array(errors, pa.string()),
                "labels": pa.array([[p.label for p in r.predictions] for r in results]),
                "indices": pa.array(
                    [[p.index for p in r.predictions] for r in results], pa.list_(pa.int32())
                ),
                "scores": pa.array(
                    [[float(p.score) for p in r.predictions] for r in results],
                    pa.list_(pa.float64()),
                ),
            }
        )

    def _write_part(self, ids: list[int], files: list[str], results: list[Result]) -> pa.Table:
        """This batch as one part file, named by its first and last ids: a retried batch
        rewrites the same file, so no row is ever written twice."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        assert self.parts is not None
        pairs = zip(files, results, strict=True)
        task = self.task.command
        rows = [parquet_row(dataclasses.replace(r, path=path), task) for path, r in pairs]
        schema = (
            CLASSIFY_SCHEMA
            if task == "classify"
            else embed_schema(self.runner.model.config.hidden_sizes[-1])
        )
        metadata = {METADATA_KEY: json.dumps(dict(self.parts.metadata), sort_keys=True)}
        table = pa.Table.from_pylist(rows, schema=schema.with_metadata(metadata))
        name = f"part-{self.parts.run_tag}-{min(ids):010d}-{max(ids):010d}.parquet"
        folder = Path(self.parts.folder)
        final = folder / name
        temporary = folder / f".{name}.{os.getpid()}.tmp"
        pq.write_table(table, temporary)
        os.replace(temporary, final)
        return pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "error": pa.array([r.error for r in results], pa.string()),
            }
        )


def build_dataset(
    ray: Any,
    paths: Sequence[InputRef],
    run: RayRun,
    spec: PreprocessSpec,
    plan: ActorPlan,
    parts: PartFiles | None = None,
) -> Any:
    """The lazy Ray Dataset: rows -> decode tasks -> model actors."""
    import pyarrow as pa

    # one block per DECODE_ROWS inputs, made here (no repartition stage)
    blocks = [
        pa.table(
            {
                "id": pa.array(range(start, min(start + DECODE_ROWS, len(paths))), pa.int64()),
                "file": pa.array(
                    [encode_ref(p) for p in paths[start : start + DECODE_ROWS]], pa.binary()
                ),
            }
        )
        for start in range(0, len(paths), DECODE_ROWS)
    ]
    ds = ray.data.from_arrow(blocks)
    # with parts, the model stage writes the paths: the file column comes along
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    decoded = ds.map_batches(
        decode_rows if parts is None else _decode_keeping_file,
        fn_kwargs={"spec": spec},
        batch_size=DECODE_ROWS,
        batch_format="pyarrow",
        num_cpus=plan.decode_cpus,
        compute=TaskPoolStrategy(size=plan.decode_tasks),
    )

    return decoded.map_batches(
        ModelActor,
        fn_constructor_kwargs={
            "run": run,
            "plan": plan,
            "parts": parts,
        },
        compute=ActorPoolStrategy(min_size=plan.replicas, max_size=plan.replicas),
        # the runner splits a call into model batches itself; a part is one call
        batch_size=plan.batch_size if parts is None else max(plan.batch_size, PART_ROWS),
        batch_format="pyarrow",
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus or None,
    )


def _decode_keeping_file(batch: pa.Table, spec: PreprocessSpec) -> pa.Table:
    return decode_rows(batch, spec).append_column("file", batch.column("file"))


# --- the two ways out ----------------------------------------------------------------------


def results_from_table(table: pa.Table, paths: Sequence[str], task: str) -> list[Result]:
    """Model-stage rows back into Result objects, with each input's own path."""
    from convnext_cli.results import Prediction, Result

    ids = table.column("id").to_pylist()
    errors = table.column("error").to_pylist()
    out = []
    if task == "embed":
        import numpy as np
        import torch

        vectors = table.column("embedding").to_pylist()
        for i, error, vector in zip(ids, errors, vectors, strict=True):
            embedding = None
            if error is None and vector is not None:
                embedding = torch.from_numpy(np.asarray(vector, dtype=np.float32))
            out.append(Result(path=paths[i], error=error, embedding=embedding))
        return out
    columns = zip(
        ids,
        errors,
        table.column("labels").to_pylist(),
        table.column("indices").to_pylist(),
        table.column("scores").to_pylist(),
        strict=True,
    )
    for i, error, labels, indices, scores in columns:
        predictions = [
            Prediction(label, index, score)
            for label, index, score in zip(labels or [], indices or [], scores or [], strict=True)
        ]
        out.append(Result(path=paths[i], error=error, predictions=predictions))
    return out


def _stream(
    refs: Sequence[InputRef], run: RayRun, parts: PartFiles | None
) -> Iterator[list[Result]]:
    if not refs:
        return
    paths = [input_id(ref) for ref in refs]  # what each record says as its path
    with contextlib.ExitStack() as stack:
        ray, (spec, _width) = _start(stack, run)
        plan = plan_actors(ray.cluster_resources(), run)
        ds = build_dataset(ray, refs, run, spec, plan, parts)
        expected = 0
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            if table.num_rows == 0:
                continue
            if parts is None:
                results = results_from_table(table, paths, run.task.command)
            else:
                results = _light_results(table, paths)
            for offset, result in enumerate(results):
                if result.path != paths[expected + offset]:
                    raise RuntimeError("Ray returned the records out of order")
                result.source = refs[expected + offset]  # the HTML report reads it, not path
            expected += len(results)
            yield results
        if expected != len(paths):
            raise RuntimeError(f"Ray returned {expected} records for {len(paths)} inputs")


def _start(stack: contextlib.ExitStack, run: RayRun) -> tuple[Any, tuple[PreprocessSpec, int]]:
    """Ray for the run (closed with ``stack``), and the checkpoint's facts: the caller's,
    or read (torch imported, weights checked) while Ray starts."""
    from concurrent.futures import ThreadPoolExecutor

    if run.facts is not None:
        return stack.enter_context(ray_session(run.cluster)), run.facts
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_preprocessing, run.source, run.task.command)
        try:
            ray = stack.enter_context(ray_session(run.cluster))
        except BaseException:
            reading.result()  # a bad model is the error to report, not Ray's
            raise
        return ray, reading.result()


def _light_results(table: pa.Table, paths: Sequence[str]) -> list[Result]:
    """The rows of a part written by the actors: path and error, for progress."""
    ids = table.column("id").to_pylist()
    errors = table.column("error").to_pylist()
    return [Result(path=paths[i], error=e) for i, e in zip(ids, errors, strict=True)]


def run_on_ray(paths: Sequence[InputRef], run: RayRun) -> Iterator[list[Result]]:
    """Every input's Result, in input order, batch by batch (what Runner.classify/embed
    yield), computed on Ray: the driver receives plain columns and builds the Results.

    Raises UsageError without Ray, for a bad model (before Ray starts), or a classify on a
    feature model.  Progress is the caller's, from the batches.
    """
    require_ray()
    return _stream(list(paths), run, None)


def write_parts_on_ray(
    paths: Sequence[InputRef], run: RayRun, parts: PartFiles
) -> Iterator[list[Result]]:
    """Records written by the model actors as Parquet part files into ``parts.folder``
    (created), the project's Parquet columns, one row per input, none through the driver;
    each part carries ``parts.metadata``.

    Yields, in input order, light Results (path and error only) for progress and the exit
    code.  A part is named ``part-<run>-<first id>-<last id>.parquet`` and written under a
    temporary name then renamed; :func:`done_paths` lists what a folder already holds.
    """
    require_ray()
    target = Path(parts.folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{target}: cannot write output ({exc.strerror})") from exc
    # the actors' working folder is not the driver's; the run's tag names its parts
    run_tag = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    parts = dataclasses.replace(parts, folder=str(target.resolve()), run_tag=run_tag)
    return _stream(list(paths), run, parts)


def done_paths(folder: str | os.PathLike[str], include_errors: bool = True) -> set[str]:
    """The ``path`` values of every readable part in ``folder`` (for ``--resume``: skip
    the inputs whose ``names.path_field(path)`` is in it); without ``include_errors``, only
    the rows that succeeded.  Temporary files of an interrupted write are ignored (and
    removed); a part that cannot be read is ignored too."""
    import pyarrow.parquet as pq

    target = Path(folder)
    if not target.is_dir():
        return set()
    for stale in target.glob(".part-*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    done: set[str] = set()
    for part in sorted(target.glob(PART_GLOB)):
        try:
            table = pq.read_table(part, columns=["path", "error"])
        except Exception:
            continue
        for path, error in zip(
            table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True
        ):
            if path is not None and (include_errors or error is None):
                done.add(path)
    return done
