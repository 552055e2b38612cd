"""``engine render`` end to end: a playable mp4 with the right streams, frame count and durations; clear errors
that leave no file behind."""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest
from click.testing import CliRunner, Result

from engine.avatar.default import default_portrait
from engine.media import MediaError, VideoWriter, read_audio
from streaming.cli import main

SR = 16_000


def write_wav(path: Path, seconds: float, rate: int = SR, channels: int = 1, width: int = 2) -> np.ndarray:
    """A voiced-ish test signal as PCM WAV; returns the float samples (first channel)."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    scale = {2: 32767, 4: 2**31 - 1}[width]
    pcm = (x * scale).astype({2: "<i2", 4: "<i4"}[width])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(np.repeat(pcm[:, None], channels, axis=1).tobytes())
    return x.astype(np.float32)


def probe(path: Path) -> dict[str, Any]:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0]
        assert v.duration is not None and v.time_base is not None and v.average_rate is not None
        assert a.duration is not None and a.time_base is not None
        info: dict[str, Any] = {
            "video_codec": v.codec_context.name,
            "audio_codec": a.codec_context.name,
            "width": v.codec_context.width,
            "fps": float(v.average_rate),
            "video_s": float(v.duration * v.time_base),
            "audio_s": float(a.duration * a.time_base),
            "audio_rate": a.codec_context.sample_rate,
        }
        info["frames"] = sum(1 for _ in c.decode(video=0))
    return info


def run(args: list[str]) -> Result:
    return CliRunner().invoke(main, ["render", "--no-progress", *args], catch_exceptions=False)


def leftovers(directory: Path) -> list[str]:
    """What is in ``directory`` (the test's isolated engine home, which holds the default avatar, aside)."""
    return sorted(p.name for p in directory.iterdir() if p.name != "engine-home")


@pytest.mark.parametrize("seconds", [0.5])
def test_render_default_avatar_neural_tiny(tmp_path: Path, seconds: float) -> None:
    wav = tmp_path / "voice.wav"
    write_wav(wav, seconds, rate=22_050, channels=2)
    out = tmp_path / "out" / "talk.mp4"
    out.parent.mkdir()
    result = run(["--audio", str(wav), "--out", str(out), "--mode", "neural", "--emotion", "happy"])
    assert result.exit_code == 0, result.output
    assert "untrained renderer weights" in result.output  # random weights are announced
    info = probe(out)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert info["frames"] == math.ceil(seconds * 25)
    assert info["fps"] == 25
    assert info["video_s"] == pytest.approx(seconds, abs=0.041)
    assert info["audio_s"] == pytest.approx(seconds, abs=0.07)  # AAC frames are 64 ms
    assert leftovers(out.parent) == ["talk.mp4"]  # no temporary file left


def test_render_default_mode_is_classic(tmp_path: Path) -> None:
    # no imported weights: the default (auto) mode is the weight-free classic path, with the default avatar
    wav = tmp_path / "voice.wav"
    write_wav(wav, 1.1)
    out = tmp_path / "talk.mp4"
    result = run(["--audio", str(wav), "--out", str(out), "--emotion", "happy", "--intensity", "0.8"])
    assert result.exit_code == 0, result.output
    assert "untrained" not in result.output.lower()
    info = probe(out)
    assert info["frames"] == math.ceil(1.1 * 25) and info["width"] == 512
    assert info["video_s"] == pytest.approx(1.1, abs=0.041)
    assert info["audio_s"] == pytest.approx(1.1, abs=0.07)
    # a bad control is a clear error and leaves nothing behind
    bad = tmp_path / "bad.mp4"
    result = run(["--audio", str(wav), "--out", str(bad), "--emotion", "furious"])
    assert result.exit_code != 0 and "furious" in result.output
    assert not bad.exists() and leftovers(tmp_path) == ["talk.mp4", "voice.wav"]


def test_render_from_image(tmp_path: Path) -> None:
    img, _, _ = default_portrait()
    photo = np.full((700, 600, 3), 200, np.uint8)
    photo[100:612, 44:556] = img
    image = tmp_path / "me.png"
    cv2.imwrite(str(image), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    wav = tmp_path / "v.wav"
    write_wav(wav, 0.3)
    out = tmp_path / "me.mp4"
    result = run(["--image", str(image), "--audio", str(wav), "--out", str(out), "--mode", "neural", "--fps", "25"])
    assert result.exit_code == 0, result.output
    info = probe(out)
    assert info["frames"] == math.ceil(0.3 * 25)


def test_missing_audio_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "x.mp4"
    result = run(["--audio", str(tmp_path / "nope.wav"), "--out", str(out), "--mode", "neural"])
    assert result.exit_code != 0
    assert "nope.wav" in result.output and "not found" in result.output
    assert leftovers(tmp_path) == []


def test_unreadable_audio_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    result = run(["--audio", str(bad), "--out", str(tmp_path / "x.mp4"), "--mode", "neural"])
    assert result.exit_code != 0
    assert "noise.wav" in result.output and "cannot decode audio" in result.output
    assert leftovers(tmp_path) == ["noise.wav"]


def test_bad_image_leaves_no_file(tmp_path: Path) -> None:
    wav = tmp_path / "v.wav"
    write_wav(wav, 0.2)
    image = tmp_path / "face.png"
    image.write_bytes(b"not a png")
    out = tmp_path / "x.mp4"
    result = run(["--image", str(image), "--audio", str(wav), "--out", str(out), "--mode", "neural"])
    assert result.exit_code != 0
    assert "face.png" in result.output
    assert leftovers(tmp_path) == ["face.png", "v.wav"]


def test_unwritable_output_directory(tmp_path: Path) -> None:
    wav = tmp_path / "v.wav"
    write_wav(wav, 0.2)
    result = run(["--audio", str(wav), "--out", str(tmp_path / "missing" / "x.mp4"), "--mode", "neural"])
    assert result.exit_code != 0 and "does not exist" in result.output
    result = run(["--audio", str(wav), "--out", str(tmp_path), "--mode", "neural"])
    assert result.exit_code != 0 and "is a directory" in result.output
    # a directory nobody may write into (root ignores permission bits: /proc refuses new files even to root)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        target = locked if not os.access(locked, os.W_OK) else Path("/proc")
        result = run(["--audio", str(wav), "--out", str(target / "x.mp4"), "--mode", "neural"])
        assert result.exit_code != 0 and "not writable" in result.output
        assert not (target / "x.mp4").exists()
    finally:
        locked.chmod(0o700)
    assert leftovers(locked) == []


def test_avatar_and_image_together_is_a_usage_error(tmp_path: Path) -> None:
    result = run(["--avatar", "a", "--image", "b.png", "--audio", "c.wav", "--out", str(tmp_path / "x.mp4")])
    assert result.exit_code != 0 and "either --avatar or --image" in result.output


def test_writer_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(out, 25, 16) as w:
        w.video(np.zeros((16, 16, 3), np.uint8))
        raise RuntimeError("boom")
    assert leftovers(tmp_path) == []


def test_read_audio_formats(tmp_path: Path) -> None:
    x = write_wav(tmp_path / "a.wav", 0.5, rate=SR, width=4)
    np.testing.assert_allclose(read_audio(tmp_path / "a.wav"), x, atol=1e-6)
    y = read_audio(_write_wav_48k(tmp_path / "b.wav"))
    assert abs(y.size - SR // 2) <= 2
    with pytest.raises(MediaError, match="empty"):
        write_wav(tmp_path / "c.wav", 0.0)
        read_audio(tmp_path / "c.wav")


def _write_wav_48k(path: Path) -> Path:
    write_wav(path, 0.5, rate=48_000, channels=2)
    return path


def test_input_rate_and_channels_are_kept(tmp_path: Path) -> None:
    """48 kHz stereo in, 48 kHz stereo AAC out (the session itself runs on 16 kHz mono)."""
    wav = tmp_path / "in.wav"
    write_wav(wav, 1.0, rate=48_000, channels=2)
    out = tmp_path / "talk.mp4"
    result = run(["--audio", str(wav), "--out", str(out), "--no-paste-back"])
    assert result.exit_code == 0, result.output
    info = probe(out)
    assert info["audio_rate"] == 48_000 and info["frames"] == 25
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.channels == 2
    assert abs(info["audio_s"] - 1.0) < 0.05


def test_output_extension_is_honoured_or_refused(tmp_path: Path) -> None:
    wav = tmp_path / "in.wav"
    write_wav(wav, 0.4)
    result = run(["--audio", str(wav), "--out", str(tmp_path / "talk.avi")])
    assert result.exit_code != 0 and "cannot write .avi" in result.output and ".mp4, .mov, .mkv" in result.output
    assert not list(tmp_path.glob("*talk*"))
    result = run(["--audio", str(wav), "--out", str(tmp_path / "talk.mov"), "--no-paste-back"])
    assert result.exit_code == 0, result.output
    with av.open(str(tmp_path / "talk.mov")) as c:
        assert "mov" in c.format.name


def test_output_permissions_follow_the_umask(tmp_path: Path) -> None:
    wav = tmp_path / "in.wav"
    write_wav(wav, 0.4)
    previous = os.umask(0o022)
    try:
        result = run(["--audio", str(wav), "--out", str(tmp_path / "talk.mp4"), "--no-paste-back"])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "talk.mp4").stat().st_mode & 0o777 == 0o644


def test_empty_audio_file_is_one_clear_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    result = run(["--audio", str(empty), "--out", str(tmp_path / "talk.mp4")])
    assert result.exit_code != 0
    assert f"{empty}: the file is empty (0 bytes)" in result.output and "Errno" not in result.output


ENGINE = [sys.executable, "-m", "streaming.cli"]


def test_sigterm_during_a_render_leaves_no_partial_file(tmp_path: Path, engine_home: Path) -> None:
    wav = tmp_path / "long.wav"
    write_wav(wav, 60.0)
    out = tmp_path / "talk.mp4"
    env = {**os.environ, "AVATAR_ENGINE_HOME": str(engine_home)}
    subprocess.run([*ENGINE, "avatar", "show", "default"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        [*ENGINE, "render", "--no-progress", "--audio", str(wav), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".talk-*.part")):  # the render has started writing
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "render stopped by SIGTERM; nothing was written" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir() if p != engine_home) == ["long.wav"]


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # a "disk" with 60 kB of room for a file
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past it fail with EFBIG instead of killing us


def test_output_that_does_not_fit_is_one_clear_line(tmp_path: Path, engine_home: Path) -> None:
    wav = tmp_path / "in.wav"
    write_wav(wav, 3.0)
    out = tmp_path / "talk.mp4"
    env = {**os.environ, "AVATAR_ENGINE_HOME": str(engine_home)}
    # the default avatar is stored on first use: store it now, so only the video meets the limit
    subprocess.run([*ENGINE, "avatar", "show", "default"], env=env, check=True, capture_output=True)
    done = subprocess.run(
        [*ENGINE, "render", "--no-progress", "--audio", str(wav), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limit_file_size,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "does not fit on the disk" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p != engine_home) == ["in.wav"]


def _rss_mb_while_rendering(wav: Path, out: Path, env: dict[str, str]) -> float:
    """Median resident memory of ``engine render`` over 4 s after it started writing the video (then it is
    stopped). Transient tensors make single readings jump by ~100 MB; the median is steady."""
    proc = subprocess.Popen(
        [*ENGINE, "render", "--no-progress", "--audio", str(wav), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.parent.glob(f".{out.stem}-*.part")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        readings = []
        for _ in range(20):
            time.sleep(0.2)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            readings.append(float(next(line.split()[1] for line in status.splitlines() if line[:6] == "VmRSS:")))
        rss = float(np.median(readings)) / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return rss


@pytest.mark.slow
def test_render_memory_does_not_grow_with_the_input(tmp_path: Path, engine_home: Path) -> None:
    """A 10-minute 48 kHz stereo input costs the render no more memory than a 20-second one: the file is read,
    rendered and encoded a second at a time (reading it whole cost ~300 MB more: 230 MB as float32 alone)."""
    env = {**os.environ, "AVATAR_ENGINE_HOME": str(engine_home)}
    subprocess.run([*ENGINE, "avatar", "show", "default"], env=env, check=True, capture_output=True)
    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    write_wav(short, 20.0, rate=48_000, channels=2)
    with wave.open(str(long), "wb") as w:  # written a minute at a time: the test itself stays small
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(48_000)
        t = np.arange(60 * 48_000) / 48_000
        minute = (0.3 * np.sin(2 * np.pi * 180 * t) * 32767).astype("<i2")
        for _ in range(10):
            w.writeframes(np.repeat(minute[:, None], 2, axis=1).tobytes())
    rss_short = _rss_mb_while_rendering(short, tmp_path / "a.mp4", env)
    rss_long = _rss_mb_while_rendering(long, tmp_path / "b.mp4", env)
    print(f"\nRSS while rendering: 20 s input {rss_short:.0f} MB, 10 min input {rss_long:.0f} MB")
    assert rss_long - rss_short < 120.0
