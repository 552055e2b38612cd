"""One render worker per process: continuous batching of every session's due frames, fair round-robin.

Sessions submit :class:`RenderJob` s to their :class:`RenderSlot`; the worker wakes, waits for the next tick,
takes at most ``max_batch`` jobs one session at a time in rotation, renders them in one ``Renderer.render`` call
and hands each frame back to its session.

Render time is modelled as ``overhead + per_frame * batch`` (:class:`CostModel`, fitted online with decay: a GPU
call costs mostly overhead, a CPU frame mostly per-frame work). A batch grows while the earliest deadline in it can
still be met. Live, a job that cannot be ready in time is skipped when a fresher job of the same session is
queued behind it (the session shows its freshest picture); a session's newest job is always rendered, even late:
the estimate can delay a session's frames but never stop them, and the session shows a late picture (or repeats
its last one) instead of going black. Each batch starts with the next session in rotation (fair share).
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

from engine.render.base import AsyncRenderer, PreparedAvatar, Renderer
from streaming.clock import Clock

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 16  # frames per render call (across sessions)
    tick_hz: float = 200.0  # at most this many render calls per second: a tick gathers what is due meanwhile
    threaded: bool = True  # render in one worker thread; False: on the event loop (awaited if the renderer can)
    decay: float = 0.7  # weight an older render-time sample keeps per newer one in the cost model's fit

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if not (isinstance(self.tick_hz, int | float) and math.isfinite(self.tick_hz) and self.tick_hz > 0):
            raise ValueError(f"tick_hz must be a positive number, got {self.tick_hz!r}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay!r}")


class _Fit:
    """Decaying weighted sums of (batch size, seconds) and their least-squares line."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.w, self.x, self.y = d * self.w + 1.0, d * self.x + x, d * self.y + y
        self.xx, self.xy = d * self.xx + x * x, d * self.xy + x * y

    @property
    def mean_x(self) -> float:
        return self.x / self.w

    @property
    def mean_y(self) -> float:
        return self.y / self.w

    def line(self) -> tuple[float, float] | None:
        """``(overhead, per_frame)``, both >= 0; None while the batch sizes seen are (nearly) all the same."""
        var_x = self.xx / self.w - self.mean_x**2
        if var_x < 0.25:
            return None
        per_frame = (self.xy / self.w - self.mean_x * self.mean_y) / var_x
        overhead = self.mean_y - per_frame * self.mean_x
        if overhead < 0.0:  # through the origin
            return 0.0, self.xy / self.xx
        if per_frame < 0.0:  # a constant
            return self.mean_y, 0.0
        return overhead, per_frame


class CostModel:
    """Seconds a render call of ``b`` frames takes: ``overhead + per_frame * b``, fitted online.

    The *shape* (how the cost splits into per-call overhead and per-frame work: a GPU call is mostly overhead, a
    CPU frame mostly work) comes from a long memory of calls of different batch sizes; the *level* follows the
    recent calls (each newer call scales an older one's weight by ``decay``), so the model tracks a machine whose
    load changes within a few calls. Until calls of different sizes have been seen, the cost is assumed to be all
    per frame, which errs towards smaller batches. One measurement is capped at 4x the prediction: a GC pause, a
    stopped process or a stolen time slice must not make every later call look that slow (a renderer that really
    became slower is followed at 4x per call).
    """

    SPIKE = 4.0

    def __init__(self, decay: float = 0.7, shape_decay: float = 0.99) -> None:
        self._level = _Fit(decay)
        self._shape = _Fit(shape_decay)
        self.overhead = 0.0
        self.per_frame = 0.0
        self.calls = 0

    def predict(self, batch: int) -> float:
        return self.overhead + self.per_frame * batch

    def update(self, batch: int, seconds: float) -> None:
        if self.calls:
            seconds = min(seconds, self.SPIKE * self.predict(batch))
        self._level.add(batch, seconds)
        self._shape.add(batch, seconds)
        self.calls += 1
        level = self._level
        line = level.line() or self._shape.line()
        if line is None:
            self.overhead, self.per_frame = 0.0, level.mean_y / level.mean_x
            return
        overhead, per_frame = line
        # the shape's split, scaled to what the recent calls cost at their typical size
        scale = level.mean_y / max(overhead + per_frame * level.mean_x, 1e-12)
        self.overhead, self.per_frame = overhead * scale, per_frame * scale


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


