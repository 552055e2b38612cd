"""The weight-free mesh tracker measures the motion that classic mode rendered, on a real photo.

A clip of ``skimage.data.astronaut()`` is rendered (192 px) with a known classic motion (lips 1.6x, head sway 2.5x);
the extracted expression and pose are compared with the motion that drove the renderer. Measured: lower lip
(keypoint 17) slope 0.98, chin (19) 1.16, below the lower lip (20) 1.03, correlations 0.988-0.999; roll slope 0.94
(correlation 0.993), tx slope 1.01 (0.999). The bounds below leave room for codec and platform differences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.audio.pcm import SAMPLE_RATE
from engine.avatar.face import haar_cascade_path
from engine.avatar.prepare import prepare_avatar
from engine.motion.classic import ClassicFeatures
from engine.render.classic import ClassicRenderer, face_size
from engine.train.extract import extract_clip
from engine.train.samples import clip_data, rest_expression
from streaming.measure.planted import PHRASES, PlantedStyle, render_clip, small_avatar, speech

pytestmark = pytest.mark.skipif(haar_cascade_path() is None, reason="installed OpenCV ships no Haar cascades")
SIZE = 192


def test_tracker_recovers_rendered_motion(tmp_path: Path) -> None:
    data = pytest.importorskip("skimage.data")
    Image.fromarray(np.asarray(data.astronaut(), np.uint8)).save(tmp_path / "a.png")
    avatar = prepare_avatar(tmp_path / "a.png", "astro")
    audio = speech(PHRASES[0])[: SAMPLE_RATE * 3]
    style = PlantedStyle(lip_scale=1.6, head_motion=2.5, seed=0)
    render_clip(tmp_path / "clip.mp4", avatar, audio, style, size=SIZE)
    record = extract_clip(tmp_path / "clip.mp4")
    assert record.meta["valid_fraction"] > 0.95
    clip = clip_data(record.arrays, "mesh", {"id": "clip"})
    # the motion that drove the renderer, in eye distances
    source = ClassicRenderer(size=SIZE).prepare(small_avatar(avatar, SIZE)).source
    fs = face_size(source)
    motion = style.motion(fs)
    features = ClassicFeatures()
    frames = motion.push(np.concatenate([features.push(audio), features.flush()])) + motion.flush()
    truth = np.stack([f.params.exp[0, :, :2].numpy() for f in frames]) / fs
    n = min(len(truth), clip.frames)
    measured = (clip.expr - rest_expression(clip))[:n, :, :2]
    for k, (lo, hi) in {17: (0.8, 1.3), 19: (0.8, 1.4), 20: (0.8, 1.25)}.items():
        t, m = truth[:n, k, 1], measured[:, k, 1]
        slope = np.polyfit(t, m, 1)[0]
        assert np.corrcoef(t, m)[0, 1] > 0.95 and lo < slope < hi, (k, slope)
    roll = np.array([float(f.params.roll[0]) for f in frames])[:n]
    tx = np.array([float(f.params.t[0, 0]) for f in frames])[:n] / fs
    assert np.corrcoef(roll, clip.pose[:n, 2])[0, 1] > 0.95
    assert np.corrcoef(tx, clip.pose[:n, 3])[0, 1] > 0.9
    assert 0.7 < np.polyfit(roll, clip.pose[:n, 2], 1)[0] < 1.2
