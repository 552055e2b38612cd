"""Prometheus text exposition of the server's sessions (no client library needed for a handful of gauges)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(raw: str) -> str:
    name = _NAME_RE.sub("_", raw).strip("_").lower()
    return name if name and not name[0].isdigit() else f"m_{name}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "NaN"
    return repr(float(value))


def render_metrics(server: dict[str, float], sessions: Iterable[dict[str, Any]]) -> str:
    """``server``: name -> value (counters end in ``_total``); ``sessions``: Peer.snapshot() dicts."""
    lines: list[str] = []
    for name, value in sorted(server.items()):
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# TYPE avatar_{name} {kind}", f"avatar_{name} {_fmt(value)}"]
    per_session: dict[str, list[str]] = {}
    transport = {
        "fps": ("video_fps", "gauge"),
        "latency_ms": ("latency_ms", "gauge"),
        "send_latency_ms": ("video_send_latency_ms", "gauge"),
        "video_sent": ("video_frames_sent_total", "counter"),
        "video_dropped": ("video_frames_dropped_total", "counter"),
        "audio_frames_sent": ("audio_frames_sent_total", "counter"),
        "audio_late_samples": ("audio_late_samples_total", "counter"),
        "mic_frames": ("mic_frames_total", "counter"),
        "clock_resyncs": ("clock_resyncs_total", "counter"),
    }
    types: dict[str, str] = {}
    for snap in sessions:
        label = f'{{session="{_label(str(snap["session"]))}"}}'
        for key, (name, kind) in transport.items():
            types[name] = kind
            per_session.setdefault(name, []).append(f"avatar_{name}{label} {_fmt(snap[key])}")
        for key, value in snap.get("session_metrics", {}).items():
            name = f"session_{metric_name(key)}"
            types[name] = "gauge"
            per_session.setdefault(name, []).append(f"avatar_{name}{label} {_fmt(value)}")
    for name in sorted(per_session):
        lines.append(f"# TYPE avatar_{name} {types[name]}")
        lines += per_session[name]
    return "\n".join(lines) + "\n"
