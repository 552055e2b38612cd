"""What an agent framework's avatar adapter needs from a live session: speech in, then the avatar's frames and that
same speech, delayed to match them, out, in order with the framework's own markers.

A voice agent hands the avatar TTS audio in bursts, faster than real time, with frames of its own in between
(pipecat's ``TTSStoppedFrame``, LiveKit's ``AudioSegmentEnd``). A live session plays that audio on its clock and
answers with video frames and output audio that goes on as silence between utterances. The frameworks take any
audio they are given as "the bot is speaking", so an adapter must hand back exactly the speech it was given (the
original samples at their own rate, the same length, no idle silence), each piece when the frame it belongs to
comes out, and release each marker only once all the speech before it has been released.

:class:`SpeechSync` keeps a ledger of the speech in flight. When a block is pushed it notes where the block will
land on the session's output clock: a live session takes pending input audio first in, first out, starting at the
next frame it commits, so the block starts at ``frame_bound(frames_committed) + buffered samples``, both read from
``LiveSession.metrics()`` around the push (which also tells how much of the block the session kept, should its
input buffer overflow). Every output audio chunk of the session then releases the part of the ledger it covers.

An interrupt forgets the ledger and tells the session (``LiveSession.interrupt``). Frames the session rendered
before it are dropped (``VideoFrame.created`` is earlier than the interrupt, on the monotonic clock the runtime
stamps frames with). The adapter shows the avatar's last rest frame at once, in every frame slot until the
session's own frames come back and for ``SETTLE_S`` of them (they still close the mouth from where it was), so the
mouth stops within a frame whatever the session's own recovery time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from engine.audio.pcm import SAMPLE_RATE, check_sample_rate
from streaming.api import LiveSession
from streaming.clock import frame_bound
from streaming.frames import VideoFrame

logger = logging.getLogger(__name__)

REST_GAP_S = 0.4  # a frame this far from any speech shows the avatar at rest (the jaw has closed)
SETTLE_S = 0.16  # after an interrupt, the session's first frames this long are covered by the rest frame
FLUSH_S = 0.01  # speech pushed in a burst reaches the session together, at most this long after the first block
MAX_PICTURES = 50  # pictures waiting for a slow consumer; beyond it the oldest are dropped (live video)


@dataclass(frozen=True)
class Picture:
    """One video frame of the avatar. ``rest``: a held rest frame shown while the session recovers from an
    interrupt (its ``frame_index`` is the slot it fills)."""

    frame: VideoFrame
    rest: bool = False


@dataclass(frozen=True)
class Speech:
    """Speech released with the frame it belongs to: the pushed samples, unchanged."""

    pcm: np.ndarray  # [n, channels] int16
    sample_rate: int
    meta: Any  # what the caller pushed with the block (e.g. the TTS context id)


@dataclass(frozen=True)
class Marker:
    """A caller's item, released after all the speech pushed before it."""

    item: Any


Event = Picture | Speech | Marker


@dataclass
class _Block:
    start: int  # first sample on the session's 16 kHz output clock
    length: int  # 16 kHz samples the session took for it
    pcm: np.ndarray  # [n, channels] int16 as pushed
    rate: int
    meta: Any
    done: int = 0  # output-clock samples released so far
    sent: int = 0  # source samples released so far

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class _Mark:
    item: Any


def as_int16(pcm: np.ndarray, channels: int = 1) -> np.ndarray:
    """``[n]`` or ``[n, channels]`` int16 (or interleaved ``[n * channels]``) -> ``[n, channels]`` int16."""
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16:
        raise ValueError(f"speech must be int16 PCM, got {pcm.dtype}")
    if pcm.ndim == 2:
        return pcm
    if pcm.ndim != 1 or channels < 1 or pcm.size % channels:
        raise ValueError(f"speech of shape {pcm.shape} does not hold whole frames of {channels} channel(s)")
    return pcm.reshape(-1, channels)


