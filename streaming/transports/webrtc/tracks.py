"""aiortc tracks fed by a live session, both paced by one clock so the browser sees audio and video in sync.

The session numbers video frames and output audio samples on the same output clock (frame ``n`` is at
``n / fps`` seconds, audio sample ``s`` at ``s / 16000``). Each track waits until ``t0 + pts`` on the
event loop's clock before handing a frame to its sender, so both leave the server at the time they belong to,
whatever the speed at which the session produced them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engine.audio.pcm import SAMPLE_RATE
from streaming.api import LiveSession
from streaming.frames import OutputAudio, VideoFrame
from streaming.pacing import SessionClock

logger = logging.getLogger(__name__)

VIDEO_CLOCK_RATE = 90_000  # RTP video clock
AUDIO_FRAME_SAMPLES = SAMPLE_RATE // 50  # 20 ms at 16 kHz; aiortc's Opus encoder resamples to 48 kHz / 960
AUDIO_ANCHOR_WAIT_S = 2.0  # audio waits this long for the first video frame before starting the clock alone
MAX_AUDIO_BUFFER_S = 30.0  # output audio held ahead of the clock; beyond it the oldest is dropped
SESSION_WAIT_S = 0.005  # next_video() took longer than this: the frame was not ready, the session is the slow one


class MediaSource(Protocol):
    """What the tracks read: a live session itself, or one subscriber of its fan-out (streaming.transports.webrtc
    .fanout), which hands every viewer the frames the session rendered once."""

    async def next_video(self) -> VideoFrame | None: ...

    async def next_audio(self) -> OutputAudio | None: ...


@dataclass
class TrackStats:
    """Transport-side counters of one peer (read by /metrics and the stats pushed to the page)."""

    video_sent: int = 0
    video_repeated: int = 0  # sent frames that repeated the previous picture (the session was late)
    video_lag_frames: int = 0  # sum over sent frames of how many slots old their picture was (late or repeated)
    video_dropped: int = 0
    audio_frames_sent: int = 0
    audio_late_samples: int = 0  # output audio that arrived after its slot was already sent (as silence)
    mic_frames: int = 0
    send_latency_s: float = 0.0  # last frame: left the renderer -> handed to the encoder
    _send_times: deque[float] = field(default_factory=lambda: deque(maxlen=64))

    def on_video_sent(self, created: float) -> None:
        now = time.monotonic()
        self.video_sent += 1
        self._send_times.append(now)
        if created > 0:
            self.send_latency_s = max(0.0, now - created)

    def picture_lag_ms(self, fps: int) -> float:
        """Mean age of the sent pictures behind their slots (ms): the lip-sync cost of late and repeated pictures,
        which the viewer sees as the mouth trailing its sound by this much on average."""
        return 1000.0 * self.video_lag_frames / (self.video_sent * fps) if self.video_sent else 0.0

    def fps(self) -> float:
        """Frames sent per second over the last ~2 s."""
        now = time.monotonic()
        recent = [t for t in self._send_times if now - t <= 2.0]
        if len(recent) < 2:
            return 0.0
        span = recent[-1] - recent[0]
        return (len(recent) - 1) / span if span > 0 else 0.0


class SessionVideoTrack(MediaStreamTrack):
    """Avatar video: the session's frames, released at ``t0 + frame_index / fps``."""

    kind = "video"

    def __init__(self, session: MediaSource, clock: SessionClock, stats: TrackStats, max_lag_s: float) -> None:
        super().__init__()
        self._session = session
        self._clock = clock
        self._stats = stats
        self._max_lag_s = max_lag_s

    async def recv(self) -> av.VideoFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            asked = time.monotonic()
            frame = await self._session.next_video()
            if frame is None:
                self.stop()
                raise MediaStreamError
            waited = time.monotonic() - asked
            lateness = await self._clock.wait_until(frame.pts)
            if lateness > self._max_lag_s:
                if waited < SESSION_WAIT_S:
                    # the frame was already waiting: we fell behind (a stall here); skipping catches up
                    self._stats.video_dropped += 1
                    continue
                # the session only just produced it: the session is behind, and the schedule follows it
                self._clock.shift(lateness)
            out = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame.rgb), format="rgb24")
            out.pts = frame.frame_index * VIDEO_CLOCK_RATE // frame.fps
            out.time_base = Fraction(1, VIDEO_CLOCK_RATE)
            self._stats.on_video_sent(frame.created)
            self._stats.video_repeated += int(frame.repeated)
            self._stats.video_lag_frames += frame.lag
            return out


