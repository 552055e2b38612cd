"""The personal motion stage: streaming equals offline, controls do what they say or are refused, and a model
round-trips through its files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.audio.features import LogMelFeatures, log_mel_offline
from engine.avatar.default import default_avatar
from engine.keypoints import EMOTION, LIP
from engine.motion.control_schema import ControlState, ControlValueError
from engine.motion.emotion import EMOTIONS
from engine.motion.personal import PersonalMotion
from engine.motion.personal_model import PersonalConfig, PersonalModel, PersonalModelError, untrained_model
from engine.render.classic import ClassicRenderer, face_size


@pytest.fixture(scope="module")
def source() -> object:
    return ClassicRenderer().prepare(default_avatar()).source


def _model() -> PersonalModel:
    model = untrained_model(PersonalConfig(), seed=3)
    model.emotions = ("happy", "neutral")
    return model


def _audio() -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    return (
        0.2 * np.sin(2 * np.pi * 150 * t) * (np.sin(2 * np.pi * 3 * t) > 0) + 0.01 * rng.normal(size=t.size)
    ).astype(np.float32)


def _stage(source: object) -> PersonalMotion:
    return PersonalMotion(_model(), source, LogMelFeatures().silence(), unit=face_size(source))  # type: ignore[arg-type]


def test_chunked_stream_equals_whole(source: object) -> None:
    rows = log_mel_offline(_audio())
    stage = _stage(source)
    whole = stage.push(rows) + stage.flush()
    parts = []
    for i in range(0, len(rows), 7):
        parts += stage.push(rows[i : i + 7])
    parts += stage.flush()
    assert [f.frame_index for f in whole] == list(range(len(rows))) == [f.frame_index for f in parts]
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(a.params.exp, b.params.exp, atol=1e-5, rtol=0)
    assert stage.lookahead_frames == 2


def test_controls(source: object) -> None:
    rows = log_mel_offline(_audio())
    base = source.params.exp[0]  # type: ignore[attr-defined]

    def run(**controls: object) -> np.ndarray:
        stage = _stage(source)
        stage.apply_controls(dataclasses.replace(ControlState(), blink=False, ramp_s=0.0, **controls))
        return np.stack([(f.params.exp[0] - base).numpy() for f in stage.push(rows) + stage.flush()])

    still_head = run(head_pose="fixed")
    assert np.abs(still_head[:, list(LIP)]).max() > 1e-3
    silent_lips = run(head_pose="fixed", lip_scale=0.0)
    assert np.abs(silent_lips[:, list(LIP)]).max() < 1e-6  # the learned lips scaled away
    doubled = run(head_pose="fixed", lip_scale=2.0)
    np.testing.assert_allclose(doubled[:, list(LIP)], 2 * still_head[:, list(LIP)], atol=1e-5)
    moving = run()
    non_lip = [k for k in range(21) if k not in LIP and k not in EMOTION]
    assert np.abs(moving[:, non_lip]).max() > 1e-3 and np.abs(still_head[:, non_lip]).max() < 1e-6
    happy = run(head_pose="fixed", emotion="happy", lip_scale=0.0)
    assert np.abs(happy[:, list(EMOTION)]).max() > 1e-4  # the learned happy offset

    stage = _stage(source)
    for bad in ({"emotion": "angry"}, {"head_pose": "reference"}, {"mouth_emotion": "sad"}):
        with pytest.raises(ControlValueError):
            stage.check_controls(dataclasses.replace(ControlState(), **bad))
    stage.check_controls(dataclasses.replace(ControlState(), emotion="happy", emotion_b="neutral"))
    assert set(stage.CONTROLS) <= set(ControlState.__dataclass_fields__)
    assert {"gaze", "loudness_lips"}.isdisjoint(stage.CONTROLS)
    assert set(EMOTIONS) > {"happy"}


def test_interrupt_skips_pending_frames(source: object) -> None:
    rows = log_mel_offline(_audio())
    stage = _stage(source)
    first = stage.push(rows[:30])
    stage.interrupt()
    later = stage.push(rows[30:40]) + stage.flush()
    assert first[-1].frame_index == 27  # two rows of lookahead held back
    assert [f.frame_index for f in later] == list(range(30, 40))


def test_model_files_round_trip(tmp_path: Path) -> None:
    model = _model()
    model.save(tmp_path)
    again = PersonalModel.load(tmp_path)
    assert again.emotions == model.emotions and again.config == model.config
    for (k, v), (k2, v2) in zip(model.heads.state_dict().items(), again.heads.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    (tmp_path / "personal.json").write_text('{"format": 1, "config": {"space": "mesh", "typo": 1}}')
    with pytest.raises(PersonalModelError, match="unknown config keys"):
        PersonalModel.load(tmp_path)
    with pytest.raises(PersonalModelError, match="no personal model"):
        PersonalModel.load(tmp_path / "missing")
