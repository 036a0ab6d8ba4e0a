"""How many threads the model gets on the CPU while decoding processes run beside it.

On a CPU run the model's intra-op threads and the decoding processes share the same cores.
Which split is faster depends on the run, not the machine:

- a large model on ordinary photos is bound by the model: every core should run the model,
  and the decoders, idle most of the time, fit into the gaps;
- a small model, or large photos, is bound by decoding: the decoders are busy all the
  time, and the model's OpenMP team, sharing its cores with them, loses more in its
  barriers than it gains (measured: ``benchmarks/README.md``, "Model threads on a
  decode-bound run").  How long the model waits for a batch does not
  show this: its passes, slowed by the sharing, hide the wait.

So the run measures it.  :class:`ThreadTuner` starts with the first choice (every core),
measures a few batches, and tries another count only where the decoders' load says it may
help: fewer threads when the decoding processes are busy more than :data:`BUSY_SHARE` of
the time, more threads when they are not.  Of the counts tried it keeps the one with the
shortest time per image (the median: the machine is noisy), and looks again after 32
batches, then 64, ..., at most 512, so a run whose images change character finds the new
best.  The batches decoded ahead when it switches (``settle``: the prefetch) are not
measured: they were decoded under the old split, and would flatter the new one.
A model-bound run thus never leaves every core.

A Ray model actor (:func:`~convnext_cli.engine.ray.stages.actor_tuner`) cannot see its
decoders' load: they are other tasks, perhaps on other nodes.  Its tuner is ``blind``: each
round measures every count, and keeps the fastest by time per image alone; a model-bound
actor pays a few batches on the slower count per round (rounds grow to 512 batches).

Only float32 runs are tuned (see ``Runner``): their results are bit-identical whatever the
thread count, while bfloat16 matrix products are not, and a run's numbers must not depend
on timing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

PROBE = 3  # batches measured on a thread count before deciding
FIRST_EXPLOIT = 32  # batches on the best count before looking again
MAX_EXPLOIT = 512
WINDOW = 8  # recent measurements kept per thread count
BUSY_SHARE = 0.5  # decoders busy more than this share of the time: fewer threads may help


class ThreadTuner:
    """Chooses among thread counts by measured time per image; call :meth:`batch_done`
    after each batch's forward pass, and apply the count it returns (``None``: no change)."""

    def __init__(
        self,
        choices: Sequence[int],
        settle: int = 1,
        clock: Callable[[], float] = time.perf_counter,
        blind: bool = False,
    ) -> None:
        self.choices = list(dict.fromkeys(choices))  # in order of preference, no repeats
        # the decoders' load is not known (a Ray model actor: its decoders are other tasks,
        # perhaps on other nodes): each round measures every count, by time per image alone
        self.blind = blind
        if not self.choices:
            raise ValueError("no thread counts to choose from")
        self.clock = clock
        self.settle = max(0, settle)  # batches after a switch that are not measured
        self.threads = self.choices[0]
        self.cost: dict[int, list[float]] = {n: [] for n in self.choices}  # s per image
        self.busy: dict[int, list[float]] = {n: [] for n in self.choices}  # decoders' share
        self._last: float | None = None  # when the previous batch ended
        # the first batch only starts the clock; the next ones were decoded during start-up
        self._skip = self.settle
        self._measured = 0  # batches measured since the current count was set
        self._trying: list[int] | None = None  # None: not yet decided what to try
        self._round = [self.threads]  # the counts measured in this round
        self._exploit = FIRST_EXPLOIT
        self._exploiting = 0  # batches left on the chosen count before looking again
        self.switches = 0

    def batch_done(self, images: int, decoding: float = 0.0) -> int | None:
        """A batch of `images` went through the model; each decoding process spent
        `decoding` seconds on it (on average): the thread count for the next batch, or None
        to keep the current one."""
        now = self.clock()
        last, self._last = self._last, now
        if last is None or images <= 0 or now <= last:
            return None
        if self._skip > 0:
            self._skip -= 1
            return None
        cycle = now - last
        self._keep(self.cost[self.threads], cycle / images)
        self._keep(self.busy[self.threads], min(1.0, max(0.0, decoding) / cycle))
        self._measured += 1
        if self._exploiting > 0:
            self._exploiting -= 1
            if self._exploiting > 0:
                return None
            self._trying, self._round = None, [self.threads]  # look again
        if self._measured < PROBE:
            return None
        if self._trying is None:
            self._trying = [n for n in self.choices if n not in self._round and self._worth(n)]
        if self._trying:
            return self._switch(self._trying.pop(0))
        best = min(self._round, key=lambda n: statistics.median(self.cost[n][-PROBE:]))
        self._exploiting = self._exploit
        self._exploit = min(MAX_EXPLOIT, self._exploit * 2)
        return self._switch(best) if best != self.threads else None

    def _worth(self, threads: int) -> bool:
        """Whether `threads` may beat the current count, by how busy the decoders are now
        (when that is known: see ``blind``)."""
        if self.blind:
            return True
        busy = statistics.median(self.busy[self.threads][-PROBE:])
        return busy > BUSY_SHARE if threads < self.threads else busy <= BUSY_SHARE

    def _switch(self, threads: int) -> int:
        if threads not in self._round:
            self._round.append(threads)
            self.cost[threads].clear()  # measured afresh: the run may have changed since
            self.busy[threads].clear()
        self.threads = threads
        self._measured = 0
        self._skip = self.settle
        self.switches += 1
        return threads

    @staticmethod
    def _keep(values: list[float], value: float) -> None:
        values.append(value)
        del values[:-WINDOW]
