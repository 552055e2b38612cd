"""The runtime: mode resolution, strict config, sessions on the real neural path (tiny preset), clean shutdown."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine.config import ConfigError, from_dict
from engine.weights.checkpoint import RECORD_NAME
from streaming.api import ControlError
from streaming.batching import BatchConfig
from streaming.clock import frame_count
from streaming.pipelines import PipelineError, RuntimeConfig, resolve
from streaming.runtime import Runtime
from streaming.session import Session, SessionConfig


def test_auto_mode_is_classic_without_weights_and_neural_with_them(engine_home: Path, tmp_path: Path) -> None:
    assert resolve(RuntimeConfig())[:2] == ("classic", "classic")
    lp, ditto = tmp_path / "lp", tmp_path / "ditto"
    for store in (lp, ditto):
        store.mkdir()
        (store / RECORD_NAME).write_text("{}")
    both = RuntimeConfig(weights=str(lp), motion_weights=str(ditto))
    assert resolve(both)[:2] == ("neural", "ditto")
    assert resolve(replace(both, mode="classic"))[:2] == ("classic", "classic")
    # LivePortrait without Ditto: auto never picks untrained motion silently; the note names what is missing
    renderer, motion, notes = resolve(RuntimeConfig(weights=str(lp), motion_weights=str(tmp_path / "none")))
    assert (renderer, motion) == ("classic", "classic") and "no Ditto motion weights" in notes[0]
    # asked for explicitly, the untrained denoiser runs (and the banner says so)
    assert resolve(RuntimeConfig(mode="neural"))[:2] == ("neural", "ditto")


def test_runtime_config_is_strict() -> None:
    cfg = from_dict(RuntimeConfig, {"mode": "neural", "session": {"fps": 25, "jitter_s": 0.06}, "batch": {}})
    assert cfg.session.jitter_s == 0.06 and cfg.mode == "neural"
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(RuntimeConfig, {"mode": "neural", "sesion": {}})
    with pytest.raises(ConfigError, match="mode"):
        from_dict(RuntimeConfig, {"mode": "fast"})
    with pytest.raises(
        ConfigError, match=r"motion: unknown motion generator 'fast'; choose one of \['auto', 'classic'"
    ):
        from_dict(RuntimeConfig, {"motion": "fast"})


def test_neural_weights_dir_without_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no imported LivePortrait weights"):
        Runtime.create(RuntimeConfig(mode="neural", weights=str(tmp_path)))


async def test_neural_tiny_session_end_to_end() -> None:
    before = set(threading.enumerate())
    config = RuntimeConfig(mode="neural", session=SessionConfig(realtime=False))
    runtime = Runtime.create(config)
    assert runtime.untrained and "untrained renderer weights" in (runtime.pipeline.banner or "")
    assert runtime.describe()["mode"] == "neural"
    with pytest.raises(ControlError, match="emotion"):
        await runtime.open_session(None, controls={"emotion": "bored"})
    assert runtime.sessions == {}
    session = await runtime.open_session(None, controls={"emotion": "happy"})
    assert session.untrained and session.size == runtime.renderer.size
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(4800)).astype(np.float32)  # 0.3 s at 16 kHz
    session.push_audio(audio, 16_000)
    session.end_of_stream()

    async def audio_out() -> int:
        n = 0
        while (a := await session.next_audio()) is not None:
            n += a.samples.size
        return n

    reader = asyncio.create_task(audio_out())
    frames = []
    while (f := await session.next_video()) is not None:
        frames.append(f)
    assert await reader == audio.size
    assert [f.frame_index for f in frames] == list(range(frame_count(audio.size, 25)))
    assert frames[0].rgb.shape == (runtime.renderer.size, runtime.renderer.size, 3)
    assert len({f.rgb.tobytes() for f in frames}) > 1  # the motion path drives the renderer
    # a second session on the same worker, then everything goes away with the runtime
    await runtime.open_session(None, config=replace(config.session, realtime=True))
    assert len(runtime.sessions) == 2
    await runtime.aclose()
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []
    assert set(threading.enumerate()) <= before


async def classic_frames(audios: list[np.ndarray], max_batch: int) -> tuple[list[list[np.ndarray]], list[int]]:
    """Each session's frames, and the batch sizes the worker rendered."""

    config = RuntimeConfig(mode="classic", session=SessionConfig(realtime=False), batch=BatchConfig(max_batch))
    runtime = Runtime.create(config)
    sessions = [await runtime.open_session(None, controls={"emotion": "happy"}) for _ in audios]
    for s, a in zip(sessions, audios, strict=True):
        s.push_audio(a, 16_000)
        s.end_of_stream()

    async def drain(s: Session) -> list[np.ndarray]:
        async def audio() -> None:
            while await s.next_audio() is not None:
                pass

        reader = asyncio.create_task(audio())
        out = []
        while (f := await s.next_video()) is not None:
            out.append(f.rgb)
        await reader
        return out

    frames = list(await asyncio.gather(*(drain(s) for s in sessions)))
    batches = list(runtime.worker.batch_sizes)
    await runtime.aclose()
    return frames, batches


async def test_classic_default_mode_sessions_batched_equal_alone() -> None:
    # the real classic renderer: four sessions sharing render calls give the frames each gives alone
    rng = np.random.default_rng(3)
    t = np.arange(8000) / 16_000
    audios = [(0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t) * rng.uniform(0.2, 1)).astype(np.float32) for i in range(4)]
    audios = [a * (np.arange(a.size) % 4000 < 2000 + 400 * i) for i, a in enumerate(audios)]
    together, batches = await classic_frames(audios, max_batch=4)
    assert max(batches) > 1
    for i, a in enumerate(audios):
        alone, _ = await classic_frames([a], max_batch=4)
        assert len(alone[0]) == len(together[i]) == frame_count(a.size, 25)
        for x, y in zip(alone[0], together[i], strict=True):
            np.testing.assert_array_equal(x, y)
    assert len({f.tobytes() for f in together[0]}) > 3  # the mouth moves with the audio
