"""Session metrics: audio-in -> frame-out latency percentiles, output fps, drops, queue depths."""

from __future__ import annotations

from collections import deque

import numpy as np


class SessionMetrics:
    """Rolling statistics over the last ``window`` frames (latencies) and ``fps_window_s`` seconds (fps)."""

    def __init__(self, window: int = 500, fps_window_s: float = 2.0) -> None:
        self.latencies: deque[float] = deque(maxlen=window)
        self._out_times: deque[float] = deque()
        self.fps_window_s = fps_window_s
        self.frames_out = 0
        self.frames_dropped = 0  # rendered too late, or never rendered in time (backpressure)
        self.frames_interrupted = 0  # thrown away by a barge-in
        self.audio_out_dropped = 0  # output audio nobody read (live)
        self.video_out_dropped = 0  # output video nobody read (live)
        self.frames_rendered = 0
        self._all_latencies: list[float] = []

    def frame_out(self, now: float, latency: float | None) -> None:
        self.frames_out += 1
        self._out_times.append(now)
        while self._out_times and self._out_times[0] < now - self.fps_window_s:
            self._out_times.popleft()
        if latency is not None:
            self.latencies.append(latency)
            self._all_latencies.append(latency)
            if len(self._all_latencies) > 200_000:  # ~2 h at 25 fps: keep a long session's memory flat
                del self._all_latencies[:100_000]

    def fps(self, now: float) -> float:
        times = [t for t in self._out_times if t >= now - self.fps_window_s]
        if len(times) < 2:
            return 0.0
        span = max(times[-1] - times[0], 1e-9)
        return (len(times) - 1) / span

    def percentile(self, q: float) -> float:
        """0.0 before the first frame (metrics go to JSON, which has no NaN)."""
        if not self.latencies:
            return 0.0
        return float(np.percentile(np.asarray(self.latencies), q))

    def all_latencies(self) -> list[float]:
        """Every measured latency since the start (benchmarks summarise whole runs)."""
        return list(self._all_latencies)

    def as_dict(self, now: float) -> dict[str, float]:
        return {
            "latency_p50_ms": self.percentile(50) * 1000.0,
            "latency_p95_ms": self.percentile(95) * 1000.0,
            "latency_samples": float(len(self.latencies)),
            "fps": self.fps(now),
            "frames_out": float(self.frames_out),
            "frames_rendered": float(self.frames_rendered),
            "frames_dropped": float(self.frames_dropped),
            "frames_interrupted": float(self.frames_interrupted),
            "video_out_dropped": float(self.video_out_dropped),
            "audio_out_dropped": float(self.audio_out_dropped),
        }
