"""The keypoints space: LivePortrait's motion extractor on each tracked crop (the tiny preset with deterministic
random weights stands in for imported ones: the values are noise, the plumbing is real), and the personal model
learned from it driving the neural renderer through the runtime."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.avatar.face import haar_cascade_path
from engine.avatar.prepare import prepare_avatar
from engine.avatar.store import AvatarStore
from engine.models import liveportrait
from engine.train.extract import ExtractConfig, KeypointExtractor, extract_clip
from engine.train.personalize import FitConfig, fit_personal, with_space
from engine.train.samples import clip_data
from streaming.measure.planted import PlantedStyle, render_clip, speech
from streaming.pipelines import PipelineError, RuntimeConfig
from streaming.runtime import Runtime

pytestmark = pytest.mark.skipif(haar_cascade_path() is None, reason="installed OpenCV ships no Haar cascades")


def test_keypoint_space_extraction_and_neural_personal_motion(tmp_path: Path) -> None:
    data = pytest.importorskip("skimage.data")
    Image.fromarray(np.asarray(data.astronaut(), np.uint8)).save(tmp_path / "a.png")
    avatar = AvatarStore().add(prepare_avatar(tmp_path / "a.png", "astro"))
    audio = speech("One two three four five six.")[: 16000 * 2]
    render_clip(tmp_path / "c.mp4", avatar, audio, PlantedStyle(), size=192)
    nets = liveportrait.build("tiny")
    record = extract_clip(
        tmp_path / "c.mp4", ExtractConfig(spaces=("mesh", "keypoints")), keypoints=KeypointExtractor(nets)
    )
    n = record.meta["frames"]
    assert record.meta["untrained_extractor"] is True
    shapes = {k: v.shape for k, v in record.arrays.items() if k.startswith("keypoints/")}
    assert shapes == {
        "keypoints/motion": (n, 265),
        "keypoints/pose": (n, 7),
        "keypoints/expr": (n, 21, 3),
        "keypoints/head": (n, 21, 3),
        "keypoints/kp": (n, 21, 3),
        "keypoints/geometry": (21, 3),
    }
    assert all(np.isfinite(v).all() for v in record.arrays.values())
    clip = clip_data(record.arrays, "keypoints", {"id": "c"})
    model, _ = fit_personal([clip], with_space(FitConfig(steps=20), "keypoints"))
    assert model.config.space == "keypoints"

    async def run() -> int:
        runtime = Runtime.create(RuntimeConfig(mode="neural", motion="personal"))
        try:
            with pytest.raises(PipelineError, match="no personal motion model for the neural renderer"):
                await runtime.open_session("astro")  # it has none for this space yet
            AvatarStore().save_personal("astro", "keypoints", model.save)
            offline = dataclasses.replace(runtime.config.session, realtime=False)  # every frame, however slow
            session = await runtime.open_session("astro", config=offline)
            session.push_audio(audio[:8000], 16000)
            session.end_of_stream()
            count = 0
            while (frame := await session.next_video()) is not None:
                assert frame.rgb.shape[2] == 3
                count += 1
            await runtime.close_session(session)
            return count
        finally:
            await runtime.aclose()

    assert asyncio.run(run()) == 13  # 0.5 s at 25 fps
