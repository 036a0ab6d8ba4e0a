"""The Hugging Face Hub: a model id (``org/name``, ``org/name@revision``) to a local snapshot.

Only the files a ConvNeXt checkpoint needs are fetched, through huggingface_hub and its
cache (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are honoured by
huggingface_hub itself; ``--cache-dir``, ``--token`` and ``--revision`` override them).
Downloads show huggingface_hub's own progress bars on stderr, after a line saying what
is fetched.  A model already in the cache is used without waiting on an unreachable Hub:
the Hub is asked once, with a short timeout, whether the model changed; no answer, and the
cached snapshot is used as is (``HF_HUB_OFFLINE=1`` skips even that question).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import logging as hub_logging

from convnext_cli.errors import CheckpointError, one_line

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "tf_model.h5")
# Seconds to wait for the Hub's answer to one metadata request, before any download:
# briefly for a model already cached (no answer: the cache is used), longer for one that
# must be fetched (no answer: a one-line error, instead of huggingface_hub's retries).
CACHED_PROBE_TIMEOUT = 3.0
UNCACHED_PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class HubRef:
    """A model on the Hub, and how to reach it."""

    repo_id: str
    revision: str | None = None
    cache_dir: Path | None = None
    token: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def split_revision(model: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``)."""
    if "@" in model:
        repo_id, revision = model.rsplit("@", 1)
        return repo_id, revision or None
    return model, None


def looks_like_hub_id(model: str) -> bool:
    repo_id, _ = split_revision(model)
    parts = repo_id.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not repo_id.startswith((".", "~"))


def download(ref: HubRef, on_note: Callable[[str], None] | None = None) -> Path:
    """The snapshot folder holding config, preprocessor config and weights of ``ref``.

    ``model.safetensors`` is preferred; ``pytorch_model.bin`` is fetched only when a repo has
    no safetensors file.  Every failure is one line naming the model.  ``on_note`` hears
    what is fetched (before huggingface_hub's progress bars) or that the cache is used.
    """
    local_only = bool(constants.HF_HUB_OFFLINE) or _use_cache_only(ref, on_note)
    with _quiet_hub_logging():
        if _fetch(ref, CONFIG_FILE, local_only) is None:
            raise CheckpointError(f"{ref}: the repo has no config.json")
        _fetch(ref, PREPROCESSOR_FILE, local_only)
        for name in WEIGHT_FILES:
            weights = _fetch(ref, name, local_only)
            if weights is not None:
                return weights.parent
    raise CheckpointError(f"{ref}: the repo has neither {' nor '.join(WEIGHT_FILES)}")


def _cached(ref: HubRef, filename: str) -> bool:
    found = try_to_load_from_cache(
        ref.repo_id, filename, cache_dir=ref.cache_dir, revision=ref.revision
    )
    return isinstance(found, str)


def _use_cache_only(ref: HubRef, on_note: Callable[[str], None] | None) -> bool:
    """True when the Hub does not answer but the model is cached; an error when it does not
    answer and the model is not cached; False (download, or check for updates) otherwise."""
    cached = _cached(ref, CONFIG_FILE)
    timeout = CACHED_PROBE_TIMEOUT if cached else UNCACHED_PROBE_TIMEOUT
    problem = _hub_problem(ref, timeout)
    if problem is not None:
        if not cached:
            raise CheckpointError(
                f"{ref}: {problem}, and the model is not in the local cache; to go on, "
                "check the network (or proxy), pass -m a local folder or weights file, or, "
                "with the model in a cache, set HF_HUB_OFFLINE=1 (and --cache-dir DIR)"
            )
        if on_note is not None:
            on_note(f"{problem}; using the cached {ref}")
        return True
    if not cached and on_note is not None:
        on_note(f"fetching {ref} from the Hugging Face Hub")
    return False


def _hub_problem(ref: HubRef, timeout: float) -> str | None:
    """None when the Hub answers one metadata request for the model within ``timeout`` (any
    HTTP answer counts: a missing repo or revision is then reported by the download); else
    what went wrong, in words: no answer in time, or no connection at all."""
    url = hf_hub_url(ref.repo_id, CONFIG_FILE, revision=ref.revision)
    try:
        get_hf_file_metadata(url, token=ref.token, timeout=timeout)
    except (HfHubHTTPError, EntryNotFoundError):
        return None
    except Exception as exc:  # no connection, a timeout, a proxy failure: out of reach
        if any("timeout" in type(e).__name__.lower() for e in _chain(exc)):
            return f"the Hugging Face Hub did not answer within {timeout:.0f} s"
        return "could not reach the Hugging Face Hub (no connection)"
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _fetch(ref: HubRef, filename: str, local_only: bool) -> Path | None:
    """One file of the repo (from the cache when possible), or None when the repo lacks it."""
    try:
        return Path(
            hf_hub_download(
                ref.repo_id,
                filename,
                revision=ref.revision,
                cache_dir=ref.cache_dir,
                token=ref.token,
                local_files_only=local_only,
            )
        )
    except GatedRepoError as exc:
        raise CheckpointError(f"{ref}: gated repo; log in, set HF_TOKEN or pass --token") from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"{ref}: no such model on the Hugging Face Hub (or it is private: set HF_TOKEN)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"{ref}: no revision {ref.revision!r} on the Hub") from exc
    except HFValidationError as exc:
        raise CheckpointError(f"{ref}: not a valid Hub id ({one_line(exc)})") from exc
    except LocalEntryNotFoundError as exc:
        if filename != CONFIG_FILE:
            return None  # offline, and this optional file was never cached
        offline = bool(constants.HF_HUB_OFFLINE)
        why = "HF_HUB_OFFLINE is set" if offline else "could not reach the Hugging Face Hub"
        raise CheckpointError(
            f"{ref}: {why}, and the model is not in the local cache "
            "(pass -m a local folder or weights file, or --cache-dir the cache that holds it)"
        ) from exc
    except EntryNotFoundError:
        return None
    except Exception as exc:  # network failures come in many types
        raise CheckpointError(f"{ref}: download failed ({one_line(exc)})") from exc


@contextlib.contextmanager
def _quiet_hub_logging() -> Iterator[None]:
    """huggingface_hub logs every network retry; the one-line error at the end says it all.
    (Its download progress bars are not logging, and stay.)"""
    previous = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(previous)
