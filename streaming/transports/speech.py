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
stamps frames with); until the first frame rendered after it arrives, the adapter shows the avatar's last rest
frame, so the mouth stops at once whatever the session's own recovery time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from engine.audio.pcm import SAMPLE_RATE
from streaming.api import LiveSession
from streaming.clock import frame_bound
from streaming.frames import VideoFrame

REST_GAP_S = 0.4  # a frame this far from any speech shows the avatar at rest (the jaw has closed)
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
        self, session: LiveSession, *, rest_gap_s: float = REST_GAP_S, max_pictures: int = MAX_PICTURES
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
        self._bridging = False  # showing the rest frame until a frame rendered after the interrupt comes
        self._rest: VideoFrame | None = None
        self._last_index = -1  # last picture's frame index
        self._last_speech_frame = -(10**9)
        self._ended = False
        self.pushed_samples = 0  # source samples pushed
        self.released_samples = 0  # source samples released as Speech
        self.interrupted_samples = 0  # source samples forgotten by interrupts
        self.pictures_dropped = 0  # pictures a slow consumer never took
        self.stale_dropped = 0  # frames rendered before an interrupt, not shown
        self.rest_pictures = 0  # rest frames shown while the session recovered from an interrupt

    # --- input -------------------------------------------------------------------------------------------------

    def push(self, pcm: np.ndarray, sample_rate: int, meta: Any = None) -> None:
        """Hand a block of speech (``[n, channels]`` int16) to the session and note where it will play."""
        pcm = as_int16(pcm)
        if pcm.shape[0] == 0:
            return
        before = self._position()
        self.session.push_audio(pcm, sample_rate)
        after = self._position()
        accepted = after[1] - before[1]
        dropped = after[2] - before[2]
        if dropped > 0:
            # the session kept the head of the block (its input buffer was full): keep the same share
            keep = pcm.shape[0] * accepted // (accepted + dropped)
            self.interrupted_samples += pcm.shape[0] - keep
            pcm = pcm[:keep]
        start = frame_bound(before[0], self.fps) + before[1]
        self._ledger.append(_Block(start, max(0, accepted), pcm, int(sample_rate), meta))
        self.pushed_samples += pcm.shape[0]
        self._empty.clear()
        self._start()

    def mark(self, item: Any) -> None:
        """Release ``item`` (as a :class:`Marker`) after all the speech pushed so far."""
        if any(isinstance(e, _Block) for e in self._ledger):
            self._ledger.append(_Mark(item))
        else:
            self._emit(Marker(item))

    def interrupt(self) -> list[Any]:
        """Barge-in: the session drops its speech, the ledger and any speech not yet taken are forgotten.
        Returns the markers that were waiting (in order), for the caller to drop or pass on."""
        self.session.interrupt()
        self._interrupted_at = time.monotonic()
        held: list[Any] = []
        for entry in self._ledger:
            if isinstance(entry, _Mark):
                held.append(entry.item)
            else:
                self.interrupted_samples += entry.pcm.shape[0] - entry.sent
        self._ledger.clear()
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
        if self._bridging and self._rest is not None:
            # show the rest frame now, in the slot after the last picture
            self._picture(replace(self._rest, frame_index=self._last_index + 1, created=time.monotonic()), rest=True)
        return held

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
        return sum((e.pcm.shape[0] - e.sent) / e.rate for e in self._ledger if isinstance(e, _Block))

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
            if end < entry.start or (end == entry.start and entry.length > 0):
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
        if not self._ledger:
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
            self._bridging = False
            if frame.frame_index <= self._last_index:
                continue  # its slot was filled by a rest frame already
            if self._at_rest(frame.frame_index):
                self._rest = frame
            self._picture(frame)
