"""One render worker per process: continuous batching of every session's due frames, fair round-robin.

Sessions submit :class:`RenderJob` s to their :class:`RenderSlot`; the worker wakes, waits for the next tick,
takes at most ``max_batch`` jobs one session at a time in rotation, renders them in one ``Renderer.render`` call
and hands each frame back to its session. A job that can no longer be ready by its deadline is dropped instead
of rendered (live catch-up), so a slow renderer costs frames, never latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from engine.render.base import PreparedAvatar, Renderer
from streaming.clock import Clock

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 8  # frames per render call (across sessions)
    tick_hz: float = 200.0  # at most this many render calls per second: a tick gathers what is due meanwhile
    threaded: bool = True  # render in one worker thread; False renders on the event loop (simulated clocks)
    ema: float = 0.3  # weight of the newest batch in the render-time estimate used for catch-up decisions

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if not (isinstance(self.tick_hz, int | float) and math.isfinite(self.tick_hz) and self.tick_hz > 0):
            raise ValueError(f"tick_hz must be a positive number, got {self.tick_hz!r}")
        if not 0.0 < self.ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {self.ema!r}")


class WorkerThread:
    """One daemon thread running blocking calls for the event loop; :meth:`aclose` returns once it has exited.

    (A ``ThreadPoolExecutor`` can only be joined by blocking the loop; this one is joined by polling.)
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False

    def _main(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, args, fut = item
            assert self._loop is not None
            if fut.cancelled():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting task
                self._loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                self._loop.call_soon_threadsafe(_set_result, fut, result)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        if not self._started:
            self._loop = loop
            self._thread.start()
            self._started = True
        fut: asyncio.Future[T] = loop.create_future()
        self._calls.put((fn, args, fut))
        return await fut

    async def aclose(self) -> None:
        if not self._started:
            return
        self._calls.put(None)
        while self._thread.is_alive():  # a call still running finishes first (torch cannot be interrupted)
            await asyncio.sleep(0.005)
        self._started = False


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


@dataclass(frozen=True)
class RenderJob:
    frame_index: int
    generation: int
    kp: torch.Tensor  # [1, 21, 3] driving keypoints
    deadline: float  # clock time the frame must be ready by (inf offline)


def to_rgb_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, S, S]`` in [0, 1] -> ``[B, S, S, 3]`` uint8."""
    x = (images.detach().float().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


Deliver = Callable[[RenderJob, np.ndarray, float], None]  # (job, rgb [S, S, 3], clock time) -> None
Drop = Callable[[RenderJob], None]
Fail = Callable[[BaseException], None]


class RenderSlot:
    """One session's place in the worker: its prepared avatar and a bounded queue of jobs."""

    def __init__(
        self,
        worker: BatchRenderer,
        prepared: PreparedAvatar,
        capacity: int,
        live: bool,
        deliver: Deliver,
        drop: Drop,
        fail: Fail,
    ) -> None:
        self.worker = worker
        self.prepared = prepared
        self.capacity = capacity
        self.live = live
        self.deliver = deliver
        self.drop = drop
        self.fail = fail
        self.pending: deque[RenderJob] = deque()
        self.in_flight = 0
        self._space = asyncio.Event()
        self._space.set()
        self.closed = False

    @property
    def idle(self) -> bool:
        return not self.pending and self.in_flight == 0

    async def submit(self, job: RenderJob) -> None:
        """Queue a job. Live, a full queue drops its oldest job (catch up); offline it waits for room."""
        if self.closed:
            return
        if self.live:
            while len(self.pending) >= self.capacity:
                self.drop(self.pending.popleft())
        else:
            while len(self.pending) >= self.capacity:
                self._space.clear()
                await self._space.wait()
                if self.closed:
                    return
        self.pending.append(job)
        self.worker.wake()

    def discard(self, keep: Callable[[RenderJob], bool]) -> int:
        """Remove queued jobs for which ``keep`` is False (after an interrupt); returns how many."""
        before = len(self.pending)
        self.pending = deque(j for j in self.pending if keep(j))
        self._space.set()
        return before - len(self.pending)

    def take(self) -> RenderJob | None:
        job = self.pending.popleft() if self.pending else None
        if len(self.pending) < self.capacity:
            self._space.set()
        return job

    def close(self) -> None:
        self.closed = True
        self.pending.clear()
        self._space.set()
        self.worker.unregister(self)


