"""Where ``convnext serve`` listens: ``$XDG_RUNTIME_DIR/convnext/``, else a 0700 folder of the
user's in the temp folder; the socket is mode 0600 and only the same user is served.

Nothing here imports torch: the client and ``convnext --help`` stay light.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from convnext_cli.errors import UsageError

SOCKET_NAME = "server.sock"
LOCK_NAME = "server.lock"
LOG_NAME = "server.log"
MAX_SOCKET_PATH = 107  # sockaddr_un's sun_path, less its terminating NUL


def runtime_folder() -> Path:
    """The folder the socket, its lock and the detached server's log are in (not created)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return Path(runtime) / "convnext"
    return Path(tempfile.gettempdir()) / f"convnext-{os.getuid()}"


def socket_path() -> Path:
    """The server's Unix socket."""
    return runtime_folder() / SOCKET_NAME


def check_private(folder: Path) -> None:
    """The folder is a real folder (not a symlink) of this user's, open to nobody else:
    anything else in a shared temp folder could be another user's trap."""
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{folder}: not a folder (the convnext server's runtime folder)")
    if info.st_uid != os.getuid():
        raise UsageError(f"{folder}: owned by another user; refusing to use it")
    if info.st_mode & 0o077:
        raise UsageError(
            f"{folder}: open to other users (mode {stat.S_IMODE(info.st_mode):o}); it must be 0700"
        )


def private_folder() -> Path:
    """The runtime folder, created 0700 if missing and checked (see :func:`check_private`)."""
    folder = runtime_folder()
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{folder}: cannot create it ({exc.strerror})") from exc
    check_private(folder)
    if len(os.fsencode(folder / SOCKET_NAME)) > MAX_SOCKET_PATH:
        raise UsageError(f"{folder / SOCKET_NAME}: too long for a Unix socket path")
    return folder


def usable_socket() -> Path | None:
    """The socket when it exists in a private folder of this user's, else None (no server,
    or nothing this client should trust)."""
    path = socket_path()
    try:
        check_private(path.parent)
        info = os.lstat(path)
    except (OSError, UsageError):
        return None
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        return None
    return path
