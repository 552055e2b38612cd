"""Audio front end: PCM validation, streaming resampling, log-mel / loudness features (chunked == whole)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.audio import (
    ConcatFeatures,
    LogMelConfig,
    LogMelFeatures,
    LoudnessFeatures,
    StreamingResampler,
    frame_loudness_db,
    log_mel_offline,
    mel_filterbank,
    to_mono_16k,
)


def _chunks(n: int, rng: np.random.Generator, hi: int) -> list[tuple[int, int]]:
    out, i = [], 0
    while i < n:
        k = int(rng.integers(0, hi))  # zero-length pushes included on purpose
        out.append((i, min(n, i + k)))
        i += k
    return out


def _speechlike(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return ((np.sin(2 * np.pi * 220 * t) * 0.3 + rng.standard_normal(n) * 0.05) * env).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000, 96000])
def test_resampler_chunked_equals_whole_and_length(rate: int) -> None:
    rng = np.random.default_rng(rate)
    x = (rng.standard_normal((rate * 2 + 17, 2)) * 3000).astype(np.int16)
    whole = to_mono_16k(x, rate)
    assert whole.dtype == np.float32 and abs(whole.shape[0] - round((rate * 2 + 17) * 16000 / rate)) <= 1
    rs = StreamingResampler()
    parts = [rs.push(x[a:b], rate) for a, b in _chunks(x.shape[0], rng, rate // 5)]
    streamed = np.concatenate([*parts, rs.flush()])
    np.testing.assert_array_equal(streamed, whole)


def test_dtypes_scale_and_downmix() -> None:
    ramp = np.linspace(-0.5, 0.5, 1600)
    ref = to_mono_16k(ramp.astype(np.float64), 16000)
    for pcm in (
        (ramp * 32768).astype(np.int16),
        (ramp * 2147483648).astype(np.int32),
        ramp.astype(np.float32),
        np.stack([ramp, ramp], 1).astype(np.float32),
    ):
        np.testing.assert_allclose(to_mono_16k(pcm, 16000), ref, atol=1e-4)
    stereo = np.stack([np.full(800, 0.2), np.full(800, -0.6)], 1).astype(np.float32)
    np.testing.assert_allclose(to_mono_16k(stereo, 16000), -0.2, atol=1e-6)


@pytest.mark.parametrize(
    ("pcm", "rate", "match"),
    [
        (np.array([0.0, np.nan], np.float32), 16000, "NaN"),
        (np.array([0.0, np.inf]), 16000, "NaN or infinite"),
        (np.zeros(10, np.uint8), 16000, "dtype"),
        (np.zeros(10, np.complex64), 16000, "dtype"),
        (np.array(0.5, np.float32), 16000, "0-d"),
        (np.float32(0.5), 16000, "numpy array"),
        (np.zeros((2, 2, 2), np.float32), 16000, "3-d"),
        (np.zeros((10, 64), np.float32), 16000, "channels"),
        (np.zeros(16000 * 61, np.float32), 16000, "longer than 60 s"),
        (np.zeros(10, np.float32), 4000, "outside the supported range"),
        (np.zeros(10, np.float32), 16000.0, "integer"),
    ],
)
def test_bad_pcm_rejected(pcm: np.ndarray, rate: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        to_mono_16k(pcm, rate)


def test_whole_file_may_exceed_push_limit() -> None:
    assert to_mono_16k(np.zeros(16000 * 61, np.float32), 16000, max_seconds=None).shape == (16000 * 61,)


def test_rate_change_mid_stream_keeps_audio() -> None:
    rs = StreamingResampler()
    a = rs.push(np.zeros(4800, np.float32), 48000)
    b = rs.push(np.zeros(1600, np.float32), 16000)  # tail of the 48 kHz stream comes first
    assert a.shape[0] + b.shape[0] == 1600 + 1600 and rs.input_rate == 16000


def test_mel_filterbank_shape_and_coverage() -> None:
    fb = mel_filterbank(16000, 512, 80, 20.0, 7600.0)
    assert fb.shape == (80, 257) and np.all(fb >= 0)
    freqs = np.linspace(0, 8000, 257)
    peaks = freqs[fb.argmax(axis=1)]
    assert np.all(np.diff(peaks) >= 0) and peaks[0] < 100 and peaks[-1] > 7000
    # every filter has (almost) the same area: wide high bands do not dominate
    areas = fb.sum(axis=1) * (freqs[1] - freqs[0])
    assert np.all(areas[5:] > 0.7) and np.all(areas[5:] < 1.3)


@pytest.mark.parametrize("seed", range(5))
def test_log_mel_random_chunking_bitwise_equal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 16000 * 3))
    x = _speechlike(n, seed)
    whole = log_mel_offline(x)
    assert whole.shape == (math.ceil(n / 16000 * 25), 81)
    stage = LogMelFeatures()
    parts = [stage.push(x[a:b]) for a, b in _chunks(n, rng, int(rng.choice([7, 700, 5000])))]
    streamed = np.concatenate([*parts, stage.flush()])
    np.testing.assert_array_equal(streamed, whole)
    # rows are released as soon as their 120-sample lookahead is there, never before
    stage.reset()
    assert stage.push(x[: 640 + 119]).shape[0] == 0
    assert stage.push(x[640 + 119 : 640 + 120]).shape[0] == 1 or n < 760


def test_log_mel_content() -> None:
    cfg = LogMelConfig()
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    feats = log_mel_offline(tone, cfg)
    fb = mel_filterbank(16000, 512, 80, 20.0, 7600.0)
    peak_bin = int(np.argmin(np.abs(np.linspace(0, 8000, 257) - 1000)))
    assert abs(int(np.median(feats[2:-2, :80].argmax(axis=1))) - int(fb[:, peak_bin].argmax())) <= 1
    # loudness column: -9.03 dB for a 0.5-amplitude sine (RMS 0.3536)
    np.testing.assert_allclose(feats[2:-2, 80], 20 * np.log10(0.5 / np.sqrt(2)), atol=0.05)
    silent = log_mel_offline(np.zeros(3200, np.float32), cfg)
    np.testing.assert_array_equal(silent, np.tile(LogMelFeatures(cfg).silence(), (5, 1)))


def test_loudness_stage_matches_log_mel_column_and_concat() -> None:
    rng = np.random.default_rng(3)
    x = _speechlike(16000 + 333, 3)
    mel = log_mel_offline(x)
    np.testing.assert_allclose(frame_loudness_db(x), mel[:, 80], atol=1e-5)
    cat = ConcatFeatures(LogMelFeatures(LogMelConfig(loudness=False)), LoudnessFeatures())
    assert cat.dim == 81
    parts = [cat.push(x[a:b]) for a, b in _chunks(x.shape[0], rng, 900)]
    out = np.concatenate([*parts, cat.flush()])
    np.testing.assert_allclose(out, mel, atol=1e-5)


def test_feature_stage_rejects_bad_input() -> None:
    stage = LogMelFeatures()
    with pytest.raises(ValueError, match="mono"):
        stage.push(np.zeros((10, 2), np.float32))
    with pytest.raises(ValueError, match="float32"):
        stage.push(np.zeros(10, np.int16))
    with pytest.raises(ValueError, match="NaN"):
        stage.push(np.array([np.nan], np.float32))
    with pytest.raises(ValueError, match="multiple"):
        LogMelConfig(fps=7)
