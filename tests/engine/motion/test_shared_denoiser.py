"""SharedDenoiser: schedulers in several threads share denoiser calls, and each gets the motion it gets alone."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from engine.motion import lmdm
from engine.motion.decode import MOTION_DIM
from engine.motion.scheduler import SchedulerConfig, SourceCondition, WindowScheduler
from engine.motion.shared_denoiser import SharedDenoiser

FEAT_DIM = 81  # 80 log-mels + loudness
SILENCE = np.full(FEAT_DIM, -13.8, np.float32)
SESSIONS = 3


@pytest.fixture(scope="module")
def den() -> lmdm.MotionDecoder:
    return lmdm.build("tiny", cond_dim=lmdm.logmel_cond_dim())


def _scheduler(denoiser: Any, seed: int) -> WindowScheduler:
    source = SourceCondition(sc=tuple(np.linspace(-0.5, 0.5, 63).tolist()))
    config = SchedulerConfig(steps=4, seed=seed)
    return WindowScheduler(denoiser, SILENCE, torch.zeros(MOTION_DIM), source, config)


def _features(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((60, FEAT_DIM)).astype(np.float32)


def _in_threads(work: list[Any]) -> list[Any]:
    results: list[Any] = [None] * len(work)
    start = threading.Barrier(len(work))

    def run(i: int) -> None:
        start.wait()
        results[i] = work[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller never got its result"
    return results


def test_concurrent_sessions_share_calls_and_keep_their_own_motion(den: lmdm.MotionDecoder) -> None:
    with torch.inference_mode():
        alone = [_scheduler(den, seed).offline(_features(seed)) for seed in range(SESSIONS)]  # [60, 265] each
        shared = SharedDenoiser(den)
        together = _in_threads(
            [lambda seed=seed: _scheduler(shared, seed).offline(_features(seed)) for seed in range(SESSIONS)]
        )
    for a, b in zip(alone, together, strict=True):
        assert a.shape == b.shape == (60, MOTION_DIM)
        # per-sample networks: a batch changes float rounding at most
        assert float((a - b).abs().max()) <= 1e-4
    stats = shared.stats
    windows = 12 * 4  # each session: 60 rows / hop 5 = 12 windows of 4 steps
    assert stats.requests == SESSIONS * windows
    assert stats.max_requests >= 2 and stats.calls < stats.requests, stats  # steps really were shared
    print(f"\n{stats.requests} steps in {stats.calls} calls ({stats.requests_per_call:.2f} per call)")


def test_a_lone_caller_runs_its_own_calls(den: lmdm.MotionDecoder) -> None:
    shared = SharedDenoiser(den)
    with torch.inference_mode():
        got = _scheduler(shared, 0).offline(_features(0))
        assert torch.equal(got, _scheduler(den, 0).offline(_features(0)))  # batch of one: the very same call
    assert shared.stats.requests == shared.stats.calls == 12 * 4


def test_an_error_reaches_every_caller_of_the_batch_and_nobody_hangs(den: lmdm.MotionDecoder) -> None:
    class Broken:
        config = den.config

        def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            raise RuntimeError("out of memory")

    shared = SharedDenoiser(Broken(), gather_s=0.05)

    def call() -> str:
        x = torch.zeros(2, den.config.seq_len, MOTION_DIM)
        cond = torch.zeros(2, den.config.seq_len, den.config.cond_dim)
        try:
            shared(x, torch.zeros(2, MOTION_DIM), cond, torch.zeros(2, dtype=torch.long))
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    assert _in_threads([call, call, call]) == ["out of memory"] * 3
    with pytest.raises(ValueError, match="max_rows"):
        SharedDenoiser(den, max_rows=0)
