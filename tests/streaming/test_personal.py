"""The personalized motion generator through the runtime, and EP-Talk's use case end to end on rendered clips.

Fast: a personal model learned (on a CPU, in seconds) from the classic motion of a held-out voice drives the
astronaut through ``Runtime`` exactly as ``engine render`` / ``engine serve`` build it (``RuntimeConfig(motion=
"personal")``): the rendered mouth opens with the audio (the lip-sync instrument finds it within a frame, the
correlation well above chance), an avatar without a personal model is refused with the command that makes one.

Slow (``-m slow``): clips rendered by classic mode with a planted style (lips 1.6x, head sway 2.5x) ->
``engine personalize`` (video decoding, mesh tracking, fitting) -> the learned generator's lip amplitude is 1.6x
the default classic generator's within 15 %, its head-motion statistics match the clips' within 25 %, and an
untrained model is outside both bounds. Measured: lip slope 1.65; head std (roll, tx, ty) 1.02 deg, 0.035, 0.016
against the clips' 0.93 deg, 0.033, 0.019; the untrained model: slope 12.3, head 7.0 deg, 0.34, 0.62.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.audio.features import log_mel_offline
from engine.avatar.face import haar_cascade_path
from engine.avatar.prepare import prepare_avatar
from engine.avatar.record import Avatar
from engine.avatar.store import AvatarStore
from engine.motion.classic import ClassicFeatures, ClassicMotion, ClassicMotionConfig
from engine.motion.personal import canonical_keypoints
from engine.motion.personal_model import PersonalConfig, PersonalModel, untrained_model
from engine.render.classic import ClassicRenderer, face_size
from engine.train.personalize import FitConfig, fit_personal
from engine.train.samples import ClipData
from engine.train.video import iter_frames
from streaming.cli import main
from streaming.measure.planted import PHRASES, PlantedStyle, head_style, lip_amplitude, render_clip, speech
from streaming.measure.sync import audio_envelope, estimate_offset, mouth_box, mouth_opening
from streaming.pipelines import PipelineError, RuntimeConfig
from streaming.runtime import Runtime
from streaming.transports.offline import render_to_file

pytestmark = pytest.mark.skipif(haar_cascade_path() is None, reason="installed OpenCV ships no Haar cascades")


@pytest.fixture
def astronaut(tmp_path: Path) -> Avatar:
    data = pytest.importorskip("skimage.data")
    Image.fromarray(np.asarray(data.astronaut(), np.uint8)).save(tmp_path / "astronaut.png")
    return AvatarStore().add(prepare_avatar(tmp_path / "astronaut.png", "astro"))


def classic_clip(avatar: Avatar, audio: np.ndarray, config: ClassicMotionConfig, clip_id: str) -> ClipData:
    """The mesh-space clip data of classic motion itself (what tracking a perfect render would give)."""
    source = ClassicRenderer().prepare(avatar).source
    fs = face_size(source)
    motion = ClassicMotion(config, face_size=fs)
    features = ClassicFeatures()
    frames = motion.push(np.concatenate([features.push(audio), features.flush()])) + motion.flush()
    rows = log_mel_offline(audio)
    n = min(len(frames), len(rows))
    geometry = canonical_keypoints(source.kp_canonical.numpy())
    expr = np.stack([geometry + np.pad(f.params.exp[0, :, :2].numpy() / fs, ((0, 0), (0, 1))) for f in frames[:n]])
    return ClipData(clip_id, rows[:n], np.ones(n, bool), expr.astype(np.float32), np.zeros_like(expr),
                    np.tile([0, 0, 0, 0, 0, 0, 1.0], (n, 1)).astype(np.float32), geometry)  # fmt: skip


def test_runtime_drives_a_personalized_avatar(astronaut: Avatar, tmp_path: Path) -> None:
    clips = [classic_clip(astronaut, speech(PHRASES[i]), ClassicMotionConfig(seed=i), f"c{i}") for i in range(2)]
    model, report = fit_personal(clips, FitConfig(steps=150, seed=0))
    assert report.val["lip"] * 5 < report.val_zero["lip"]
    AvatarStore().save_personal("astro", "mesh", model.save)
    audio = speech(PHRASES[3], gap_s=0.3)[: 16000 * 2]

    async def render() -> np.ndarray:
        runtime = Runtime.create(RuntimeConfig(mode="classic", motion="personal"))
        try:
            assert runtime.pipeline.motion_name == "personal" and not runtime.untrained
            await render_to_file(runtime, audio, tmp_path / "out.mp4", avatar="astro", paste_back=False)
            with pytest.raises(PipelineError, match="engine personalize"):
                await runtime.open_session("default")
        finally:
            await runtime.aclose()
        return np.stack(list(iter_frames(tmp_path / "out.mp4")))

    frames = asyncio.run(render())
    assert frames.shape[1:] == (512, 512, 3)
    opening = mouth_opening(frames, mouth_box(astronaut.landmarks))
    found = estimate_offset(opening, audio_envelope(audio, 25, len(opening)), 25, max_lag_frames=5)
    assert abs(found.offset_frames) <= 1.5 and found.correlation > 0.5, found
    assert opening.max() - opening.min() > 0.05  # the mouth visibly opens (darkness of the mouth box)


@pytest.mark.slow
def test_personalize_recovers_planted_style(astronaut: Avatar, tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        style = PlantedStyle(lip_scale=1.6, head_motion=2.5, seed=i)
        paths.append(render_clip(tmp_path / f"clip{i}.mp4", astronaut, speech(PHRASES[i]), style, size=192))
    result = CliRunner().invoke(main, ["personalize", *map(str, paths), "--avatar", "astro", "--steps", "400",
                                       "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    model = PersonalModel.load(AvatarStore().personal_dir("astro", "mesh"))
    held_out = speech(PHRASES[4])
    slope = lip_amplitude(model, astronaut, held_out)
    assert abs(slope - 1.6) < 0.15 * 1.6, slope
    # head style: the generated motion has the clips' own pose statistics (deviations from each clip's mean)
    track = model.reference_pose  # [N, 7] what the IMDP replays: the clips' smoothed deviations
    clips_std = np.array([track[:, 2].std(), track[:, 3].std(), track[:, 4].std()])
    ours = head_style(model, astronaut, len(track))
    assert np.all(np.abs(ours / clips_std - 1) < 0.25), (ours, clips_std)
    # an untrained model (seeded random heads, random pose features) misses both
    untrained = untrained_model(PersonalConfig())
    bad_slope = lip_amplitude(untrained, astronaut, held_out)
    bad_head = head_style(untrained, astronaut, len(track))
    assert abs(bad_slope - 1.6) >= 0.15 * 1.6, bad_slope
    assert not np.all(np.abs(bad_head / clips_std - 1) < 0.25), (bad_head, clips_std)