class SessionAudioTrack(MediaStreamTrack):
    """The session's delayed output audio as 20 ms frames on the shared clock.

    Output audio is collected by a pump task and sent in the 20 ms slot it belongs to; a slot with no audio
    yet (idle, or the pipeline is late) goes out as silence so the stream never stalls and never drifts.
    """

    kind = "audio"

    def __init__(self, session: MediaSource, clock: SessionClock, stats: TrackStats) -> None:
        super().__init__()
        self._session = session
        self._clock = clock
        self._stats = stats
        self._chunks: deque[OutputAudio] = deque()
        self._buffered = 0
        self._pos = 0  # next sample to send, on the 16 kHz output clock
        self._pump: asyncio.Task[None] | None = None
        self._ended = False

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._pump is None:
            self._pump = asyncio.create_task(self._pull(), name="audio-pump")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._clock.anchored.wait(), AUDIO_ANCHOR_WAIT_S)
            # start where the picture starts (the first video frame need not be frame 0)
            self._pos = int(self._clock.first_pts * SAMPLE_RATE) // AUDIO_FRAME_SAMPLES * AUDIO_FRAME_SAMPLES
        if self._ended and not self._chunks:
            self.stop()
            raise MediaStreamError
        await self._clock.wait_until(self._pos / SAMPLE_RATE)
        block = self._take(self._pos, AUDIO_FRAME_SAMPLES)
        pcm = (np.clip(block, -1.0, 1.0) * 32767.0).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pos
        frame.time_base = Fraction(1, SAMPLE_RATE)
        self._pos += AUDIO_FRAME_SAMPLES
        self._stats.audio_frames_sent += 1
        return frame

    def stop(self) -> None:
        super().stop()
        if self._pump is not None:
            self._pump.cancel()

    async def _pull(self) -> None:
        while True:
            chunk = await self._session.next_audio()
            if chunk is None:
                self._ended = True
                return
            if chunk.samples.size == 0:
                continue
            # what falls before the next slot to send missed its time and was sent as silence
            self._stats.audio_late_samples += int(np.clip(self._pos - chunk.start, 0, chunk.samples.size))
            self._chunks.append(chunk)
            self._buffered += chunk.samples.size
            while self._buffered > MAX_AUDIO_BUFFER_S * SAMPLE_RATE and len(self._chunks) > 1:
                self._buffered -= self._chunks.popleft().samples.size

    def _take(self, start: int, n: int) -> np.ndarray:
        """Samples ``[start, start + n)`` of the output clock; silence where none arrived in time."""
        out = np.zeros(n, np.float32)
        end = start + n
        for chunk in self._chunks:
            if chunk.start >= end:
                break
            lo = max(start, chunk.start)
            hi = min(end, chunk.start + chunk.samples.size)
            if hi > lo:
                out[lo - start : hi - start] = chunk.samples[lo - chunk.start : hi - chunk.start]
        # what ends before the next slot is sent (or was too late to be): forget it
        while self._chunks and self._chunks[0].start + self._chunks[0].samples.size <= end:
            self._buffered -= self._chunks.popleft().samples.size
        return out


async def consume_microphone(track: MediaStreamTrack, session: LiveSession, stats: TrackStats) -> None:
    """Feed the client's microphone into the session as fast as it arrives, so no latency builds up here."""
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if not isinstance(frame, av.AudioFrame):
            continue
        pcm = frame.to_ndarray()  # packed s16: [1, n * channels]; planar: [channels, n]
        channels = len(frame.layout.channels)
        pcm = pcm.T if frame.format.is_planar else pcm.reshape(-1, channels)
        if pcm.dtype not in (np.int16, np.float32):
            pcm = pcm.astype(np.float32)
        try:
            session.push_audio(pcm if channels > 1 else pcm[:, 0], frame.sample_rate)
        except ValueError as exc:
            logger.warning("microphone frame rejected: %s", exc)
            continue
        stats.mic_frames += 1


async def drain(track: MediaStreamTrack) -> None:
    """Read and discard a track we do not use (a client camera), so its buffers never grow."""
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()
