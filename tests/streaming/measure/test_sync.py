"""The lip-sync instrument measures the classic path at 0 +- 1 frame, and finds a deliberate shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.avatar.default import default_avatar
from engine.motion.classic import ClassicFeatures, ClassicMotion
from engine.render.classic import ClassicRenderer, face_size
from streaming.measure import sync as lipsync

FPS = 25


@pytest.fixture(scope="module")
def rendered() -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    audio, bursts = lipsync.sync_signal(5.0, seed=2)
    assert len(bursts) >= 5
    features = ClassicFeatures(fps=FPS)
    rows = np.concatenate([features.push(audio), features.flush()])
    renderer = ClassicRenderer(flow_size=96)
    avatar = default_avatar()
    prepared = renderer.prepare(avatar)
    motion = ClassicMotion(face_size=face_size(prepared.source))
    frames = motion.push(rows) + motion.flush()
    assert len(frames) == len(rows)
    chunks = []
    for i in range(0, len(frames), 16):
        kp = torch.cat([renderer.drive(prepared, f.params) for f in frames[i : i + 16]])
        chunks.append(renderer.render([prepared] * kp.shape[0], kp))
    video = (torch.cat(chunks).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    assert avatar.landmarks is not None
    return video, audio, lipsync.mouth_box(avatar.landmarks)


def test_classic_path_is_in_sync(rendered: tuple) -> None:
    video, audio, box = rendered
    envelope = lipsync.audio_envelope(audio, FPS, len(video))
    result = lipsync.estimate_offset(lipsync.mouth_opening(video, box), envelope, FPS)
    assert result.correlation > 0.6
    assert abs(result.offset_frames) <= 1.0
    assert result.jitter_ms < 40.0


@pytest.mark.parametrize("shift", [3, -2])
def test_shifted_video_is_detected(rendered: tuple, shift: int) -> None:
    video, audio, box = rendered
    shifted = np.roll(video, shift, axis=0)
    envelope = lipsync.audio_envelope(audio, FPS, len(video))
    result = lipsync.estimate_offset(lipsync.mouth_opening(shifted, box), envelope, FPS)
    assert abs(result.offset_frames - shift) <= 1.0
    assert result.offset_ms == pytest.approx(result.offset_frames * 1000 / FPS)


def test_signal_is_seeded_and_envelope_aligned() -> None:
    a, bursts = lipsync.sync_signal(3.0, seed=5)
    b, _ = lipsync.sync_signal(3.0, seed=5)
    np.testing.assert_array_equal(a, b)
    env = lipsync.audio_envelope(a, FPS)
    start = int(np.ceil(bursts[0][0] * FPS))
    assert env[start + 1] > 0.1 and env[int(bursts[0][0] * FPS) - 1] == 0.0
    with pytest.raises(ValueError, match="frames"):
        lipsync.mouth_opening(np.zeros((4, 8, 8)), (0, 0, 4, 4))
