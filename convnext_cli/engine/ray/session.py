"""Ray's life cycle for one run: a local Ray on loopback with a token of its own, or the
user's cluster joined with the user's token; Ray Data kept quiet.

Importing this module never imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from convnext_cli.engine import _interrupts as interrupts
from convnext_cli.engine.ray.settings import RaySettings, require_ray
from convnext_cli.errors import UsageError, one_line

REACH_TIMEOUT = 5.0  # seconds for a --ray-address to answer
# set to 0, Ray takes 127.0.0.1 for its node address (see _loopback_only)
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def quiet_ray_data(verbose: bool) -> None:
    """No progress bars or execution banners from Ray Data; its loggers at ERROR."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
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
    only, with a token of its own (:func:`_private_token`), its files in a private (0700)
    folder.  Only what this function started is shut down (never ``ray stop``); a local
    Ray that fails to start is shut down and its folders removed before the one-line
    error."""
    cluster = cluster or RaySettings()
    ray = require_ray()
    if ray.is_initialized():
        quiet_ray_data(cluster.verbose)
        yield ray
        return
    level = logging.INFO if cluster.verbose else logging.ERROR
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # no C++ stack trace and abort on SIGTERM from Ray's core worker in this driver (it is
    # installed inside ray.init, where the CLI's own handler is put back only after it)
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    if not cluster.verbose:
        # the driver's C++ log lines on stderr (Ray Data's actor pools always trigger a
        # warning about constructor arguments in the object store); setting it is itself
        # logged, inside ray.init, where stderr is silenced
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    address = cluster.address or os.environ.get("RAY_ADDRESS") or None
    with contextlib.ExitStack() as stack:
        # a Ctrl-C / SIGTERM inside ray.init is held until Ray has started, then raised:
        # raised inside it, it left a half-started Ray whose shutdown aborted the process
        # (-6) or left Ray's agents running
        with interrupts.deferred(), _own_signal_handlers():
            if address:
                _join(ray, address, cluster, level, stack)
            else:
                check_address_space()
                _start_local(ray, cluster, level, stack)
        quiet_ray_data(cluster.verbose)
        yield ray


@contextlib.contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """The process's SIGINT / SIGTERM handlers as they were before ``ray.init``: Ray's core
    worker installs a C++ failure handler for SIGTERM (a stack trace on the terminal, then
    abort), and Ray's Python a handler of its own; the CLI's (exit 130 / 143, the records
    kept) stay in charge."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    original = signal.signal

    def keep_ours(signum: int, handler: Any) -> Any:  # Ray's Python handlers: not installed
        if signum in saved:
            return signal.getsignal(signum)
        return original(signum, handler)

    signal.signal = keep_ours  # type: ignore[assignment]
    try:
        yield
    finally:
        signal.signal = original
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


def _join(ray: Any, address: str, cluster: RaySettings, level: int, stack: Any) -> None:
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
    stack.callback(ray.shutdown)


def _start_local(ray: Any, cluster: RaySettings, level: int, stack: Any) -> None:
    """A local Ray in a private folder: ``/tmp/convnext-ray-*`` (mode 0700, short, for
    Ray's Unix sockets) holding Ray's own temporary folder, which Ray makes 0777 (and is
    set back to 0700 once started); both removed at the end unless ``verbose`` or the
    caller's ``temp_dir``."""
    stack.enter_context(_environ(stack.enter_context(_private_token())))
    if cluster.temp_dir:
        temp_dir = cluster.temp_dir
    else:
        private = tempfile.mkdtemp(prefix="convnext-ray-", dir="/tmp")  # mode 0700
        if not cluster.verbose:
            stack.callback(shutil.rmtree, private, True)
        temp_dir = os.path.join(private, "r")
    # registered before ray.init: a Ray that half started is shut down too
    stack.callback(ray.shutdown)
    try:
        with _loopback_only(), _silenced_stderr(not cluster.verbose):
            ray.init(
                address="local",  # never join an instance found through ray_current_cluster
                include_dashboard=False,
                logging_level=level,
                log_to_driver=cluster.verbose,
                _temp_dir=temp_dir,
                _system_config={"num_workers_soft_limit": idle_workers_kept()},
            )
    except Exception as exc:
        raise RayFailed(f"--engine ray: the local Ray did not start ({one_line(exc)})") from exc
    with contextlib.suppress(OSError):
        os.chmod(temp_dir, 0o700)


def idle_workers_kept() -> int:
    """Worker processes a local Ray keeps when idle: twice the cores, at least 16.

    Ray's default is the CPU count, and it counts the actors' processes too (the model
    actors and Ray Data's own three), so on a small machine every decode task's worker was
    ended a second after its task and the next task started a new one, which imported torch
    again: on 2 cores, two decode tasks spent 24 ms of CPU per image instead of 6
    (docs/performance.md, "Ray").  A cluster joined with ``--address`` keeps its own
    setting (``RAY_num_workers_soft_limit`` on ``ray start``)."""
    return max(16, 2 * (os.cpu_count() or 1))


class RayFailed(UsageError):
    """Ray could not run here (it did not start, or its node died): one line, exit 2."""


# Ray's processes map far more address space than they use (the object store, each
# worker's heap arenas): under a smaller `ulimit -v` its raylet dies at start and the
# driver is ended from inside Ray's C++ code, exit 1, with no message.
MIN_ADDRESS_SPACE = 24 << 30  # 24 GiB ran, 12 GiB did not (Ray 2.60, 24 GB RAM)


def check_address_space() -> None:
    """RayFailed, before anything starts, when an address-space limit (``ulimit -v``) is
    below :data:`MIN_ADDRESS_SPACE`."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):
        return
    if limit != resource.RLIM_INFINITY and limit < MIN_ADDRESS_SPACE:
        raise RayFailed(
            f"--engine ray: the address-space limit (ulimit -v) is {limit >> 20} MiB; a local "
            f"Ray needs at least {MIN_ADDRESS_SPACE >> 30} GiB of address space (raise the "
            "limit, or use --engine local)"
        )