class SpeechSync:
    """Speech in, ``Picture`` / ``Speech`` / ``Marker`` events out (iterate with ``async for``), over one live
    session. Call :meth:`aclose` when done; the session itself belongs to the caller."""

    def __init__(
        self,
        session: LiveSession,
        *,
        rest_gap_s: float = REST_GAP_S,
        settle_s: float = SETTLE_S,
        max_pictures: int = MAX_PICTURES,
    ) -> None:
        self.session = session
        self.max_pictures = max(1, max_pictures)
        self.fps = session.fps
        self._rest_gap = max(1, math.ceil(rest_gap_s * session.fps))
        self._ledger: deque[_Block | _Mark] = deque()
        self._out: deque[Event | None] = deque()
        self._ready = asyncio.Event()
        self._empty = asyncio.Event()  # the ledger holds nothing
        self._empty.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._interrupted_at: float | None = None  # frames rendered before it are stale
        self._bridging = False  # showing the rest frame until the session's own frames have settled
        self._settle = max(1, math.ceil(settle_s * session.fps))  # fresh frames held after an interrupt
        self._fresh = 0
        self._rest: VideoFrame | None = None
        self._last_index = -1  # last picture's frame index
        self._last_speech_frame = -(10**9)
        self._inbox: deque[_Block | _Mark] = deque()  # pushed, not yet handed to the session
        self._flush_handle: asyncio.Handle | None = None
        self._last_flush = -1e9
        self._ended = False
        # the session's resampler stream (the input rate fixes it): source samples pushed, resampled samples the
        # session took (or dropped) from it
        self._stream_rate: int | None = None
        self._stream_pushed = 0
        self._stream_taken = 0
        self.pushed_samples = 0  # source samples pushed
        self.released_samples = 0  # source samples released as Speech
        self.interrupted_samples = 0  # source samples forgotten by interrupts
        self.pictures_dropped = 0  # pictures a slow consumer never took
        self.stale_dropped = 0  # frames rendered before an interrupt, not shown
        self.rest_pictures = 0  # rest frames shown while the session recovered from an interrupt

    # --- input -------------------------------------------------------------------------------------------------

    def push(self, pcm: np.ndarray, sample_rate: int, meta: Any = None) -> None:
        """Hand a block of speech (``[n, channels]`` int16) to the session, to be released with its frames.

        Blocks that come in a burst reach the session together, at most ``FLUSH_S`` after the first one (placing
        speech reads the session's metrics, which is worth doing once per burst rather than once per block)."""
        pcm = as_int16(pcm)
        rate = check_sample_rate(sample_rate)
        if pcm.shape[0] == 0:
            return
        self._inbox.append(_Block(0, 0, pcm, rate, meta))
        self.pushed_samples += pcm.shape[0]
        self._empty.clear()
        self._schedule_flush()

    def mark(self, item: Any) -> None:
        """Release ``item`` (as a :class:`Marker`) after all the speech pushed so far."""
        if self._inbox:
            self._inbox.append(_Mark(item))
        elif any(isinstance(e, _Block) for e in self._ledger):
            self._ledger.append(_Mark(item))
        else:
            self._emit(Marker(item))

    def interrupt(self) -> list[Any]:
        """Barge-in: the session drops its speech, the ledger and any speech not yet taken are forgotten.
        Returns the markers that were waiting (in order), for the caller to drop or pass on."""
        self.session.interrupt()
        self._interrupted_at = time.monotonic()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        held: list[Any] = []
        for entry in (*self._ledger, *self._inbox):
            if isinstance(entry, _Mark):
                held.append(entry.item)
            else:
                self.interrupted_samples += entry.pcm.shape[0] - entry.sent
        self._ledger.clear()
        self._inbox.clear()
        self._empty.set()
        kept: deque[Event | None] = deque()
        for event in self._out:
            if isinstance(event, Marker):
                held.append(event.item)
            elif isinstance(event, Speech):
                self.interrupted_samples += event.pcm.shape[0]
                self.released_samples -= event.pcm.shape[0]
            elif isinstance(event, Picture):
                self.stale_dropped += 1
            else:
                kept.append(event)
        self._out = kept
        self._bridging = self._rest is not None
        self._fresh = 0
        if self._rest is not None:
            # show the rest frame now, in the slot after the last picture
            self._picture(replace(self._rest, frame_index=self._last_index + 1, created=time.monotonic()), rest=True)
        return held

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None:
            return
        loop = asyncio.get_running_loop()
        wait = max(0.0, self._last_flush + FLUSH_S - loop.time())
        self._flush_handle = loop.call_later(wait, self._flush) if wait else loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Push the inbox to the session, one ``push_audio`` per run of blocks at one rate, and note where each
        block will play."""
        self._flush_handle = None
        self._last_flush = asyncio.get_running_loop().time()
        inbox, self._inbox = self._inbox, deque()
        while inbox:
            run: list[_Block] = []
            while inbox and isinstance(inbox[0], _Block) and (not run or inbox[0].rate == run[0].rate):
                block = inbox.popleft()
                assert isinstance(block, _Block)
                run.append(block)
            if run:
                try:
                    self._place(run)
                except ValueError as exc:  # e.g. the session closed meanwhile
                    logger.warning("%s: speech not taken: %s", self.session.id, exc)
                    self.interrupted_samples += sum(b.pcm.shape[0] for b in run)
            while inbox and isinstance(inbox[0], _Mark):
                mark = inbox.popleft()
                if any(isinstance(e, _Block) for e in self._ledger):
                    self._ledger.append(mark)
                else:
                    assert isinstance(mark, _Mark)
                    self._emit(Marker(mark.item))
        if not self._ledger:
            self._empty.set()
        self._start()

    def _place(self, run: list[_Block]) -> None:
        rate = run[0].rate
        if rate != self._stream_rate:
            # the session ends its resampler's stream (the held tail plays first) and starts a new one
            self._stream_taken = -self._held()
            self._stream_pushed = 0
            self._stream_rate = rate
        before = self._position()
        self.session.push_audio(np.concatenate([b.pcm for b in run]), rate)
        after = self._position()
        taken, dropped = after[1] - before[1], after[2] - before[2]
        # the session's input starts at the next frame it commits, after what is waiting; its resampler holds the
        # newest samples back until it has seen what follows, and the stream is time-aligned, so a block's ideal
        # place on the resampled stream, less what the session took of the stream so far, is where it plays
        base = frame_bound(before[0], self.fps) + before[1] - self._stream_taken
        available = self._stream_taken + taken  # the stream up to here reached the session's time line
        for block in run:
            n = block.pcm.shape[0]
            ideal = self._stream_pushed * SAMPLE_RATE // rate
            length = (self._stream_pushed + n) * SAMPLE_RATE // rate - ideal
            self._stream_pushed += n
            if dropped > 0:
                # the session's input buffer was full: it kept the head of what it was given
                kept = int(np.clip(available - ideal, 0, length))
                keep = n * kept // length if length else 0
                self.interrupted_samples += n - keep
                block.pcm, length = block.pcm[:keep], kept
                if keep == 0:
                    continue
            block.start, block.length = base + ideal, length
            self._ledger.append(block)
        self._stream_taken += taken + dropped

    def _held(self) -> int:
        """Resampled samples of the current stream the session has not received yet (the resampler's tail)."""
        if self._stream_rate is None:
            return 0
        return self._stream_pushed * SAMPLE_RATE // self._stream_rate - self._stream_taken

    async def drain(self, timeout: float) -> bool:
        """Wait until every pushed block and marker has been released (False on timeout)."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    @property
    def pending_s(self) -> float:
        """Seconds of speech pushed and not yet released."""
        entries = (*self._ledger, *self._inbox)
        return sum((e.pcm.shape[0] - e.sent) / e.rate for e in entries if isinstance(e, _Block))

    # --- output ------------------------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        self._start()
        while True:
            while not self._out:
                self._ready.clear()
                await self._ready.wait()
            event = self._out.popleft()
            if event is None:
                return
            yield event

    async def aclose(self) -> None:
        """Stop reading the session (idempotent); iterators end."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._end()

    # --- internals ---------------------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._tasks or self._ended:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read_audio(), name=f"{self.session.id}:speech-audio"),
            loop.create_task(self._read_video(), name=f"{self.session.id}:speech-video"),
        ]

    def _position(self) -> tuple[int, int, int]:
        """(frames committed, input samples waiting for their frame, input samples dropped) of the session."""
        m = self.session.metrics()
        try:
            return (
                int(m["frames_committed"]),
                round(m["buffered_s"] * SAMPLE_RATE),
                round(m["input_dropped_s"] * SAMPLE_RATE),
            )
        except KeyError as exc:
            raise RuntimeError(
                f"session {self.session.id} does not report {exc} in metrics(); SpeechSync needs frames_committed, "
                "buffered_s and input_dropped_s to place speech on its clock"
            ) from exc

    def _emit(self, event: Event | None) -> None:
        self._out.append(event)
        self._ready.set()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._emit(None)

    def _picture(self, frame: VideoFrame, rest: bool = False) -> None:
        pictures = sum(isinstance(e, Picture) for e in self._out)
        if pictures >= self.max_pictures:
            oldest = next(i for i, e in enumerate(self._out) if isinstance(e, Picture))
            del self._out[oldest]
            self.pictures_dropped += 1
        self._last_index = frame.frame_index
        if rest:
            self.rest_pictures += 1
        self._emit(Picture(frame, rest))

    def _release(self, end: int) -> bool:
        """Release the speech due before output-clock sample ``end`` and the markers behind it; True if any
        speech was released."""
        spoke = False
        while self._ledger:
            entry = self._ledger[0]
            if isinstance(entry, _Mark):
                self._ledger.popleft()
                self._emit(Marker(entry.item))
                continue
            if end <= entry.start:
                break
            entry.done = max(entry.done, min(entry.length, end - entry.start))
            total = entry.pcm.shape[0]
            target = total if entry.done >= entry.length else total * entry.done // entry.length
            if target > entry.sent:
                self._emit(Speech(entry.pcm[entry.sent : target], entry.rate, entry.meta))
                self.released_samples += target - entry.sent
                entry.sent = target
                spoke = True
            if entry.done < entry.length:
                break
            self._ledger.popleft()
        if not self._ledger and not self._inbox:
            self._empty.set()
        return spoke

    def _at_rest(self, n: int) -> bool:
        """Frame ``n`` is far from any speech, before and after it: the avatar's rest pose."""
        if n - self._last_speech_frame <= self._rest_gap:
            return False
        upcoming = next((e for e in self._ledger if isinstance(e, _Block)), None)
        return upcoming is None or upcoming.start >= frame_bound(n + self._rest_gap, self.fps)

    async def _read_audio(self) -> None:
        try:
            while (chunk := await self.session.next_audio()) is not None:
                end = chunk.start + int(chunk.samples.size)
                n = chunk.start * self.fps // SAMPLE_RATE  # the frame this chunk belongs to
                if self._release(end):
                    self._last_speech_frame = n
                if self._bridging and self._rest is not None and n > self._last_index:
                    self._picture(replace(self._rest, frame_index=n, created=time.monotonic()), rest=True)
            self._release(2**62)  # the session ended after playing what it took
        finally:
            self._end()

    async def _read_video(self) -> None:
        while (frame := await self.session.next_video()) is not None:
            if self._interrupted_at is not None and 0.0 < frame.created < self._interrupted_at:
                self.stale_dropped += 1
                continue
            if self._bridging:
                # the session's first frames after an interrupt still close the mouth from where it was: hold the
                # rest frame over them rather than open the mouth again
                self._fresh += 1
                if self._fresh <= self._settle:
                    if frame.frame_index > self._last_index and self._rest is not None:
                        self._picture(replace(self._rest, frame_index=frame.frame_index, created=frame.created), True)
                    continue
                self._bridging = False
            if frame.frame_index <= self._last_index:
                continue  # its slot was filled by a rest frame already
            if self._at_rest(frame.frame_index):
                self._rest = frame
            self._picture(frame)
