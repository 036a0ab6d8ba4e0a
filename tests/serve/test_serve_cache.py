"""The server's model cache: least recently used models dropped beyond the memory budget,
never one a request is using, each model loaded once however many ask for it at once."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import torch

from convnext_cli.serve.server import ModelCache, model_bytes


def fake_loaded(loads: list[str], name: str) -> Any:
    """What load_runner gives, reduced to what the cache reads: a runner with a model."""
    loads.append(name)
    time.sleep(0.05)  # long enough for concurrent requests to meet
    model = torch.nn.Linear(100, 100)  # 40,400 bytes of float32
    runner = SimpleNamespace(device="cpu", model=model, logits_fn=model, embed_fn=model)
    return SimpleNamespace(runner=runner, notes=[])


def test_least_recently_used_beyond_the_budget_is_dropped():
    size = model_bytes(torch.nn.Linear(100, 100))
    cache = ModelCache(budget=2 * size)
    loads: list[str] = []
    for name in ("a", "b"):
        cache.release(cache.acquire((name,), name, lambda n=name: fake_loaded(loads, n)))
    cache.release(cache.acquire(("a",), "a", lambda: fake_loaded(loads, "a")))  # a: recent
    assert loads == ["a", "b"]
    cache.release(cache.acquire(("c",), "c", lambda: fake_loaded(loads, "c")))
    assert cache.names() == ["a", "c"]  # b, the least recently used, went
    # a model in use stays, even over the budget
    held = cache.acquire(("a",), "a", lambda: fake_loaded(loads, "a"))
    cache.release(cache.acquire(("d",), "d", lambda: fake_loaded(loads, "d")))
    cache.release(cache.acquire(("e",), "e", lambda: fake_loaded(loads, "e")))
    assert "a" in cache.names() and "e" in cache.names() and "c" not in cache.names()
    cache.release(held)
    assert len(cache.names()) == 2


def test_a_model_asked_for_at_once_is_loaded_once():
    cache = ModelCache(budget=1 << 30)
    loads: list[str] = []
    entries = []

    def ask() -> None:
        entries.append(cache.acquire(("m",), "m", lambda: fake_loaded(loads, "m")))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == ["m"]
    assert len({id(e) for e in entries}) == 1 and entries[0].users == 8
    # the model call goes through the per-device lock and still computes the same
    x = torch.ones(1, 100)
    runner = entries[0].loaded.runner
    assert torch.equal(runner.logits_fn(x), runner.model(x))