class BatchRenderer:
    """The process's render worker. Create inside a running loop; :meth:`aclose` frees its task and thread."""

    def __init__(self, renderer: Renderer, clock: Clock, config: BatchConfig | None = None) -> None:
        self.renderer = renderer
        self.clock = clock
        self.config = config or BatchConfig()
        self._slots: list[RenderSlot] = []
        self._rr = 0  # session the next batch starts with (round-robin fairness)
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread = WorkerThread("render-worker")
        self.render_time = 0.0  # EMA seconds per batch
        self.frame_time = 0.0  # EMA seconds per frame of a batch (what catch-up decisions use)
        self.batches = 0
        self.frames = 0
        self.batch_sizes: list[int] = []

    def register(
        self, prepared: PreparedAvatar, *, capacity: int, live: bool, deliver: Deliver, drop: Drop, fail: Fail
    ) -> RenderSlot:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="render-worker")
        slot = RenderSlot(self, prepared, capacity, live, deliver, drop, fail)
        self._slots.append(slot)
        return slot

    def unregister(self, slot: RenderSlot) -> None:
        if slot in self._slots:
            self._slots.remove(slot)

    def wake(self) -> None:
        self._work.set()

    @property
    def sessions(self) -> int:
        return len(self._slots)

    def _collect(self) -> list[tuple[RenderSlot, RenderJob]]:
        """Up to ``max_batch`` jobs, one per session per round, starting from the rotating session.

        Render time is modelled as ``frame_time`` per frame of a batch. A job that cannot be ready by its
        deadline even alone is dropped; one that would only make the batch late for an earlier job waits.
        """
        batch: list[tuple[RenderSlot, RenderJob]] = []
        slots = list(self._slots)
        if not slots:
            return batch
        start = self._rr % len(slots)
        order = slots[start:] + slots[:start]
        now = self.clock.now()
        limit = math.inf  # earliest deadline in the batch
        # the first batch is a single frame: there is no render-time estimate yet to size a batch with
        max_batch = self.config.max_batch if self.batches else 1
        full = {id(s): False for s in order}
        while len(batch) < max_batch and not all(full.values()):
            for slot in order:
                if len(batch) >= max_batch or full[id(slot)]:
                    continue
                job = slot.take()
                while job is not None and now + self.frame_time > job.deadline:
                    slot.drop(job)  # cannot be ready in time: skip it, the next one may still be
                    job = slot.take()
                if job is None:
                    full[id(slot)] = True
                    continue
                if now + self.frame_time * (len(batch) + 1) > min(limit, job.deadline):
                    slot.pending.appendleft(job)  # fits a later batch, not this one
                    full[id(slot)] = True
                    continue
                limit = min(limit, job.deadline)
                if not batch:
                    self._rr = slots.index(slot) + 1  # the next batch starts with the session after this one
                batch.append((slot, job))
                slot.in_flight += 1
        return batch

    def _render(self, prepared: Sequence[PreparedAvatar], kp: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return to_rgb_uint8(self.renderer.render(prepared, kp))  # [B, S, S, 3]

    async def _run(self) -> None:
        next_tick = self.clock.now()
        while True:
            await self._work.wait()
            if self.clock.now() < next_tick:
                await self.clock.sleep_until(next_tick)
            self._work.clear()
            batch = self._collect()
            if any(s.pending for s in self._slots):
                self._work.set()  # more than one batch is waiting
            if not batch:
                continue
            next_tick = self.clock.now() + 1.0 / self.config.tick_hz
            prepared = [slot.prepared for slot, _ in batch]
            kp = torch.cat([job.kp for _, job in batch], dim=0)  # [B, 21, 3]
            started = self.clock.now()
            try:
                if self.config.threaded:
                    images = await self._thread.run(self._render, prepared, kp)
                else:
                    images = self._render(prepared, kp)
            except Exception as exc:
                # the worker serves every session: one bad batch ends the sessions in it, not the worker
                logger.error("render batch of %d failed: %r", len(batch), exc, exc_info=exc)
                for slot in {id(s): s for s, _ in batch}.values():
                    slot.fail(exc)
                continue
            finally:
                for slot, _ in batch:
                    slot.in_flight -= 1
            done = self.clock.now()
            took = done - started
            w = 1.0 if self.batches == 0 else self.config.ema
            self.render_time = (1 - w) * self.render_time + w * took
            self.frame_time = (1 - w) * self.frame_time + w * took / len(batch)
            self.batches += 1
            self.frames += len(batch)
            self.batch_sizes.append(len(batch))
            del self.batch_sizes[:-1000]
            for i, (slot, job) in enumerate(batch):
                if not slot.closed:
                    slot.deliver(job, images[i], done)
            # let the sessions' outputs run before the next batch (an inline render holds the loop meanwhile)
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        for slot in list(self._slots):
            slot.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._thread.aclose()  # after a render still running in it, so no thread outlives the worker
