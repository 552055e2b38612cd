"""Sliding-window diffusion scheduler: feature rows in, one motion vector per row out, at low latency.

Window ``k`` covers feature rows ``[e_k - W, e_k)`` with ``e_k = (k + 1) H + L`` and emits frames
``[k H, (k + 1) H)``; the last ``L`` rows are lookahead. Rows before the stream start are silence features, so
the first frame needs only ``H + L`` rows of audio (280 ms by default) instead of Ditto's 70-frame history.
Consecutive windows are crossfaded over their ``min(L, H)`` shared frames, the pose dims are smoothed with
Ditto's ``smo_k_d`` moving average (the future half of it from the lookahead), and every window is
conditioned on the motion already on screen (``cond_frame``).

Windows run at fixed row positions with one seeded ``torch.Generator`` drawn in window order, so the output is
the same whatever sizes the features arrive in (streaming == offline). Everything per window lives on the device of
``init_motion`` (the avatar's: the renderer's device): the generator, the noise, the conditions and the vectors.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.keypoints import NUM_KP, MotionParams, SourceFace
from engine.motion.base import MotionFrame
from engine.motion.decode import MOTION_DIM, POSE_DIMS, MotionBounds, decode_motion
from engine.motion.emotion import emotion_soft_label
from engine.motion.samplers import DDIMSampler, guided_denoise, sample
from engine.motion.samplers.guidance import MaskedDenoiser
from engine.motion.schedule import cosine_alphas_cumprod

EMOTION_DIM = 8
SOURCE_COND_DIM = 2 + 6 + NUM_KP * 3  # eye open, eye-ball move, source canonical keypoints
NON_AUDIO_DIM = EMOTION_DIM + SOURCE_COND_DIM  # 79
COND_FRAME_MODES = ("last_emitted", "window_start")


@dataclass(frozen=True)
class SchedulerConfig:
    window: int = 80  # W: the denoiser's sequence length
    hop: int = 5  # H: frames emitted per window (200 ms)
    lookahead: int = 2  # L: future rows each window sees past its emitted frames
    steps: int = 10  # DDIM steps per window
    guidance: float = 2.0  # classifier-free guidance weight (Ditto: 2)
    eta: float = 1.0
    smooth_k: int = 3  # moving average over the pose dims (Ditto smo_k_d); k // 2 must be <= lookahead
    seed: int = 0
    # "last_emitted": the frame on screen (continuity); "window_start": the frame before the window's first row,
    # which is what Ditto's online worker passes (its windows start right after that frame)
    cond_frame: str = "last_emitted"
    interrupt_ramp: int = 10  # frames to blend from the last shown motion after interrupt()
    clip: bool = True

    def __post_init__(self) -> None:
        for name in ("window", "hop", "steps", "smooth_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lookahead < 2:
            raise ValueError(f"SchedulerConfig.lookahead must be >= 2 frames, got {self.lookahead}")
        if self.hop + self.lookahead >= self.window:
            raise ValueError(f"hop + lookahead ({self.hop} + {self.lookahead}) must be < window {self.window}")
        if self.smooth_k % 2 == 0 or self.smooth_k // 2 > self.lookahead:
            raise ValueError(f"smooth_k must be odd with smooth_k // 2 <= lookahead, got {self.smooth_k}")
        if self.cond_frame not in COND_FRAME_MODES:
            raise ValueError(f"cond_frame must be one of {COND_FRAME_MODES}, got {self.cond_frame!r}")
        if not self.guidance >= 0 or not 0 <= self.eta <= 1 or self.interrupt_ramp < 0:
            raise ValueError("guidance must be >= 0, eta in [0, 1], interrupt_ramp >= 0")

    @property
    def first_frame_rows(self) -> int:
        """Feature rows needed before the first frame can be computed (H + L)."""
        return self.hop + self.lookahead


@dataclass(frozen=True)
class SourceCondition:
    """Per-avatar part of Ditto's condition (docs/spec/ditto.md §1.2): eye open ratio, eye-ball move, canonical kp.

    Without MediaPipe landmarks of the portrait the eye values default to an open, centred gaze.
    """

    sc: tuple[float, ...]  # 63: source canonical keypoints, keypoint-major
    eye_open: tuple[float, float] = (0.3, 0.3)
    eye_ball: tuple[float, ...] = (0.0,) * 6

    def __post_init__(self) -> None:
        if len(self.sc) != NUM_KP * 3 or len(self.eye_open) != 2 or len(self.eye_ball) != 6:
            raise ValueError("SourceCondition needs sc [63], eye_open [2], eye_ball [6]")
        if not np.all(np.isfinite(self.vector())):
            raise ValueError("SourceCondition values must be finite")

    @classmethod
    def from_source(cls, source: SourceFace, **kwargs: tuple[float, ...]) -> SourceCondition:
        return cls(sc=tuple(source.kp_canonical.reshape(-1).tolist()), **kwargs)  # type: ignore[arg-type]

    def vector(self) -> np.ndarray:
        """``[71]`` = eye open 2 | eye-ball move 6 | sc 63."""
        return np.asarray([*self.eye_open, *self.eye_ball, *self.sc], np.float32)


def assemble_condition(audio: np.ndarray, emotion: np.ndarray, source: SourceCondition) -> np.ndarray:
    """Ditto's condition rows ``[n, A + 79]`` = audio ``[n, A]`` | emotion ``[n, 8]`` | source ``[71]`` (repeated)."""
    n = audio.shape[0]
    if emotion.shape != (n, EMOTION_DIM):
        raise ValueError(f"emotion must be [{n}, {EMOTION_DIM}], got {list(emotion.shape)}")
    src = np.broadcast_to(source.vector(), (n, SOURCE_COND_DIM))
    return np.concatenate([audio, emotion, src], axis=1).astype(np.float32)


