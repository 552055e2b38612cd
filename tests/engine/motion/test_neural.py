"""Neural motion stage end to end (tiny LMDM): WAV in random chunks -> one frame per 40 ms == one-shot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.audio import LogMelFeatures, StreamingResampler, log_mel_offline, to_mono_16k
from engine.keypoints import NUM_KP, MotionParams, SourceFace, keypoints_from_params
from engine.motion import lmdm
from engine.motion.base import MotionFrame
from engine.motion.control_schema import ControlState, ControlValueError
from engine.motion.emotion import emotion_soft_label
from engine.motion.heads import LipHead
from engine.motion.neural import NeuralMotionConfig, NeuralMotionStage, build_neural_motion
from engine.motion.scheduler import SchedulerConfig

RATE = 48000


@pytest.fixture(scope="module")
def den() -> lmdm.MotionDecoder:
    return lmdm.build("tiny", cond_dim=lmdm.logmel_cond_dim())


@pytest.fixture
def source() -> SourceFace:
    g = torch.Generator().manual_seed(3)
    params = MotionParams(
        torch.ones(1, 1), torch.zeros(1), torch.tensor([5.0]), torch.zeros(1), torch.zeros(1, 3),
        torch.randn(1, NUM_KP, 3, generator=g) * 0.01,
    )  # fmt: skip
    kp = torch.randn(NUM_KP, 3, generator=g) * 0.3
    return SourceFace(kp, params, keypoints_from_params(kp[None], params)[0])


def _wav(seconds: float) -> np.ndarray:
    """Synthetic 48 kHz int16 'speech': a gliding harmonic tone with a syllable-rate envelope and pauses."""
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (np.sin(2 * np.pi * 0.5 * t) > -0.3)
    return (voice * env * 6000).astype(np.int16)


def _config() -> NeuralMotionConfig:
    return NeuralMotionConfig(scheduler=SchedulerConfig(steps=4))


def _stream(stage: NeuralMotionStage, wav: np.ndarray, seed: int) -> list[MotionFrame]:
    rng = np.random.default_rng(seed)
    resampler, mel = StreamingResampler(), LogMelFeatures()
    frames, i = [], 0
    while i < wav.shape[0]:
        k = int(rng.integers(1, RATE // 4))
        frames += stage.push(mel.push(resampler.push(wav[i : i + k], RATE)))
        i += k
    frames += stage.push(mel.push(resampler.flush()))
    frames += stage.push(mel.flush())
    return frames + stage.flush()


def _same(a: list[MotionFrame], b: list[MotionFrame]) -> bool:
    return all(
        fa.frame_index == fb.frame_index and all(torch.equal(x, y) for x, y in zip(fa.params, fb.params, strict=True))
        for fa, fb in zip(a, b, strict=True)
    ) and len(a) == len(b)


def test_wav_random_chunks_one_frame_per_40ms_equals_one_shot(den: lmdm.MotionDecoder, source: SourceFace) -> None:
    wav = _wav(1.3)
    n_frames = math.ceil(wav.shape[0] / RATE * 25)
    stage = build_neural_motion(den, source, _config())
    assert stage.untrained
    streamed = _stream(stage, wav, seed=0)
    assert [f.frame_index for f in streamed] == list(range(n_frames))
    feats = log_mel_offline(to_mono_16k(wav, RATE))
    one_shot = stage.push(feats) + stage.flush()
    assert _same(streamed, one_shot)
    again = _stream(stage, wav, seed=1)  # other chunk sizes, and the stage is reusable after flush
    assert _same(streamed, again)
    assert all(f.params.exp.shape == (1, NUM_KP, 3) and torch.isfinite(f.params.exp).all() for f in streamed)


def test_controls_and_lip_head(den: lmdm.MotionDecoder, source: SourceFace) -> None:
    feats = log_mel_offline(to_mono_16k(_wav(0.6), RATE))
    torch.manual_seed(0)
    stage = build_neural_motion(den, source, _config(), lip_head=LipHead(81))
    base = build_neural_motion(den, source, _config())
    a, b = stage.push(feats) + stage.flush(), base.push(feats) + base.flush()
    assert len(a) == len(b) == feats.shape[0]
    assert not torch.equal(a[-1].params.exp, b[-1].params.exp)
    stage.apply_controls(ControlState(emotion="happy", head_pose="fixed"))
    assert stage.controls.state.emotion == "happy"
    np.testing.assert_allclose(stage.scheduler._emotion[3], 0.997657, atol=1e-6)
    stage.apply_controls(ControlState(emotion="happy", intensity=0.0))  # intensity 0: the neutral condition
    np.testing.assert_allclose(stage.scheduler._emotion, emotion_soft_label("neutral"), atol=1e-6)
    with pytest.raises(ControlValueError, match="reference clip"):
        stage.check_controls(ControlState(head_pose="reference"))
    assert stage.controls.state.head_pose == "diffusion"


def test_interrupt_continues_frame_clock(den: lmdm.MotionDecoder, source: SourceFace) -> None:
    feats = log_mel_offline(to_mono_16k(_wav(0.6), RATE))
    stage = build_neural_motion(den, source, _config())
    first = stage.push(feats[:9])
    stage.interrupt()
    rest = stage.push(feats[:7]) + stage.flush()
    assert [f.frame_index for f in first + rest] == list(range(len(first) + len(rest)))
    assert len(rest) == 7


def test_hubert_conditioned_denoiser_with_loudness_column(source: SourceFace) -> None:
    ditto_dims = lmdm.build("tiny")  # HuBERT conditioning (cond 1103 = 1024 + 79)
    with pytest.raises(ValueError, match="silence"):
        build_neural_motion(ditto_dims, source)
    # rows as ConcatFeatures(HubertStreaming, LoudnessFeatures) gives them: 1024 HuBERT dims + RMS dB
    silence = np.concatenate([np.zeros(1024, np.float32), [-100.0]]).astype(np.float32)
    stage = build_neural_motion(ditto_dims, source, _config(), silence=silence)
    assert stage.scheduler.audio_dim == 1024 and stage._loud_col == -1
    rows = np.random.default_rng(0).standard_normal((13, 1025)).astype(np.float32)
    frames = stage.push(rows) + stage.flush()
    assert [f.frame_index for f in frames] == list(range(13))
