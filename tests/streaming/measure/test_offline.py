"""Issue 8, offline: the sync signal through the real ``engine render`` (empty engine home: classic mode, default
avatar) into an mp4, decoded with PyAV; the mouth follows the sound within one frame, and a shifted picture is
caught."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from streaming.cli import main
from streaming.measure import sync as lipsync
from streaming.measure.live import FPS, DecodedMp4, SyncError, decode_mp4, timed_offset, write_wav
from streaming.pipelines import CLASSIC_BANNER

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[DecodedMp4, str]:
    # module scope: the autouse home fixture is per test, so give this render its own empty home
    tmp = tmp_path_factory.mktemp("sync_offline")
    audio, bursts = lipsync.sync_signal(6.0, seed=3)
    assert len(bursts) >= 6
    wav, mp4 = tmp / "sync.wav", tmp / "sync.mp4"
    write_wav(wav, audio, lipsync.SAMPLE_RATE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AVATAR_ENGINE_HOME", str(tmp / "home"))
        result = CliRunner().invoke(main, ["render", "--audio", str(wav), "--out", str(mp4), "--no-progress"])
    assert result.exit_code == 0, result.output
    return decode_mp4(mp4), result.output


def test_first_render_says_classic_mode(rendered: tuple[DecodedMp4, str]) -> None:
    decoded, output = rendered
    assert CLASSIC_BANNER in output
    assert len(decoded.video_t) == 6 * FPS
    assert decoded.rate in (16_000, 44_100, 48_000) and abs(decoded.audio.size / decoded.rate - 6.0) < 0.1


def test_rendered_mp4_is_in_sync(rendered: tuple[DecodedMp4, str]) -> None:
    d = rendered[0]
    found = timed_offset(d.video_t, d.opening, d.audio, d.rate, d.audio_t0)
    print(f"\noffline engine render: offset {found.offset_ms:+.1f} ms, corr {found.correlation:.3f}")
    assert found.correlation > 0.6
    assert abs(found.offset_ms) <= 1000.0 / FPS  # 0 +- 1 frame
    assert found.jitter_ms < 1000.0 / FPS


@pytest.mark.parametrize("shift", [3, -2])
def test_shifted_picture_is_measured(rendered: tuple[DecodedMp4, str], shift: int) -> None:
    d = rendered[0]
    # the same decoded frames, presented `shift` frames later (or earlier)
    found = timed_offset(d.video_t + shift / FPS, d.opening, d.audio, d.rate, d.audio_t0)
    assert abs(found.offset_frames - shift) <= 1.0
    # reordering the frames destroys the correlation the in-sync result rests on
    rng = np.random.default_rng(0)
    scrambled = timed_offset(d.video_t, rng.permutation(d.opening), d.audio, d.rate, d.audio_t0)
    assert scrambled.correlation < 0.4


def test_too_little_to_measure_is_an_error() -> None:
    with pytest.raises(SyncError, match="too little"):
        timed_offset(np.arange(10) / FPS, np.zeros(10), np.zeros(16_000), 16_000, 0.0)
    with pytest.raises(SyncError, match="overlap"):
        timed_offset(np.arange(100) / FPS, np.zeros(100), np.zeros(16_000), 16_000, 3.5)


def test_bench_sync_prints_json() -> None:
    result = CliRunner().invoke(main, ["bench", "sync", "--mode", "offline", "--seconds", "5"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    found = report["results"]["offline"]
    assert report["benchmark"] == "lipsync" and report["commit"] and report["device"]
    assert report["config"]["modes"] == ["offline"] and report["config"]["signal_seconds"] == 5.0
    assert abs(found["offset_ms"]) <= 40.0 and found["correlation"] > 0.6 and found["jitter_ms"] >= 0.0
    assert found["notes"]["render_said"] == [CLASSIC_BANNER]
    bad = CliRunner().invoke(main, ["bench", "sync", "--mode", "sideways"])
    assert bad.exit_code == 2 and "sideways" in bad.output