class WindowScheduler:
    """:class:`engine.motion.base.MotionStage` over a diffusion denoiser (Ditto LMDM or its presets).

    ``denoiser`` fits :class:`engine.motion.samplers.guidance.MaskedDenoiser` and has ``.config`` with
    ``seq_len``, ``motion_dim``, ``cond_dim``. Feature rows may carry more columns than the condition uses (e.g.
    a loudness column); the first ``cond_dim - 79`` columns are the audio condition. ``silence`` is the feature
    row of silent audio (the stream's past). ``init_motion`` ``[265]`` is the motion before the first frame
    (the source's motion vector). ``to_params`` turns emitted vectors into :class:`MotionParams`.
    """

    def __init__(
        self,
        denoiser: MaskedDenoiser,
        silence: np.ndarray,
        init_motion: Tensor,
        source_cond: SourceCondition,
        config: SchedulerConfig | None = None,
        bounds: MotionBounds | None = None,
        to_params: Callable[[Tensor], MotionParams] = decode_motion,
    ) -> None:
        self.config = cfg = config or SchedulerConfig()
        dcfg = denoiser.config  # type: ignore[attr-defined]
        if dcfg.seq_len != cfg.window or dcfg.motion_dim != MOTION_DIM:
            raise ValueError(
                f"denoiser works on [{dcfg.seq_len}, {dcfg.motion_dim}] windows; scheduler needs "
                f"[{cfg.window}, {MOTION_DIM}]"
            )
        self.audio_dim = int(dcfg.cond_dim) - NON_AUDIO_DIM
        silence = np.asarray(silence, np.float32).reshape(-1)
        if self.audio_dim < 1 or silence.shape[0] < self.audio_dim:
            raise ValueError(
                f"denoiser cond_dim {dcfg.cond_dim} needs >= {self.audio_dim} audio columns, features have "
                f"{silence.shape[0]}"
            )
        if tuple(init_motion.reshape(-1).shape) != (MOTION_DIM,):
            raise ValueError(f"init_motion must have {MOTION_DIM} values, got {list(init_motion.shape)}")
        self.denoiser = denoiser
        self.silence = silence
        self.feature_dim = silence.shape[0]
        self.init_motion = init_motion.detach().reshape(MOTION_DIM).to(torch.float32)
        self.device = self.init_motion.device
        self.source_cond = source_cond
        self.bounds = bounds or MotionBounds.default()
        self.to_params = to_params
        self.fps = 25
        self.lookahead_frames = cfg.hop + cfg.lookahead - 1  # worst case: the first frame of a hop
        self.sampler = DDIMSampler(cosine_alphas_cumprod(), eta=cfg.eta)
        self.sampler.set_timesteps(cfg.steps)
        self._emotion = emotion_soft_label("neutral")
        self.reset()

    # --- state ---

    def reset(self) -> None:
        """Back to the start of a stream (frame 0, fresh seeded noise)."""
        cfg = self.config
        self._gen = torch.Generator(self.device).manual_seed(cfg.seed)
        # Ditto draws the step noises once and reuses them for every window
        self._step_noises = [
            torch.randn(1, cfg.window, MOTION_DIM, generator=self._gen, device=self.device)
            for _ in range(self.sampler.noise_steps)
        ]
        self._rows = np.zeros((0, self.feature_dim), np.float32)  # rows [_base, _n_in)
        self._emo = np.zeros((0, EMOTION_DIM), np.float32)
        self._base = 0
        self._n_in = 0
        self._n_out = 0
        self._k = 0
        self._prev: Tensor | None = None  # previous window's prediction [W, 265]
        self._prev_start = 0
        self._raw_tail: deque[Tensor] = deque(maxlen=max(1, cfg.smooth_k // 2))  # pre-smoothing recent frames
        self._shown: deque[Tensor] = deque(maxlen=cfg.window)  # emitted vectors, last at index _n_out - 1
        self._ramp_from: Tensor | None = None
        self._ramp_left = 0

    def set_emotion(self, label: np.ndarray) -> None:
        """Emotion condition ``[8]`` for rows pushed from now on (Ditto soft label or a blend of them)."""
        label = np.asarray(label, np.float32).reshape(-1)
        if label.shape != (EMOTION_DIM,) or not np.all(np.isfinite(label)):
            raise ValueError(f"emotion label must be {EMOTION_DIM} finite values, got shape {label.shape}")
        self._emotion = label

    @property
    def frames_emitted(self) -> int:
        return self._n_out

    # --- MotionStage ---

    def push(self, features: np.ndarray) -> list[MotionFrame]:
        return self._frames(*self.push_vectors(features))

    def flush(self) -> list[MotionFrame]:
        return self._frames(*self.flush_vectors())

    def interrupt(self) -> None:
        """Drop rows not yet turned into frames; the past becomes silence and motion blends back from what is shown."""
        keep = self._n_out - self._base
        self._rows = np.tile(self.silence, (max(keep, 0), 1))
        self._emo = self._emo[: max(keep, 0)]
        self._n_in = self._n_out
        self._prev = None  # its lookahead predicted speech that will not come
        if self._shown:
            self._ramp_from = self._shown[-1]
            self._ramp_left = self.config.interrupt_ramp

    # --- vectors ---

    def push_vectors(self, features: np.ndarray) -> tuple[int, Tensor]:
        """Append rows ``[n, D]``; returns ``(first frame index, vectors [m, 265])`` of the frames now ready."""
        self._append(features)
        start = self._n_out
        out = []
        while self._n_in >= self._window_end(self._k):
            out.append(self._run_window(self._n_in))
        return start, _cat(out)

    def flush_vectors(self) -> tuple[int, Tensor]:
        """End of stream: the remaining frames (future rows repeat the last one); then resets for a new stream."""
        start = self._n_out
        out = []
        while self._n_out < self._n_in:
            out.append(self._run_window(self._n_in))
        self.reset()
        return start, _cat(out)

    def offline(self, features: np.ndarray) -> Tensor:
        """One-shot path: all rows at once -> ``[n, 265]`` (equal to any chunked streaming of the same rows)."""
        self.reset()
        _, a = self.push_vectors(features)
        _, b = self.flush_vectors()
        return torch.cat([a, b])

    # --- internals ---

    def _append(self, features: np.ndarray) -> None:
        feats = np.asarray(features, np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(f"features must be [n, {self.feature_dim}], got {list(feats.shape)}")
        if not np.all(np.isfinite(feats)):
            raise ValueError("features contain NaN or infinite values")
        self._rows = np.concatenate([self._rows, feats])
        self._emo = np.concatenate([self._emo, np.tile(self._emotion, (feats.shape[0], 1))])
        self._n_in += feats.shape[0]

    def _window_end(self, k: int) -> int:
        return (k + 1) * self.config.hop + self.config.lookahead

    def _window_rows(self, start: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[start, start + W)``: silence before the stream, the last row repeated past its end."""
        w = self.config.window
        idx = np.arange(start, start + w)
        local = np.clip(np.minimum(idx, n_in - 1) - self._base, 0, None)
        rows = self._rows[local]
        emo = self._emo[local]
        past = idx < 0
        rows[past] = self.silence
        return rows, emo

    def _cond_frame(self, start: int) -> Tensor:
        if self.config.cond_frame == "last_emitted":
            return self._shown[-1] if self._shown else self.init_motion
        frame = start - 1
        back = self._n_out - 1 - frame  # 0: the last shown frame
        if frame < 0 or back >= len(self._shown):
            return self.init_motion
        return self._shown[-1 - back]

    @torch.inference_mode()
    def _predict(self, rows: np.ndarray, emo: np.ndarray, cond_frame: Tensor) -> Tensor:
        cfg = self.config
        cond = torch.from_numpy(assemble_condition(rows[:, : self.audio_dim], emo, self.source_cond))[None]
        cond = cond.to(self.device, non_blocking=True)  # [1, W, C]: the one host-to-device copy per window
        kp_cond = cond_frame[None]  # [1, 265]
        x_T = torch.randn(1, cfg.window, MOTION_DIM, generator=self._gen, device=self.device)

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            return guided_denoise(self.denoiser, x, kp_cond, cond, t, cfg.guidance)

        pred = sample(denoise, self.sampler, x_T, noises=self._step_noises)[0]  # [W, 265]
        return self.bounds.clip(pred) if cfg.clip else pred

    def _run_window(self, n_in: int) -> Tensor:
        cfg = self.config
        k = self._k
        end = self._window_end(k)
        start = end - cfg.window
        rows, emo = self._window_rows(start, n_in)
        pred = self._predict(rows, emo, self._cond_frame(start))
        first = k * cfg.hop
        count = min(cfg.hop, n_in - first)
        fuse = min(cfg.lookahead, cfg.hop)
        raw = pred[first - start : first - start + count].clone()  # [count, 265]
        if self._prev is not None:
            for j in range(min(fuse, count)):
                alpha = (j + 1) / (fuse + 1)
                raw[j] = self._prev[first + j - self._prev_start] * (1 - alpha) + raw[j] * alpha
        out = self._smooth(raw, pred, first, start, n_in)
        for j in range(count):
            if self._ramp_left > 0 and self._ramp_from is not None:
                beta = (cfg.interrupt_ramp - self._ramp_left + 1) / (cfg.interrupt_ramp + 1)
                out[j] = self._ramp_from * (1 - beta) + out[j] * beta
                self._ramp_left -= 1
            self._shown.append(out[j])
            self._raw_tail.append(raw[j])
        self._prev, self._prev_start = pred, start
        self._n_out = first + count
        self._k += 1
        self._trim()
        return out

    def _smooth(self, raw: Tensor, pred: Tensor, first: int, start: int, n_in: int) -> Tensor:
        """Centred moving average of the pose dims over the pre-smoothing values, truncated at the stream ends."""
        half = self.config.smooth_k // 2
        out = raw.clone()
        if half == 0:
            return out
        past = list(self._raw_tail)[-half:]
        for j in range(raw.shape[0]):
            f = first + j
            vals = []
            for g in range(f - half, f + half + 1):
                if g < 0 or g >= n_in:
                    continue
                if g < first:
                    vals.append(past[g - first + len(past)])
                elif g < first + raw.shape[0]:
                    vals.append(raw[g - first])
                else:
                    vals.append(pred[g - start])
            out[j, :POSE_DIMS] = torch.stack(vals)[:, :POSE_DIMS].mean(0)
        return out

    def _trim(self) -> None:
        """Forget rows no later window reads."""
        next_start = max(0, self._window_end(self._k) - self.config.window)
        drop = min(next_start - self._base, self._n_in - self._base)
        if drop > 0:
            self._rows = self._rows[drop:]
            self._emo = self._emo[drop:]
            self._base += drop

    def _frames(self, start: int, vectors: Tensor) -> list[MotionFrame]:
        if vectors.shape[0] == 0:
            return []
        params = self.to_params(vectors)
        return [MotionFrame(start + i, MotionParams(*(p[i : i + 1] for p in params))) for i in range(vectors.shape[0])]


def _cat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, MOTION_DIM)


def replace_config(config: SchedulerConfig, **changes: object) -> SchedulerConfig:
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]
