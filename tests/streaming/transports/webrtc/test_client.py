"""The client's measurements and file handling, without a server."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from streaming.transports.webrtc.client import ClientError, estimate_av_offset, read_wav


@pytest.mark.parametrize("lag_ms", [-120, 0, 80, 200])
def test_av_offset_finds_a_known_lag(lag_ms: int) -> None:
    rng = np.random.default_rng(0)
    audio_t = np.arange(0, 12, 0.02)  # 20 ms audio packets
    gate = np.zeros_like(audio_t)
    pos = 0.2
    while pos < 12:  # bursts of random length and spacing
        on = rng.uniform(0.15, 0.5)
        gate[(audio_t >= pos) & (audio_t < pos + on)] = 1.0
        pos += on + rng.uniform(0.2, 0.6)
    env = 0.3 * gate + 0.01 * rng.random(audio_t.size)
    # the picture changes when the loudness changes, lag_ms later, sampled at 25 fps with arrival jitter
    video_t = np.arange(0, 12, 0.04) + rng.uniform(0, 0.005, 300)
    shown = np.interp(video_t - lag_ms / 1000.0, audio_t, gate)
    activity = np.abs(np.diff(shown, prepend=shown[0])) + 0.01 * rng.random(video_t.size)
    found = estimate_av_offset(video_t, activity, audio_t, env)
    assert found is not None
    offset, corr = found
    assert abs(offset * 1000 - lag_ms) <= 30 and corr > 0.3


def test_av_offset_needs_enough_data() -> None:
    t = np.arange(5) * 0.04
    assert estimate_av_offset(t, np.ones(5), t, np.ones(5)) is None


def test_read_wav(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(44_100)
        out.writeframes(np.array([[16384, -16384]] * 10, "<i2").tobytes())
    pcm, rate = read_wav(path)
    assert rate == 44_100 and pcm.shape == (10, 2) and np.allclose(pcm[0], [0.5, -0.5])
    with wave.open(str(tmp_path / "b.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(8000)
        out.writeframes(b"\x80" * 10)
    with pytest.raises(ClientError, match="16-bit"):
        read_wav(tmp_path / "b.wav")
    with pytest.raises(ClientError, match="cannot read"):
        read_wav(tmp_path / "missing.wav")
