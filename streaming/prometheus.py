"""Prometheus text exposition of a server's sessions (no client library needed for a handful of families).

Per session (label ``session``): the transport's numbers, the session's counters (``avatar_session_*_total``) and
gauges, and its latency histogram (``avatar_session_latency_seconds``). In total: the server's own counters, the
session counters summed over every session the server has run (closed ones included, so they never go back), and
the render worker's numbers (``avatar_render_*``: calls, frames, mean batch size and call time, the cost model)
and, when sessions share diffusion steps, the shared denoiser's (``avatar_motion_denoiser_*``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from streaming.metrics import LATENCY_BUCKETS_S

_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")

# session metrics that only grow (exported as counters and summed into the server's totals)
SESSION_COUNTERS: tuple[str, ...] = (
    "frames_out",
    "frames_late_shown",
    "frames_rendered",
    "frames_repeated",
    "frames_dropped",
    "frames_late",
    "frames_skipped",
    "frames_interrupted",
    "frames_committed",
    "video_out_dropped",
    "audio_out_dropped",
    "motion_rows_skipped",
    "video_state_changes",
)
WORKER_COUNTERS: tuple[str, ...] = (
    "render_calls",
    "render_frames",
    "render_late_frames",
    "motion_denoiser_calls",  # shared diffusion steps (RuntimeConfig.motion_batching)
    "motion_denoiser_requests",
)
# transport snapshot key -> (metric name, kind)
TRANSPORT: dict[str, tuple[str, str]] = {
    "video_fps": ("video_fps", "gauge"),  # new pictures per second
    "fps": ("video_sent_fps", "gauge"),  # frames sent per second (repeats included)
    "latency_ms": ("latency_ms", "gauge"),
    "send_latency_ms": ("video_send_latency_ms", "gauge"),
    "video_sent": ("video_frames_sent_total", "counter"),
    "video_repeated": ("video_frames_repeated_total", "counter"),
    "picture_lag_ms": ("video_picture_lag_ms", "gauge"),  # mean age of the sent pictures behind their slots
    "video_dropped": ("video_frames_dropped_total", "counter"),
    "audio_frames_sent": ("audio_frames_sent_total", "counter"),
    "audio_late_samples": ("audio_late_samples_total", "counter"),
    "mic_frames": ("mic_frames_total", "counter"),
    "clock_resyncs": ("clock_resyncs_total", "counter"),
    "viewers": ("session_viewers", "gauge"),  # WHEP viewers beside the peer that opened the session
}


def metric_name(raw: str) -> str:
    name = _NAME_RE.sub("_", raw).strip("_").lower()
    return name if name and not name[0].isdigit() else f"m_{name}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "NaN"
    return repr(float(value))


def session_totals(snapshot: Mapping[str, Any]) -> dict[str, float]:
    """The counters of one session snapshot that add up into the server's totals."""
    metrics = snapshot.get("session_metrics", {})
    return {key: float(metrics.get(key, 0.0)) for key in SESSION_COUNTERS}


class _Families:
    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}
        self.samples: dict[str, list[str]] = {}

    def add(self, name: str, kind: str, value: float, labels: str = "") -> None:
        self.kinds.setdefault(name, kind)
        self.samples.setdefault(name, []).append(f"avatar_{name}{labels} {_fmt(value)}")

    def text(self) -> list[str]:
        lines: list[str] = []
        for name in self.kinds:
            lines.append(f"# TYPE avatar_{name} {self.kinds[name]}")
            lines += self.samples[name]
        return lines


def _histogram(out: _Families, label: str, metrics: Mapping[str, float]) -> None:
    if "latency_count" not in metrics:
        return
    name = "session_latency_seconds"
    out.kinds.setdefault(name, "histogram")
    samples = out.samples.setdefault(name, [])
    for bound in (*LATENCY_BUCKETS_S, float("inf")):
        key = f"latency_le_{'inf' if bound == float('inf') else round(bound * 1000)}"
        le = "+Inf" if bound == float("inf") else repr(bound)
        samples.append(f'avatar_{name}_bucket{{session="{label}",le="{le}"}} {_fmt(metrics.get(key, 0.0))}')
    samples.append(f'avatar_{name}_sum{{session="{label}"}} {_fmt(metrics.get("latency_sum_ms", 0.0) / 1000.0)}')
    samples.append(f'avatar_{name}_count{{session="{label}"}} {_fmt(metrics["latency_count"])}')


def render_metrics(
    server: Mapping[str, float],
    sessions: Iterable[Mapping[str, Any]],
    closed_totals: Mapping[str, float] | None = None,
    worker: Mapping[str, float] | None = None,
) -> str:
    """``server``: name -> value (counters end in ``_total``); ``sessions``: transport snapshots with their
    ``session_metrics``; ``closed_totals``: the counters of sessions that ended; ``worker``: render worker stats."""
    out = _Families()
    for name, value in sorted(server.items()):
        out.add(name, "counter" if name.endswith("_total") else "gauge", value)
    totals = {key: float((closed_totals or {}).get(key, 0.0)) for key in SESSION_COUNTERS}
    per_session = _Families()
    histograms = _Families()
    for snap in sessions:
        label = _label(str(snap["session"]))
        labels = f'{{session="{label}"}}'
        for key, (name, kind) in TRANSPORT.items():
            if key in snap:
                per_session.add(name, kind, float(snap[key]), labels)
        metrics = snap.get("session_metrics", {})
        for key, value in sorted(metrics.items()):
            if key.startswith("latency_le_") or key in ("latency_count", "latency_sum_ms"):
                continue
            if key in SESSION_COUNTERS:
                per_session.add(f"session_{metric_name(key)}_total", "counter", value, labels)
            else:
                per_session.add(f"session_{metric_name(key)}", "gauge", value, labels)
        _histogram(histograms, label, metrics)
        for key, value in session_totals(snap).items():
            totals[key] += value
    for key, value in totals.items():
        out.add(f"{metric_name(key)}_total", "counter", value)
    for key, value in sorted((worker or {}).items()):
        if key in WORKER_COUNTERS:
            out.add(f"{metric_name(key)}_total", "counter", value)
        else:
            out.add(metric_name(key), "gauge", value)
    return "\n".join(out.text() + per_session.text() + histograms.text()) + "\n"
