"""The session clock: wall time for pacing, and a simulated clock that makes latency tests deterministic.

Everything in a session that waits on time goes through a :class:`Clock`; nothing calls ``asyncio.sleep`` with a
duration directly. With :class:`SimClock` time only moves when every task is blocked (it jumps to the earliest
sleeper) or when synchronous work declares what it cost (:meth:`SimClock.spend`), so a slow renderer can be
modelled exactly and a test's numbers do not depend on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from dataclasses import dataclass
from typing import Protocol

from engine.audio.pcm import SAMPLE_RATE


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic time line."""
        ...

    async def sleep_until(self, t: float) -> None: ...

    def spend(self, seconds: float) -> None:
        """Synchronous work took ``seconds``: the real clock ignores it (it passed), the simulated one advances."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        await asyncio.sleep(max(0.0, delay))

    def spend(self, seconds: float) -> None:
        return None


class SimClock:
    """Virtual time for tests. Start the driver with :meth:`start` inside the loop, stop it with :meth:`aclose`."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    def now(self) -> float:
        return self._now

    def spend(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot spend negative time ({seconds})")
        self._now += seconds
        self._release_due()  # sleepers that became due wake before whatever the spender does next

    def _release_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    async def sleep_until(self, t: float) -> None:
        if t <= self._now:
            await asyncio.sleep(0)  # still a scheduling point, like a real zero sleep
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (t, next(self._seq), fut))
        if self._wake is not None:
            self._wake.set()
        await fut

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._drive(), name="sim-clock")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _settle(self) -> None:
        """Yield until no other callback is ready: every task is blocked on a sleeper, a queue or an event."""
        loop = asyncio.get_running_loop()
        for _ in range(10_000):
            await asyncio.sleep(0)
            # the loop's ready deque is private API; without it fall back to a fixed number of yields
            ready = getattr(loop, "_ready", None)
            if ready is not None and len(ready) == 0:
                return

    async def _drive(self) -> None:
        assert self._wake is not None
        while True:
            await self._settle()
            # drop sleepers whose task was cancelled
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)
            if not self._sleepers:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._now = max(self._now, self._sleepers[0][0])
            self._release_due()


@dataclass(frozen=True)
class FrameSchedule:
    """When frame ``n`` is committed (its audio taken from input) and when it leaves the session.

    Frame ``n`` covers audio samples ``[bound(n), bound(n + 1))`` with ``bound(n) = n * 16000 // fps``; its audio
    is "live" at ``t0 + (n + 1) / fps``, is committed ``jitter_s`` later and leaves, with its video frame,
    ``latency_s`` after it was live.
    """

    t0: float
    fps: int
    jitter_s: float
    latency_s: float

    def live_time(self, n: int) -> float:
        return self.t0 + (n + 1) / self.fps

    def commit_time(self, n: int) -> float:
        return self.live_time(n) + self.jitter_s

    def due_time(self, n: int) -> float:
        return self.live_time(n) + self.latency_s


def frame_bound(n: int, fps: int) -> int:
    """First sample of frame ``n`` on the 16 kHz clock (integer so any fps tiles the audio exactly)."""
    return n * SAMPLE_RATE // fps


def frame_count(samples: int, fps: int) -> int:
    """Frames covering ``samples`` samples: ``ceil(samples / 16000 * fps)``."""
    return -(-samples * fps // SAMPLE_RATE)
