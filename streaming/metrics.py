"""Session metrics: latency percentiles and histogram, delivered fps, fresh / repeated / dropped frames, and the
video state a user sees (``ok``, ``degraded``, ``stalled``) with one log line per change."""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

logger = logging.getLogger(__name__)

# upper bounds (seconds) of the latency histogram's buckets (Prometheus ``le``), the last is +Inf
LATENCY_BUCKETS_S: tuple[float, ...] = (0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0)
VIDEO_STATES = ("ok", "degraded", "stalled")


class VideoHealth:
    """What share of the last ``window_s`` of frame slots showed a new picture (their own, or a late one).

    ``degraded`` when that share falls under ``degrade_below`` (the session repeats pictures: the renderer is
    slower than real time), ``stalled`` when no slot in the window had a fresh picture, back to ``ok`` once the
    share is at least ``recover_at`` again. Each change is logged once (a warning when it gets worse, a warning
    when it recovers: both are news to whoever operates the server).
    """

    def __init__(self, name: str, window_s: float = 1.0, degrade_below: float = 0.9, recover_at: float = 0.97) -> None:
        self.name = name
        self.window_s = window_s
        self.degrade_below = degrade_below
        self.recover_at = recover_at
        self.state = "ok"
        self.changes = 0
        self._slots: deque[tuple[float, bool]] = deque()

    def record(self, now: float, fresh: bool) -> str:
        self._slots.append((now, fresh))
        while self._slots and self._slots[0][0] < now - self.window_s:
            self._slots.popleft()
        if len(self._slots) < 3:  # too few slots to judge (start of a stream)
            return self.state
        share = sum(f for _, f in self._slots) / len(self._slots)
        state = self.state
        if share == 0.0:
            state = "stalled"
        elif share < self.degrade_below or (self.state != "ok" and share < self.recover_at):
            state = "degraded"
        else:
            state = "ok"
        if state != self.state:
            self.changes += 1
            if state == "ok":
                logger.warning(
                    "%s: video recovered (%.0f%% fresh frames over %.1f s)", self.name, 100 * share, self.window_s
                )
            else:
                logger.warning(
                    "%s: video %s: %.0f%% of the last %.1f s of frames were freshly rendered; the session repeats "
                    "its last picture while audio keeps flowing",
                    self.name,
                    state,
                    100 * share,
                    self.window_s,
                )
            self.state = state
        return self.state


class SessionMetrics:
    """Rolling statistics over the last ``window`` frames (latencies) and ``fps_window_s`` seconds (fps)."""

    def __init__(self, window: int = 500, fps_window_s: float = 2.0) -> None:
        self.latencies: deque[float] = deque(maxlen=window)
        self._out_times: deque[float] = deque()
        self.fps_window_s = fps_window_s
        self.frames_out = 0  # slots that showed their own picture, on time
        self.frames_late_shown = 0  # slots that showed a new picture rendered too late for its own slot
        self.frames_repeated = 0  # slots that showed the last picture again (the renderer was late)
        self.frames_dropped = 0  # slots without their own picture (a late one, a repeat, or nothing yet)
        self.frames_late = 0  # pictures rendered after their slot (shown from the next slot on)
        self.frames_interrupted = 0  # thrown away by a barge-in
        self.audio_out_dropped = 0  # output audio nobody read (live)
        self.video_out_dropped = 0  # output video nobody read (live)
        self.frames_rendered = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)  # the last bucket is +Inf
        self.latency_sum = 0.0
        self._all_latencies: list[float] = []

    def frame_out(self, now: float, latency: float | None, on_time: bool = True) -> None:
        """A new picture was shown (``on_time``: in its own slot; else a late one, without a latency sample)."""
        if not on_time:
            self.frames_late_shown += 1
        else:
            self.frames_out += 1
        self._out_times.append(now)
        while self._out_times and self._out_times[0] < now - self.fps_window_s:
            self._out_times.popleft()
        if latency is not None:
            self.latencies.append(latency)
            self._all_latencies.append(latency)
            if len(self._all_latencies) > 200_000:  # ~2 h at 25 fps: keep a long session's memory flat
                del self._all_latencies[:100_000]
            self.latency_buckets[int(np.searchsorted(LATENCY_BUCKETS_S, latency))] += 1
            self.latency_sum += latency

    def fps(self, now: float) -> float:
        """New pictures delivered per second over the last ``fps_window_s`` (repeats do not count)."""
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

    def histogram(self) -> dict[str, float]:
        """The latency histogram as flat, Prometheus-style cumulative counts: ``latency_le_<ms>`` (``inf`` last),
        ``latency_count`` and ``latency_sum_ms`` (every measured frame since the start)."""
        out: dict[str, float] = {}
        total = 0
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), self.latency_buckets, strict=True):
            total += count
            out[f"latency_le_{'inf' if bound == float('inf') else round(bound * 1000)}"] = float(total)
        out["latency_count"] = float(total)
        out["latency_sum_ms"] = 1000.0 * self.latency_sum
        return out

    def as_dict(self, now: float) -> dict[str, float]:
        return {
            "latency_p50_ms": self.percentile(50) * 1000.0,
            "latency_p95_ms": self.percentile(95) * 1000.0,
            "latency_samples": float(len(self.latencies)),
            "fps": self.fps(now),
            "frames_out": float(self.frames_out),
            "frames_late_shown": float(self.frames_late_shown),
            "frames_rendered": float(self.frames_rendered),
            "frames_repeated": float(self.frames_repeated),
            "frames_dropped": float(self.frames_dropped),
            "frames_late": float(self.frames_late),
            "frames_interrupted": float(self.frames_interrupted),
            "video_out_dropped": float(self.video_out_dropped),
            "audio_out_dropped": float(self.audio_out_dropped),
        }
