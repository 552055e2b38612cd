"""Device and precision end to end: a session built the way ``serve``/``render`` build it runs every per-frame
tensor on the configured device, and the hot path reads nothing back to the host but the finished frames."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from export.backends import BackendConfig
from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime
from streaming.session import Session, SessionConfig
from streaming.testing import drain


async def _offline(runtime: Runtime, seconds: float) -> tuple[Session, list[Any]]:
    session = await runtime.open_session(None)
    audio = (0.2 * np.random.default_rng(0).standard_normal(int(16_000 * seconds))).astype(np.float32)
    session.push_audio(audio, 16_000)
    session.end_of_stream()
    return session, (await drain(session))[0]


async def test_hot_path_reads_back_only_finished_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neural mode (tiny, eager, CPU): every Tensor.numpy() during a session is a rendered frame's copy (one per
    render call), not motion or keypoints read back per frame."""
    runtime = Runtime.create(
        RuntimeConfig(mode="neural", backend=BackendConfig("eager", "cpu"), session=SessionConfig(realtime=False))
    )
    runtime.prepare(runtime.load_avatar(None))  # per-avatar work (features) happens once, before the stream
    calls: list[tuple[int, ...]] = []
    original = torch.Tensor.numpy

    def counting(self: torch.Tensor, *args: Any, **kwargs: Any) -> np.ndarray:
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", counting)
    try:
        _session, frames = await _offline(runtime, 1.0)
    finally:
        monkeypatch.undo()
        await runtime.aclose()
    assert len(frames) == 25
    size = runtime.renderer.size
    frame_copies = [c for c in calls if c[1:] == (size, size, 3)]
    assert len(frame_copies) == runtime.worker.batches  # one copy per render call, of its finished frames
    assert len(calls) == len(frame_copies), [c for c in calls if c not in frame_copies][:5]


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["classic", "neural"])
async def test_sessions_run_on_the_gpu(mode: str) -> None:
    """On a GPU, the runtime as ``serve --device cuda`` builds it renders there, in its default precision (bf16
    where supported), and the motion and keypoints of each frame live there too."""
    runtime = Runtime.create(
        RuntimeConfig(mode=mode, backend=BackendConfig("eager", "cuda"), session=SessionConfig(realtime=False))
    )
    try:
        session, frames = await _offline(runtime, 1.0)
        assert len(frames) == 25 and frames[0].rgb.shape[-1] == 3
        assert len({f.rgb.tobytes() for f in frames}) > 1
        if mode == "neural":
            prepared = runtime.prepare(runtime.load_avatar(None))
            assert prepared.state.is_cuda and prepared.state.dtype == runtime.renderer.dtype  # type: ignore[union-attr]
            assert prepared.source.kp_source.is_cuda
            motion = session.motion.scheduler  # type: ignore[attr-defined]
            assert motion.device.type == "cuda" and motion.init_motion.is_cuda
    finally:
        await runtime.aclose()
