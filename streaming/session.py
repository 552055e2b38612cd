"""A live session: audio in -> features -> motion -> keypoints -> (shared) render -> paced output, on one clock.

The clock is the audio sample count. Frame ``n`` covers samples ``[n * 16000 // fps, (n + 1) * 16000 // fps)``;
live, its audio is committed ``jitter_s`` after it was due (silence if none came, so the avatar idles from the same
motion path) and the frame leaves with exactly that audio ``latency_s`` after the audio was live::

    latency_s = jitter_s + (lookahead_frames + compute_frames) / fps

Offline (``realtime=False``) frames are committed as soon as their audio is complete, rendered as fast as
possible and none is dropped. Every stage runs as its own task between bounded queues; the render worker is
shared by all sessions of the process (:mod:`streaming.batching`).

Controls: :meth:`Session.control` validates a message synchronously (the schema of
:mod:`engine.motion.control_schema`, then the keys and values the motion stage honours), answers with the new
state, and sends it as a :class:`~streaming.frames.Control` frame that the motion stage applies on its own thread
after the audio that came before it. An interrupt travels the same way as an :class:`~streaming.frames.Interrupt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.audio.pcm import MAX_PUSH_SECONDS, SAMPLE_RATE, StreamingResampler
from engine.config import ConfigError
from engine.keypoints import rest_lips
from engine.motion.base import FeatureStage, MotionStage
from engine.motion.control_schema import Controllable, ControlState, ControlValueError, validate_control
from engine.render.base import PreparedAvatar, Renderer
from streaming.api import ControlError
from streaming.batching import BatchRenderer, RenderJob, WorkerThread
from streaming.clock import Clock, FrameSchedule, MonotonicClock, frame_bound
from streaming.frames import AudioChunk, Control, Driven, EndOfStream, Interrupt, OutputAudio, VideoFrame
from streaming.metrics import VIDEO_STATES, SessionMetrics, VideoHealth
from streaming.stages import (
    AudioTimeline,
    DriveStep,
    FeatureStep,
    MotionStep,
    Packet,
    run_stage,
)

logger = logging.getLogger(__name__)
_ids = itertools.count(1)


@dataclass(frozen=True)
class SessionConfig:
    fps: int = 25
    lookahead_frames: int | None = None  # frames held for lookahead (features + motion); None: what the stages need
    jitter_s: float = 0.02  # live: audio may arrive this late before its frame is committed (else: silence)
    compute_frames: int = 2  # live: render budget in frames, part of the latency
    interrupt_ease_frames: int = 3  # live: frames in flight at a barge-in close the mouth over this many frames
    late_picture_frames: int = 1  # live: a picture rendered late is shown up to this many slots after its own
    stall_s: float = 0.5  # live: ... and at any lag once no new picture was shown for this long (never freeze)
    realtime: bool = True  # False: offline, as fast as possible, nothing dropped
    max_buffer_s: float = 30.0  # live: audio buffered ahead of the clock (a TTS burst); the excess is dropped
    queue_frames: int = 32  # bound of every queue between stages
    offload: bool = True  # run features and motion in a thread of the session (False: on the loop, for tests)

    def __post_init__(self) -> None:
        for name in ("fps", "compute_frames", "queue_frames", "interrupt_ease_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 1 <= self.fps <= 120:
            raise ValueError(f"fps must be in 1..120, got {self.fps}")
        if self.lookahead_frames is not None and (
            isinstance(self.lookahead_frames, bool)
            or not isinstance(self.lookahead_frames, int)
            or not 0 <= self.lookahead_frames <= 250
        ):
            raise ValueError(f"lookahead_frames must be an integer in 0..250 or None, got {self.lookahead_frames!r}")
        if self.compute_frames < 0:
            raise ValueError(f"compute_frames must be >= 0, got {self.compute_frames}")
        if self.interrupt_ease_frames < 1:
            raise ValueError(f"interrupt_ease_frames must be >= 1, got {self.interrupt_ease_frames}")
        if self.queue_frames < 2:
            raise ValueError(f"queue_frames must be >= 2, got {self.queue_frames}")
        if self.late_picture_frames < 0:
            raise ValueError(f"late_picture_frames must be >= 0, got {self.late_picture_frames}")
        for name in ("jitter_s", "max_buffer_s", "stall_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("realtime", "offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


def stage_lookahead(features: FeatureStage, motion: MotionStage, fps: int) -> int:
    """Frames of audio past frame ``n`` its motion needs: the feature stage's window, then the motion lookahead."""
    spf = SAMPLE_RATE // fps
    return int(motion.lookahead_frames) + -(-int(getattr(features, "lookahead_samples", 0)) // spf)


def latency_budget_s(config: SessionConfig, lookahead_frames: int) -> float:
    """Live audio-in -> frame-out latency: ``jitter + (lookahead + compute frames) / fps``."""
    return config.jitter_s + (lookahead_frames + config.compute_frames) / config.fps


@dataclass
class _Rendered:
    generation: int
    rgb: np.ndarray
    created: float


class Session:
    """Implements :class:`streaming.api.LiveSession`. Open it through :class:`streaming.runtime.Runtime`."""

    def __init__(
        self,
        *,
        features: FeatureStage,
        motion: MotionStage,
        renderer: Renderer,
        prepared: PreparedAvatar,
        worker: BatchRenderer,
        config: SessionConfig | None = None,
        clock: Clock | None = None,
        session_id: str | None = None,
        motion_name: str | None = None,
    ) -> None:
        self.config = cfg = config or SessionConfig()
        if features.fps != cfg.fps:
            raise ConfigError(f"feature stage runs at {features.fps} fps but the session at {cfg.fps} fps")
        need = stage_lookahead(features, motion, cfg.fps)
        self.lookahead_frames = need if cfg.lookahead_frames is None else cfg.lookahead_frames
        if self.lookahead_frames < need:
            raise ConfigError(
                f"lookahead_frames={cfg.lookahead_frames} is below the {need} frames the feature and motion stages need"
            )
        self.id = session_id or f"session-{next(_ids)}"
        self.fps = cfg.fps
        self.size = renderer.size
        self.untrained = bool(renderer.untrained) or bool(getattr(motion, "untrained", False))
        self.clock: Clock = clock or MonotonicClock()
        self.latency_s = latency_budget_s(cfg, self.lookahead_frames)
        self.renderer = renderer
        self.prepared = prepared
        self.motion = motion
        self.motion_name = motion_name or type(motion).__name__
        self.controls_honoured = dict(motion.CONTROLS) if isinstance(motion, Controllable) else {}
        # the state the motion stage starts from (a generator may start from its own defaults, e.g. its smoothing)
        initial = getattr(motion, "state", None)
        self.control_state = initial if isinstance(initial, ControlState) else ControlState()
        self._system: deque[Control | Interrupt] = deque()  # sent to the stages ahead of the next audio
        self._features = FeatureStep(features)
        self._motion = MotionStep(motion, catch_up=self._catch_up if cfg.realtime else None)
        self._stage_thread = WorkerThread(f"{self.id}-stages") if cfg.offload else None
        self._drive = DriveStep(renderer, prepared)
        self._resampler = StreamingResampler(max_seconds=MAX_PUSH_SECONDS if cfg.realtime else None)
        max_pending = int(cfg.max_buffer_s * SAMPLE_RATE) if cfg.realtime else None
        self._timeline = AudioTimeline(cfg.fps, max_pending)
        self.metrics_ = SessionMetrics()
        self.health = VideoHealth(self.id)
        self.generation = 0
        self._interrupt_horizon = 0  # frames below it that were not rendered were lost to an interrupt
        self._q_audio: asyncio.Queue[Packet] = asyncio.Queue(cfg.queue_frames)
        self._q_feat: asyncio.Queue[Packet] = asyncio.Queue(cfg.queue_frames)
        self._q_motion: asyncio.Queue[Packet] = asyncio.Queue(cfg.queue_frames)
        self._q_driven: asyncio.Queue[Packet] = asyncio.Queue(cfg.queue_frames)
        self._video_out: asyncio.Queue[VideoFrame | None] = asyncio.Queue(cfg.queue_frames)
        self._audio_out: asyncio.Queue[OutputAudio | None] = asyncio.Queue(cfg.queue_frames)
        self._rendered: dict[int, _Rendered] = {}
        self._picture: tuple[int, _Rendered] | None = None  # the newest picture shown or to show (index, picture)
        self._shown_picture = -1  # frame index of the picture the last released slot showed
        self._shown_new_at = -math.inf  # clock time a slot last showed a new picture
        self._shown: _Rendered | None = None  # the picture the last released slot showed
        self._next_out = 0  # next frame the output releases
        self._input = asyncio.Event()  # new input audio (or the end)
        self._render_event = asyncio.Event()  # a frame was rendered or dropped (offline output waits on it)
        self._drive_done = False
        self._closed = False
        self._schedule = FrameSchedule(self.clock.now(), cfg.fps, cfg.jitter_s, self.latency_s)
        self._slot = worker.register(
            prepared,
            capacity=cfg.queue_frames,
            live=cfg.realtime,
            deliver=self._deliver,
            drop=self._dropped,
            fail=self._fail,
        )
        self.error: BaseException | None = None  # why the session stopped early (a stage raised)
        self._tasks = self._start_tasks()

    def _start_tasks(self) -> list[asyncio.Task[None]]:
        tasks = [
            asyncio.get_running_loop().create_task(coro, name=f"{self.id}:{name}")
            for name, coro in (
                ("source", self._source()),
                (
                    "features",
                    run_stage(self._features.process, self._q_audio, self._q_feat, self._gen, self._stage_thread),
                ),
                (
                    "motion",
                    run_stage(self._motion.process, self._q_feat, self._q_motion, self._gen, self._stage_thread),
                ),
                ("drive", run_stage(self._drive.process, self._q_motion, self._q_driven, self._gen)),
                ("submit", self._submit()),
                ("output", self._output()),
            )
        ]
        for task in tasks:
            task.add_done_callback(self._task_done)
        return tasks

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A stage that raises ends the session (outputs return None) instead of silently stalling it."""
        if task.cancelled() or task.exception() is None or self._closed:
            return
        exc = task.exception()
        assert exc is not None
        logger.error("%s: stage %s failed: %r", self.id, task.get_name(), exc, exc_info=exc)
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._closed:
            return
        self.error = exc
        self._closed = True
        self._slot.close()
        for other in self._tasks:
            other.cancel()
        for q in (self._video_out, self._audio_out):
            while not q.empty():
                q.get_nowait()
            q.put_nowait(None)

    # --- the LiveSession API --------------------------------------------------------------------------------

    def push_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        if self._closed:
            raise ValueError(f"{self.id} is closed")
        if self._timeline.ended:
            raise ValueError(f"{self.id}: audio pushed after end_of_stream")
        samples = self._resampler.push(pcm, sample_rate)
        self._timeline.append(samples, self.clock.now())
        self._input.set()

    def control(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``message`` now and return the new state; the motion stage applies it on its thread."""
        if self._closed:
            raise ControlError(f"{self.id} is closed")
        try:
            values = validate_control(message)
            refused = sorted(set(values) - set(self.controls_honoured))
            if refused:
                raise ControlValueError(
                    f"{', '.join(refused)}: not supported by the {self.motion_name} motion generator, which "
                    f"honours {sorted(self.controls_honoured) or 'no controls'}"
                )
            state = self.control_state.apply(values)
            if isinstance(self.motion, Controllable):
                self.motion.check_controls(state)
        except ControlValueError as exc:
            raise ControlError(str(exc)) from exc
        self.control_state = state
        self._system.append(Control(state))
        self._input.set()
        return state.as_dict()

    def interrupt(self) -> None:
        """Barge-in: input not yet committed is forgotten, committed audio plays as silence from the next frame, and
        the frames already in flight are rendered again with the mouth closing over ``interrupt_ease_frames``
        (so speech stops on screen at once and the video never freezes); the motion stage resumes from rest."""
        if self._closed:
            return
        self._system.append(Interrupt())
        self._input.set()
        self.generation += 1
        self._timeline.interrupt()
        self._interrupt_horizon = self._timeline.committed
        gen = self.generation
        self._slot.discard(lambda job: job.generation == gen)
        for n in [k for k, r in self._rendered.items() if r.generation != gen]:
            del self._rendered[n]
        if self.config.realtime:
            self._close_mouth_in_flight()

    def _close_mouth_in_flight(self) -> None:
        """Re-drive frames ``[next out, committed)`` from their motion with the lips eased to rest."""
        first, rest = self._next_out, self.prepared.source.params
        ease = self.config.interrupt_ease_frames
        for n in range(first, self._timeline.committed):
            closed = rest_lips(self._drive.motion_at(n), rest, min(1.0, (n - first + 1) / ease))
            driven = self._drive.drive_params(n, closed)
            self._slot.push_live(RenderJob(n, self.generation, driven.kp, self._schedule.due_time(n)))

    def end_of_stream(self) -> None:
        if self._closed or self._timeline.ended:
            return
        tail = self._resampler.flush()
        if tail.size:
            self._timeline.append(tail, self.clock.now())
        self._timeline.end()
        self._input.set()

    async def next_video(self) -> VideoFrame | None:
        return await self._next(self._video_out)

    async def next_audio(self) -> OutputAudio | None:
        """Offline (``realtime=False``) read both outputs: an unread one fills up and holds the other back."""
        return await self._next(self._audio_out)

    async def _next(self, queue: asyncio.Queue[Any]) -> Any:
        if self._closed and queue.empty():
            return None
        item = await queue.get()
        if item is None:
            queue.put_nowait(None)  # the end stays the end for every later call
        return item

    def metrics(self) -> dict[str, float]:
        out = self.metrics_.as_dict(self.clock.now())
        out.update(
            {
                "latency_budget_ms": self.latency_s * 1000.0,
                "lookahead_frames": float(self.lookahead_frames),
                "frames_committed": float(self._timeline.committed),
                "motion_rows_skipped": float(self._motion.skipped),
                "input_dropped_s": self._timeline.dropped_samples / SAMPLE_RATE,
                "buffered_s": self._timeline.pending_samples / SAMPLE_RATE,
                "q_audio": float(self._q_audio.qsize()),
                "q_features": float(self._q_feat.qsize()),
                "q_motion": float(self._q_motion.qsize()),
                "q_keypoints": float(self._q_driven.qsize()),
                "q_render": float(len(self._slot.pending)),
                "q_video_out": float(self._video_out.qsize()),
                "q_audio_out": float(self._audio_out.qsize()),
                "render_batch_ms": self._slot.worker.render_time * 1000.0,
                "frames_skipped": float(self._slot.skipped),
                "video_state": float(VIDEO_STATES.index(self.health.state)),
                "video_state_changes": float(self.health.changes),
            }
        )
        out.update(self.metrics_.histogram())
        return out

    async def close(self) -> None:
        if self._closed and not self._tasks:
            return
        self._closed = True
        self._slot.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task  # a failed stage's exception was logged (and kept in .error) already
        self._tasks.clear()
        if self._stage_thread is not None:
            await self._stage_thread.aclose()
        self._rendered.clear()
        # wake anyone still waiting for output
        for q in (self._video_out, self._audio_out):
            while not q.empty():
                q.get_nowait()
            q.put_nowait(None)

    @property
    def closed(self) -> bool:
        return self._closed

    # --- stages owned by the session -----------------------------------------------------------------------

    def _gen(self) -> int:
        return self.generation

    def _catch_up(self, index: int) -> int | None:
        """Row ``index`` is too late for its frame: skip through the newest committed frame."""
        if self.clock.now() <= self._schedule.due_time(index):
            return None
        return self._timeline.committed - 1

    async def _forward(self) -> None:
        while self._system:
            await self._q_audio.put((self.generation, self._system.popleft()))
        for frame in self._timeline.take_unforwarded():
            chunk = AudioChunk(frame.samples, frame_bound(frame.index, self.fps))
            await self._q_audio.put((self.generation, chunk))

    async def _source(self) -> None:
        """Commit input audio to the clock frame by frame and feed it to the feature stage."""
        tl = self._timeline
        if self.config.realtime:
            while not tl.exhausted:
                target = tl.committed
                await self.clock.sleep_until(self._schedule.commit_time(target))
                if tl.committed == target and not tl.exhausted:
                    tl.commit_live()  # (unless the output side already had to commit it)
                await self._forward()
        else:
            while not tl.exhausted:
                if tl.commit_ready() is None:
                    if self._system:  # a control or interrupt with no new audio yet: it goes now
                        await self._forward()
                        continue
                    self._input.clear()
                    await self._input.wait()
                    continue
                await self._forward()
        await self._forward()
        await self._q_audio.put((self.generation, EndOfStream()))

    async def _submit(self) -> None:
        """Keypoints -> the shared render worker, each with the time it must be ready by."""
        while True:
            gen, frame = await self._q_driven.get()
            if isinstance(frame, EndOfStream):
                break
            if not isinstance(frame, Driven) or gen != self.generation:
                continue
            deadline = self._schedule.due_time(frame.frame_index) if self.config.realtime else math.inf
            await self._slot.submit(RenderJob(frame.frame_index, gen, frame.kp, deadline))
        self._drive_done = True
        self._render_event.set()

    def _deliver(self, job: RenderJob, rgb: np.ndarray, now: float) -> None:
        self.metrics_.frames_rendered += 1
        self._render_event.set()
        if job.generation != self.generation:
            return  # interrupted: not shown
        picture = _Rendered(job.generation, rgb, now)
        if job.frame_index >= self._next_out:
            self._rendered[job.frame_index] = picture
        elif self._picture is None or job.frame_index > self._picture[0]:
            # finished after its slot: too late for it, but the freshest picture for the slots that follow
            self.metrics_.frames_late += 1
            self._picture = (job.frame_index, picture)

    def _dropped(self, job: RenderJob) -> None:
        """The worker skipped the job (it could not be ready in time); the output counts the missing frame."""
        self._render_event.set()

    def _put_live(self, queue: asyncio.Queue[Any], item: Any, counter: str) -> None:
        """Live outputs never block the clock: a reader that falls behind loses its oldest item."""
        if queue.full():
            queue.get_nowait()
            setattr(self.metrics_, counter, getattr(self.metrics_, counter) + 1)
        queue.put_nowait(item)

    def _frame_done_offline(self, n: int) -> bool:
        if n in self._rendered:
            return True
        later = any(k > n for k in self._rendered)
        return later or (self._drive_done and self._slot.idle)

    async def _output(self) -> None:
        """Release frame ``n`` with its audio: live at its due time (missing frames are drops), offline in order."""
        tl = self._timeline
        realtime = self.config.realtime
        n = 0
        while not (tl.exhausted and n >= tl.committed):
            ready = await (self._wait_due(n) if realtime else self._wait_rendered(n))
            if not ready:
                continue  # the stream ended before frame n
            self._next_out = n + 1
            audio, video = self._release(n)
            if realtime:
                self._put_live(self._audio_out, audio, "audio_out_dropped")
                if video is not None:
                    self._put_live(self._video_out, video, "video_out_dropped")
            else:
                await self._audio_out.put(audio)
                if video is not None:
                    await self._video_out.put(video)
            n += 1
        for q, counter in ((self._video_out, "video_out_dropped"), (self._audio_out, "audio_out_dropped")):
            if realtime:
                self._put_live(q, None, counter)
            else:
                await q.put(None)

    async def _wait_due(self, n: int) -> bool:
        tl = self._timeline
        await self.clock.sleep_until(self._schedule.due_time(n))
        while tl.committed <= n and not tl.exhausted:
            tl.commit_live()  # the feature side is blocked: the output still keeps time
        return n < tl.committed

    async def _wait_rendered(self, n: int) -> bool:
        tl = self._timeline
        while n >= tl.committed or not self._frame_done_offline(n):
            if tl.exhausted and n >= tl.committed:
                return False
            self._render_event.clear()
            await self._render_event.wait()
        return True

    def _release(self, n: int) -> tuple[OutputAudio, VideoFrame | None]:
        """Frame ``n``'s audio and (when it was rendered in time) its video; counts latency or the loss."""
        now = self.clock.now()
        committed = self._timeline.release(n)
        audio = OutputAudio(committed.samples, frame_bound(n, self.fps))
        rendered = self._rendered.pop(n, None)
        if rendered is not None and rendered.generation == self.generation:
            live_at = self._schedule.live_time(n) if self.config.realtime else -math.inf
            arrival = max(x for x in (committed.arrival, live_at) if x is not None)
            self.metrics_.frame_out(now, now - arrival if math.isfinite(arrival) else None)
            self._picture = (n, rendered)
            self._shown_picture, self._shown_new_at, self._shown = n, now, rendered
            if self.config.realtime:
                self.health.record(now, True)
            return audio, VideoFrame(n, self.fps, rendered.rgb, rendered.created)
        if n < self._interrupt_horizon:
            self.metrics_.frames_interrupted += 1
        self.metrics_.frames_dropped += 1
        if self._picture is None:
            if self.config.realtime:
                self.health.record(now, False)
            return audio, None  # nothing rendered yet (the first frames of a session)
        # the renderer was late: the track keeps its rate with the newest picture while the audio plays on. A late
        # picture is shown while it is at most late_picture_frames behind (lip sync holds within a frame); beyond
        # that the last picture repeats, unless nothing new was shown for stall_s (then a late one beats a freeze)
        index, picture = self._picture
        cfg = self.config
        new = index > self._shown_picture and (
            n - index <= cfg.late_picture_frames or now - self._shown_new_at >= cfg.stall_s
        )
        if new or self._shown is None:
            self._shown_picture, self._shown_new_at, self._shown = index, now, picture
            self.metrics_.frame_out(now, None, on_time=False)
        else:
            index, picture = self._shown_picture, self._shown
            self.metrics_.frames_repeated += 1
        if self.config.realtime:
            self.health.record(now, new)
        return audio, VideoFrame(n, self.fps, picture.rgb, picture.created, repeated=not new, lag=n - index)