def to_rgb_uint8(images: torch.Tensor, staging: dict[tuple[int, ...], torch.Tensor] | None = None) -> np.ndarray:
    """``[B, 3, S, S]`` in [0, 1] -> ``[B, S, S, 3]`` uint8 on the host.

    On a GPU the conversion happens there (a quarter of the bytes cross the bus) and the copy goes through a
    pinned ``staging`` buffer (kept by the caller, one per shape): a pageable copy would be staged by the driver
    anyway, at half the speed. The result is copied out of the staging buffer, which the next batch reuses.
    """
    x = (images.detach().float().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
    x = x.permute(0, 2, 3, 1).contiguous()
    if not x.is_cuda or staging is None:
        return x.cpu().numpy()
    pinned = staging.get(tuple(x.shape))
    if pinned is None:
        pinned = staging[tuple(x.shape)] = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
    pinned.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return pinned.numpy().copy()


Deliver = Callable[[RenderJob, np.ndarray, float], None]  # (job, rgb [S, S, 3], clock time) -> None
Drop = Callable[[RenderJob], None]
Fail = Callable[[BaseException], None]


class RenderSlot:
    """One session's place in the worker: its prepared avatar and a bounded queue of jobs (in frame order)."""

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
        self.skipped = 0  # live jobs skipped for a fresher one (they could not be ready in time)
        self._space = asyncio.Event()
        self._space.set()
        self.closed = False

    @property
    def idle(self) -> bool:
        return not self.pending and self.in_flight == 0

    def push_live(self, job: RenderJob) -> None:
        """Queue a live job now; a full queue drops its oldest job (the session is behind: catch up)."""
        if self.closed:
            return
        while len(self.pending) >= self.capacity:
            self._skip(self.pending.popleft())
        self.pending.append(job)
        self.worker.wake()

    async def submit(self, job: RenderJob) -> None:
        """Queue a job. Live, a full queue drops its oldest job (catch up); offline it waits for room."""
        if self.closed:
            return
        if self.live:
            self.push_live(job)
            return
        while len(self.pending) >= self.capacity:
            self._space.clear()
            await self._space.wait()
            if self.closed:
                return
        self.pending.append(job)
        self.worker.wake()

    def _skip(self, job: RenderJob) -> None:
        self.skipped += 1
        self.drop(job)

    def skip_stale(self, now: float, cost: CostModel) -> None:
        """Live: when the worker cannot render every queued job of this session on time, keep only the freshest
        ones it can (the newest run of jobs that fits before its own earliest deadline), or, if not even the
        newest job can be on time, that newest job alone: a late fresh picture beats a stale one, and the session
        shows its last picture in the slots between (its video rate drops; its audio does not)."""
        jobs = self.pending
        if not self.live or len(jobs) < 2 or now + cost.predict(len(jobs)) <= jobs[0].deadline:
            return
        keep = 1
        while keep < len(jobs) and now + cost.predict(keep + 1) <= jobs[len(jobs) - keep - 1].deadline:
            keep += 1
        while len(jobs) > keep:
            self._skip(jobs.popleft())

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
        self.cost = CostModel(self.config.decay)
        self._slots: list[RenderSlot] = []
        self._rr = 0  # session the next batch starts with (round-robin fairness)
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread = WorkerThread("render-worker")
        self.render_time = 0.0  # seconds the last render call took
        self.batches = 0
        self.frames = 0
        self.late = 0  # frames rendered although the model said they would miss their deadline
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self._staging: dict[tuple[int, ...], torch.Tensor] = {}  # pinned host buffers of GPU frames
        self.call_times: deque[float] = deque(maxlen=1000)

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

    def stats(self) -> dict[str, float]:
        """Worker-wide numbers for metrics: calls, frames, batch size and call time (recent means), the model."""
        sizes, times = list(self.batch_sizes), list(self.call_times)
        return {
            "render_calls": float(self.batches),
            "render_frames": float(self.frames),
            "render_late_frames": float(self.late),
            "render_batch_mean": float(np.mean(sizes[-100:])) if sizes else 0.0,
            "render_call_ms": 1000.0 * float(np.mean(times[-100:])) if times else 0.0,
            "render_overhead_ms": 1000.0 * self.cost.overhead,
            "render_per_frame_ms": 1000.0 * self.cost.per_frame,
        }

    def _collect(self) -> list[tuple[RenderSlot, RenderJob]]:
        """Up to ``max_batch`` jobs, one per session per round, starting from the rotating session.

        A job joins the batch when the batch, with it, still finishes (``now + cost(size)``) before the earliest
        deadline of the on-time jobs in it; a job that is late anyway constrains nothing. The first job of a batch
        always joins, so every session's newest frame is rendered within a rotation, whatever the estimate says.
        """
        slots = list(self._slots)
        if not slots:
            return []
        now = self.clock.now()
        for slot in slots:
            slot.skip_stale(now, self.cost)
        start = self._rr % len(slots)
        order = slots[start:] + slots[:start]
        batch: list[tuple[RenderSlot, RenderJob]] = []
        limit = math.inf  # earliest deadline of the on-time jobs in the batch
        taken = {id(s): 0 for s in order}
        max_batch = self.config.max_batch
        progress = True
        while progress and len(batch) < max_batch:
            progress = False
            for slot in order:
                if len(batch) >= max_batch:
                    break
                if taken[id(slot)] >= len(slot.pending):
                    continue
                job = slot.pending[taken[id(slot)]]
                finish = now + self.cost.predict(len(batch) + 1)
                if batch and finish > limit:
                    continue  # it would make an on-time frame in the batch late: the next batch takes it
                if finish <= job.deadline:
                    limit = min(limit, job.deadline)
                elif batch and taken[id(slot)]:
                    continue  # a late job only rides as its session's first of the batch
                else:
                    self.late += 1
                if not batch:
                    self._rr = slots.index(slot) + 1  # the next batch starts with the session after this one
                taken[id(slot)] += 1
                batch.append((slot, job))
                progress = True
        for slot in order:
            for _ in range(taken[id(slot)]):
                slot.take()
                slot.in_flight += 1
        return batch

    def _render(self, prepared: Sequence[PreparedAvatar], kp: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return to_rgb_uint8(self.renderer.render(prepared, kp), self._staging)  # [B, S, S, 3]

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
                elif isinstance(self.renderer, AsyncRenderer):
                    with torch.inference_mode():
                        images = to_rgb_uint8(await self.renderer.render_async(prepared, kp))
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
            self.render_time = done - started
            self.cost.update(len(batch), self.render_time)
            self.batches += 1
            self.frames += len(batch)
            self.batch_sizes.append(len(batch))
            self.call_times.append(self.render_time)
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
