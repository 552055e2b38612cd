"""The session's stages: the audio time line, features, motion, keypoints.

Each stage is a small synchronous object with one ``process(frame) -> list[frame]`` step (testable without an
event loop); :func:`run_stage` moves its typed frames (:mod:`streaming.frames`) between bounded asyncio queues.
Frames travel as ``(generation, frame)`` packets: an interrupt bumps the session's generation, and frames of an
older generation are dropped (or, before the feature stage, silenced so the per-frame row count stays exact).
:class:`~streaming.frames.Control` frames are never dropped: the motion stage applies each one on its own thread,
after the audio that came before it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch

from engine.keypoints import MotionParams
from engine.motion.base import FeatureStage, MotionFrame, MotionStage
from engine.motion.control_schema import Controllable
from engine.render.base import PreparedAvatar, Renderer
from streaming.batching import WorkerThread
from streaming.clock import frame_bound
from streaming.frames import AudioChunk, Control, Driven, EndOfStream, FeatureRows, Interrupt, MotionOut

Frame: TypeAlias = AudioChunk | FeatureRows | MotionOut | Driven | Control | Interrupt | EndOfStream
Packet: TypeAlias = tuple[int, Frame]  # (generation, frame)


# --- the audio time line -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommittedFrame:
    index: int
    samples: np.ndarray  # [n] float32, n = the frame's sample count (shorter only for the last frame offline)
    arrival: float | None  # clock time the frame's last real sample arrived (None: all silence)


class AudioTimeline:
    """The session's sample clock: input waits in ``pending``; frames are committed in order, then released.

    Live, a frame is committed on time whether or not its audio came (missing samples become silence, so the
    avatar idles from the same motion path). Offline, frames are committed only from real audio.
    """

    def __init__(self, fps: int, max_pending: int | None) -> None:
        self.fps = fps
        self.max_pending = max_pending
        self._pending: deque[tuple[np.ndarray, float]] = deque()
        self.pending_samples = 0
        self.committed = 0  # frames committed so far
        self.input_samples = 0
        self.dropped_samples = 0
        self.ended = False
        self._delay: dict[int, CommittedFrame] = {}  # committed, not yet released (the output delay line)
        self._muted_below = 0  # frames below this index that are still in the delay line play as silence
        self._unforwarded: deque[CommittedFrame] = deque()  # committed, not yet sent to the feature stage

    def frame_samples(self, n: int) -> int:
        return frame_bound(n + 1, self.fps) - frame_bound(n, self.fps)

    def append(self, samples: np.ndarray, now: float) -> None:
        if self.ended:
            raise ValueError("audio pushed after end_of_stream")
        if self.max_pending is not None and self.pending_samples + samples.size > self.max_pending:
            keep = max(0, self.max_pending - self.pending_samples)
            self.dropped_samples += samples.size - keep
            samples = samples[:keep]
        if samples.size:
            self._pending.append((samples, now))
            self.pending_samples += samples.size
            self.input_samples += samples.size

    def _take(self, n: int) -> tuple[np.ndarray, float | None]:
        parts: list[np.ndarray] = []
        arrival: float | None = None
        need = n
        while need and self._pending:
            chunk, t = self._pending[0]
            part = chunk[:need]
            parts.append(part)
            arrival = t if arrival is None else max(arrival, t)
            if part.size == chunk.size:
                self._pending.popleft()
            else:
                self._pending[0] = (chunk[need:], t)
            need -= part.size
            self.pending_samples -= part.size
        out = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return out.astype(np.float32, copy=False), arrival

    def commit_live(self) -> CommittedFrame:
        """Commit the next frame now: its audio if it came, silence for what did not."""
        n = self.committed
        size = self.frame_samples(n)
        samples, arrival = self._take(size)
        if samples.size < size:
            samples = np.concatenate([samples, np.zeros(size - samples.size, np.float32)])
        return self._commit(n, samples, arrival)

    def commit_ready(self) -> CommittedFrame | None:
        """Offline: the next frame if its audio is complete (or, after the end, whatever is left)."""
        n = self.committed
        size = self.frame_samples(n)
        if self.pending_samples >= size or (self.ended and self.pending_samples > 0):
            samples, arrival = self._take(size)
            return self._commit(n, samples, arrival)
        return None

    def _commit(self, n: int, samples: np.ndarray, arrival: float | None) -> CommittedFrame:
        frame = CommittedFrame(n, samples, arrival)
        self._delay[n] = frame
        self._unforwarded.append(frame)
        self.committed += 1
        return frame

    def take_unforwarded(self) -> list[CommittedFrame]:
        """Committed frames the feature stage has not seen yet (the output side may commit ahead of it)."""
        out = list(self._unforwarded)
        self._unforwarded.clear()
        return out

    def release(self, n: int) -> CommittedFrame:
        """The output audio of frame ``n`` (removed from the delay line). Interrupted frames play as silence."""
        frame = self._delay.pop(n)
        if n < self._muted_below:
            return CommittedFrame(n, np.zeros_like(frame.samples), frame.arrival)
        return frame

    def interrupt(self) -> None:
        """Barge-in: forget input not yet committed, and silence committed audio not yet released."""
        self._pending.clear()
        self.pending_samples = 0
        self._muted_below = self.committed

    def end(self) -> None:
        self.ended = True

    @property
    def exhausted(self) -> bool:
        return self.ended and self.pending_samples == 0


# --- processing stages ---------------------------------------------------------------------------------------


class FeatureStep:
    """AudioChunk -> FeatureRows through a :class:`FeatureStage`."""

    def __init__(self, features: FeatureStage) -> None:
        self.features = features

    def process(self, frame: Frame, stale: bool, generation: int) -> list[Frame]:
        if isinstance(frame, AudioChunk):
            # audio of an interrupted generation still advances the clock, as silence: one row per frame stays exact
            samples = np.zeros_like(frame.samples) if stale else frame.samples
            rows = self.features.push(samples)
            return [FeatureRows(rows)] if len(rows) else []
        if isinstance(frame, EndOfStream):
            rows = self.features.flush()
            return [FeatureRows(rows), frame] if len(rows) else [frame]
        return [frame]


class MotionStep:
    """FeatureRows -> MotionOut through a :class:`MotionStage`; interrupts it when the generation changes.

    The session owns frame indexing: feature row ``r`` is session frame ``r``. A stage may renumber after an
    interrupt (e.g. reuse the indices of the rows it dropped), so after each interrupt the first frame it emits
    is mapped to the first row pushed after the interrupt, and later frames keep that offset.
    """

    def __init__(self, motion: MotionStage, catch_up: Callable[[int], int | None] | None = None) -> None:
        self.motion = motion
        # live catch-up: (session index of a row) -> None while its frame can still be on time, else the index
        # of the newest row already committed (everything up to it is skipped)
        self.catch_up = catch_up
        self._skip_through = -1
        self.skipped = 0
        self.generation = 0
        self.rows_in = 0  # rows pushed = session index of the next row
        self.offset = 0  # session index - stage index
        self._rebase_at: int | None = None

    def _interrupt(self) -> None:
        self.motion.interrupt()
        self._rebase_at = self.rows_in

    def _out(self, frames: list[MotionFrame]) -> list[Frame]:
        if frames and self._rebase_at is not None:
            self.offset = self._rebase_at - frames[0].frame_index
            self._rebase_at = None
        if self.offset == 0:
            return [MotionOut(m) for m in frames]
        return [MotionOut(MotionFrame(m.frame_index + self.offset, m.params)) for m in frames]

    def process(self, frame: Frame, stale: bool, generation: int) -> list[Frame]:
        if generation != self.generation:
            self.generation = generation
            self._interrupt()
        if isinstance(frame, FeatureRows):
            n = len(frame.rows)
            last = self.rows_in + n - 1
            if n and self.catch_up is not None and last > self._skip_through:
                through = self.catch_up(last)
                if through is not None:
                    # the stage fell behind the clock (a slow model): skip the whole backlog at once instead of
                    # computing frames nobody will see, so latency cannot grow; motion restarts at the live edge
                    self._skip_through = max(through, last)
                    self.motion.interrupt()
            if n and last <= self._skip_through:
                self.rows_in += n
                self.skipped += n
                self._rebase_at = self.rows_in  # the stage's next frame is the first row it sees again
                return []
            frames = self.motion.push(frame.rows)
            self.rows_in += n
            if stale:
                # rows of interrupted speech (queued before the interrupt): dropped again by another interrupt,
                # the stage owns how it returns to idle
                self._interrupt()
                return []
            return self._out(frames)
        if isinstance(frame, Control):
            if isinstance(self.motion, Controllable):
                self.motion.apply_controls(frame.state)
            return []
        if isinstance(frame, EndOfStream):
            return [*self._out(self.motion.flush()), frame]
        return [frame]


class DriveStep:
    """MotionOut -> Driven: the renderer's keypoint path (rotation, expression, stitching) for one avatar.

    The motion of the frames it drove is kept (``params``, the newest ``keep`` frames) so an interrupt can re-drive
    the frames already in flight with the mouth closing instead of throwing them away."""

    def __init__(self, renderer: Renderer, prepared: PreparedAvatar, keep: int = 64) -> None:
        self.renderer = renderer
        self.prepared = prepared
        self.keep = keep
        self.params: dict[int, MotionParams] = {}

    def drive_params(self, index: int, params: MotionParams) -> Driven:
        with torch.inference_mode():
            kp = self.renderer.drive(self.prepared, params)  # [1, 21, 3]
        return Driven(index, kp.reshape(1, -1, 3))

    def drive(self, motion: MotionFrame) -> Driven:
        self.params[motion.frame_index] = motion.params
        for old in [k for k in self.params if k <= motion.frame_index - self.keep]:
            del self.params[old]
        return self.drive_params(motion.frame_index, motion.params)

    def motion_at(self, index: int) -> MotionParams:
        """The motion driven for ``index``, else the newest one before it, else the portrait's own."""
        if index in self.params:
            return self.params[index]
        earlier = [k for k in self.params if k < index]
        return self.params[max(earlier)] if earlier else self.prepared.source.params

    def process(self, frame: Frame, stale: bool, generation: int) -> list[Frame]:
        if isinstance(frame, MotionOut):
            return [] if stale else [self.drive(frame.motion)]
        return [frame]


Step = Callable[[Frame, bool, int], list[Frame]]  # (frame, stale, current generation) -> frames


async def run_stage(
    step: Step,
    inq: asyncio.Queue[Packet],
    outq: asyncio.Queue[Packet],
    generation: Callable[[], int],
    thread: WorkerThread | None = None,
) -> None:
    """Move frames from ``inq`` through ``step`` into ``outq`` until :class:`EndOfStream` has passed.

    With ``thread`` the step runs there, so a slow model (a diffusion window takes long on a CPU) never blocks
    the event loop. Outputs carry the generation current when they were made: whatever a stage emits after an
    interrupt already reflects it.
    """
    while True:
        gen, frame = await inq.get()
        current = generation()
        stale = gen != current
        outs = step(frame, stale, current) if thread is None else await thread.run(step, frame, stale, current)
        for out in outs:
            await outq.put((current, out))
        if isinstance(frame, EndOfStream):
            return
        if thread is None:
            await asyncio.sleep(0)  # a stage working off a backlog must not starve the stages after it
