"""Backends selected by name reach the renderer and the denoiser: the neural renderer and a whole neural session
on ``onnxruntime`` against eager (tiny preset, fp32; float frames within 1e-4, delivered uint8 frames within one
step; ~20 s, nearly all of it exporting the networks to ONNX), the eager backend bit-identical to calling the
modules directly, and the errors of ``RuntimeConfig``, the pipeline build and ``engine render``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.avatar.record import Avatar
from engine.config import ConfigError, from_dict
from engine.keypoints import MotionParams
from engine.models import liveportrait
from engine.motion.neural import NeuralMotionStage
from engine.render.neural import NeuralRenderer
from export.backends import BackendConfig, DenoiserRuntime
from streaming.cli import main
from streaming.pipelines import PipelineError, RuntimeConfig
from streaming.runtime import Runtime
from streaming.session import SessionConfig
from streaming.testing import drain, eager_renderer

FLOAT_TOL = 1e-4  # fp32 onnxruntime vs PyTorch, as in tests/test_backends.py
UINT8_TOL = 1  # one 8-bit step: a float difference of 1e-4 can still cross a rounding boundary


@pytest.fixture(scope="module")
def nets() -> liveportrait.LivePortraitNets:
    return liveportrait.build("tiny")


def _avatar() -> Avatar:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:512, 0:512] / 511.0
    crop = np.clip(np.stack([xx, yy, 0.5 * (xx + yy)], -1) * 200 + rng.normal(0, 3, (512, 512, 3)), 0, 255)
    crop = crop.astype(np.uint8)
    return Avatar(
        name="wiring",
        content_hash="7" * 64,
        image=crop.copy(),
        crop=crop,
        crop_to_image=np.array([[1.0, 0, 0], [0, 1.0, 0]]),
    )


def _frames(renderer: NeuralRenderer, avatar: Avatar) -> torch.Tensor:
    """Two avatars' worth of frames (a batch of 2) at the portrait's pose and a turned, scaled one."""
    prepared = renderer.prepare(avatar)
    p = prepared.source.params
    turned = MotionParams(
        pitch=p.pitch + 4.0, yaw=p.yaw - 6.0, roll=p.roll, t=p.t, exp=p.exp * 1.3, scale=p.scale * 1.05
    )
    kp = torch.cat([renderer.drive(prepared, p), renderer.drive(prepared, turned)])  # [2, 21, 3]
    return renderer.render([prepared, prepared], kp)  # [2, 3, S, S]


def test_eager_backend_is_bit_identical_to_the_modules(nets: liveportrait.LivePortraitNets) -> None:
    """The renderer always runs its networks through a backend; eager's output is the modules' own, bit for bit."""
    avatar = _avatar()
    renderer = eager_renderer(nets)
    prepared = renderer.prepare(avatar)
    p = prepared.source.params
    kp = renderer.drive(prepared, p)
    with torch.inference_mode():
        warped = nets.warping(prepared.state, kp, prepared.source.kp_source[None])
        direct = nets.decoder(warped.out).clamp(0, 1)
        x = renderer.portrait_tensor(avatar.crop)
        assert torch.equal(renderer.networks.appearance(x), nets.appearance(x))
    assert torch.equal(renderer.render([prepared], kp), direct)


async def _session_frames(backend: str, audio: np.ndarray) -> tuple[Runtime, list[np.ndarray]]:
    config = RuntimeConfig(
        mode="neural", session=SessionConfig(realtime=False), backend=BackendConfig(backend, "cpu", "fp32")
    )
    runtime = Runtime.create(config)
    try:
        session = await runtime.open_session(None, controls={"emotion": "happy"})
        motion = session.motion
        assert isinstance(motion, NeuralMotionStage)
        denoiser = motion.scheduler.denoiser
        assert isinstance(denoiser, DenoiserRuntime) and denoiser.backend.name == backend
        session.push_audio(audio, 16_000)
        session.end_of_stream()
        frames = [f.rgb for f in (await drain(session))[0]]
    finally:
        await runtime.aclose()
    return runtime, frames


def _renderer_matches_eager(ort: NeuralRenderer) -> None:
    """Per-avatar features and float frames (before uint8) of ``ort`` against eager on the same networks."""
    avatar = _avatar()
    eager = eager_renderer(ort.nets)
    assert ort.networks.backend.name == "onnxruntime"  # type: ignore[attr-defined]
    features_e, features_o = eager.compute_features(avatar), ort.compute_features(avatar)
    for key, value in features_e.items():
        assert np.abs(features_o[key] - value).max() <= FLOAT_TOL, key
    expected = _frames(eager, avatar)
    got = _frames(ort, avatar)
    assert got.shape == expected.shape == (2, 3, eager.size, eager.size)
    err = float((got - expected).abs().max())
    assert 0.0 < err <= FLOAT_TOL  # > 0: the frames really came from another runtime
    assert not torch.equal(expected[0], expected[1])  # the turned pose renders another image


async def test_neural_session_and_renderer_on_onnxruntime_match_eager() -> None:
    # one test, so the onnxruntime networks are exported once (exports take most of its ~18 s)
    audio = (0.1 * np.random.default_rng(0).standard_normal(4800)).astype(np.float32)  # 0.3 s at 16 kHz
    eager_rt, eager = await _session_frames("eager", audio)
    ort_rt, ort = await _session_frames("onnxruntime", audio)
    assert eager_rt.describe()["backend"]["name"] == "eager" and ort_rt.describe()["backend"]["name"] == "onnxruntime"
    assert len(ort) == len(eager) > 1
    diff = np.abs(np.stack(ort).astype(np.int16) - np.stack(eager).astype(np.int16))
    assert int(diff.max()) <= UINT8_TOL
    assert len({f.tobytes() for f in ort}) > 1  # the motion drives the frames on this backend too
    assert isinstance(ort_rt.renderer, NeuralRenderer)
    _renderer_matches_eager(ort_rt.renderer)


def test_unknown_backend_names_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; choose one of \['eager', 'compile'"):
        RuntimeConfig(backend=BackendConfig("nope"))
    with pytest.raises(ConfigError, match=r"unknown backend 'nope'.*'onnxruntime'"):
        from_dict(RuntimeConfig, {"mode": "neural", "backend": {"name": "nope"}})
    with pytest.raises(ConfigError, match="dtype"):
        from_dict(RuntimeConfig, {"backend": {"name": "eager", "dtype": "fp64"}})
    assert from_dict(RuntimeConfig, {"backend": {"name": "onnxruntime"}}).backend.name == "onnxruntime"


def test_backend_unusable_or_unused_is_a_build_error(engine_home: Path) -> None:
    # TensorRT is CUDA-only
    with pytest.raises(PipelineError, match=r"backend 'tensorrt' is unavailable on cpu: .*Available there: \["):
        Runtime.create(RuntimeConfig(mode="neural", backend=BackendConfig("tensorrt", "cpu")))
    # no imported weights: auto is classic mode, which runs no networks; a non-eager backend is refused, not ignored
    with pytest.raises(PipelineError, match="the classic renderer runs none"):
        Runtime.create(RuntimeConfig(backend=BackendConfig("onnxruntime", "cpu")))
    with pytest.raises(PipelineError, match="no option"):
        Runtime.create(RuntimeConfig(mode="neural", backend=BackendConfig("eager", "cpu", options={"dir": "x"})))


def test_render_cli_unknown_backend(tmp_path: Path) -> None:
    out = tmp_path / "talk.mp4"
    args = ["render", "--audio", str(tmp_path / "missing.wav"), "--out", str(out), "--backend", "nope"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output  # a usage error, before the audio is even read
    assert "--backend" in result.output and "'nope' is not one of" in result.output
    assert "'eager'" in result.output and "'onnxruntime'" in result.output
    assert not out.exists()
