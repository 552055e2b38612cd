"""The neural motion path as one :class:`engine.motion.base.MotionStage`.

feature rows -> :class:`WindowScheduler` (diffusion windows) -> :class:`MotionStitch` (relative to the avatar)
-> optional lip head offsets -> smoothing of the generated motion (the ``smoothing`` control) ->
:class:`MotionControls` (stored emotions, lips x loudness, blinks and rest lips through the retargeting networks,
gaze, head pose) -> :class:`MotionFrame`. The smoothing filters what the diffusion generated, not the blinks and
ramps the controls draw (a filter would only blunt them). Everything is deterministic given the seeds in the config,
so a stream pushed in any chunk sizes gives the same frames as the whole file at once.

Stored emotions and the reference clip come from the motion library (:mod:`engine.motion.library`) through a
:class:`~engine.motion.library.Watched` loader, polled when a control arrives, so an example added while a session
runs is usable at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import numpy as np
import torch

from engine.audio.features import LogMelConfig, LogMelFeatures
from engine.keypoints import MotionParams, SourceFace
from engine.motion.base import MotionFrame
from engine.motion.control_schema import SMOOTHING_MODES, ControlState, ControlValueError
from engine.motion.controls import ControllerConfig, MotionControls
from engine.motion.decode import MotionBounds, MotionStitch, decode_motion
from engine.motion.emotion import EmotionBank
from engine.motion.heads import LipHead
from engine.motion.library import NeuralStored, Watched
from engine.motion.retarget import Retargeting
from engine.motion.samplers.guidance import MaskedDenoiser
from engine.motion.scheduler import NON_AUDIO_DIM, SchedulerConfig, SourceCondition, WindowScheduler
from engine.motion.smoothing import ParamsSmoother, make_smoother


@dataclass(frozen=True)
class NeuralMotionConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    smoothing: str = "one_euro"  # none | one_euro | kalman
    smoothing_lag_frames: float = 1.0
    loudness_column: int | None = -1  # feature column holding RMS dB (LogMelFeatures' last); None: no loudness
    lip_head_window: int = 9  # feature rows (ending at the frame) the lip head reads
    gaze_fix: bool = True

    def __post_init__(self) -> None:
        if self.smoothing not in SMOOTHING_MODES:
            raise ValueError(f"smoothing must be one of {SMOOTHING_MODES}, got {self.smoothing!r}")
        if self.smoothing_lag_frames < 0 or self.lip_head_window < 1:
            raise ValueError("smoothing_lag_frames must be >= 0 and lip_head_window >= 1")


class NeuralMotionStage:
    """Diffusion motion with controls; see the module docstring."""

    CONTROLS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "emotion": "a stored example's keypoint offset (engine emotion add), else the diffusion's emotion "
            "condition (Ditto's 8 MEAD classes)",
            "intensity": "scales the stored offset / blends the condition with neutral (0: neutral, 1: the emotion)",
            "emotion_b": "second emotion of the interpolation (EDTalk): offsets and conditions are blended",
            "mix": "interpolation weight of emotion_b",
            "mouth_emotion": "mouth keypoints from this emotion's stored example (PC-Talk region mixing)",
            "eyes_emotion": "eye and brow keypoints from this emotion's stored example",
            "pure_emotion": "true: a stored example minus its neutral example (PC-Talk); false: the example's "
            "expression replaces the portrait's",
            "emotion_source": "'label', or 'reference': the emotion of the avatar's stored reference clip",
            "lip_scale": "scales the lip keypoints' motion",
            "loudness_lips": "scales lip motion with the audio's loudness (PC-Talk)",
            "blink": "seeded blinks through the eye retargeting network (eye-open ratio -> 0)",
            "blink_rate": "blinks per second (0: none), from the next blink on",
            "gaze": "seeded eye-ball saccades",
            "head_pose": "'diffusion' (generated), 'fixed' (the portrait's) or 'reference' (the stored clip's "
            "trajectory)",
            "smoothing": "filter of the generated motion: none, one_euro or kalman (PC-Talk)",
            "ramp_s": "seconds every change ramps over",
        }
    )

    def __init__(
        self,
        denoiser: MaskedDenoiser,
        source: SourceFace,
        silence: np.ndarray,
        config: NeuralMotionConfig | None = None,
        source_cond: SourceCondition | None = None,
        bank: EmotionBank | None = None,
        lip_head: LipHead | None = None,
        bounds: MotionBounds | None = None,
        retargeting: Retargeting | None = None,
        stored: Watched[NeuralStored] | None = None,
    ) -> None:
        self.config = cfg = config or NeuralMotionConfig()
        self.source = source
        self.stitch = MotionStitch(source, gaze_fix=cfg.gaze_fix)
        self.scheduler = WindowScheduler(
            denoiser,
            silence,
            init_motion=self.stitch.x_s[0],
            source_cond=source_cond or SourceCondition.from_source(source),
            config=cfg.scheduler,
            bounds=bounds,
            to_params=decode_motion,
        )
        self.fps = self.scheduler.fps
        self.lookahead_frames = self.scheduler.lookahead_frames
        self.feature_dim = self.scheduler.feature_dim
        has_loudness = cfg.loudness_column is not None and self.feature_dim > self.scheduler.audio_dim
        self._loud_col = cfg.loudness_column if has_loudness else None
        if lip_head is not None and lip_head.in_dim != self.feature_dim:
            raise ValueError(f"lip head reads {lip_head.in_dim} features, the stream has {self.feature_dim}")
        self.lip_head = lip_head
        initial = ControlState(smoothing=cfg.smoothing)
        self.controls = MotionControls(source, bank, config=cfg.controller, state=initial, retargeting=retargeting)
        self.untrained = bool(getattr(denoiser, "untrained", False)) or lip_head is not None
        self._smoothing = cfg.smoothing
        self._smoother: ParamsSmoother | None = make_smoother(cfg.smoothing, cfg.smoothing_lag_frames, self.fps)
        self._silence = np.asarray(silence, np.float32).reshape(-1)
        self._stored = stored
        self._no_reference = "no reference clip is set for this avatar"
        self._pending: NeuralStored | None = None
        self._poll()
        self._install()
        self._new_stream()

    @property
    def state(self) -> ControlState:
        """The control state the stage runs (the session starts from it)."""
        return self.controls.state

    def _poll(self) -> None:
        """Look for examples added to or removed from the motion library (on the thread that checks controls); the
        stage's own thread installs them with the next control (:meth:`_install`), never in the middle of a frame."""
        fresh = self._stored.poll() if self._stored is not None else None
        if fresh is not None:
            self._pending = fresh

    def _install(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        bank, reference, why = pending
        self.controls.set_bank(bank)
        self._no_reference = why or self._no_reference
        if reference is not None or not self._uses_reference(self.controls.state):
            self.controls.set_reference(reference)

    @staticmethod
    def _uses_reference(state: ControlState) -> bool:
        return state.head_pose == "reference" or state.emotion_source == "reference"

    def _new_stream(self) -> None:
        self._rows: dict[int, np.ndarray] = {}  # recent feature rows by frame index (lip head, loudness)
        self._n_in = 0
        self.stitch.set_reference(None)
        self.controls.reset()
        if self._smoother is not None:
            self._smoother.reset()

    def check_controls(self, state: ControlState) -> None:
        """Refuse what the schema allows but this avatar's stored examples cannot give (with the reason)."""
        self._poll()
        pending = self._pending
        bank = pending[0] if pending is not None else self.controls.bank
        reference = pending[1] if pending is not None else self.controls.reference
        if reference is None and self._uses_reference(state):
            why = (pending[2] if pending is not None else "") or self._no_reference
            raise ControlValueError(f"head_pose / emotion_source 'reference': {why}")
        for key in ("mouth_emotion", "eyes_emotion"):
            name = getattr(state, key)
            if name is not None and not bank.has(name):
                raise ControlValueError(
                    f"{key} {name!r}: region mixing moves keypoints by a stored example, and {name!r} has none "
                    f"usable: {bank.why_missing(name)}"
                )
        if not state.pure_emotion and state.emotion_source == "label":
            used = [state.emotion, state.emotion_b, state.mouth_emotion, state.eyes_emotion]
            if not any(name is not None and bank.has(name) for name in used):
                raise ControlValueError(
                    f"pure_emotion false: only a stored example has an expression to put in place of the "
                    f"portrait's, and {state.emotion!r} has none usable: {bank.why_missing(state.emotion)}"
                )

    def apply_controls(self, state: ControlState) -> None:
        self._install()
        self.controls.update(state.as_dict())
        self.scheduler.set_emotion(self.controls.emotion_label())
        if state.smoothing != self._smoothing:
            cfg = self.config
            lag = max(cfg.smoothing_lag_frames, 1.0) if state.smoothing == "one_euro" else cfg.smoothing_lag_frames
            self._smoothing = state.smoothing
            self._smoother = make_smoother(state.smoothing, lag, self.fps)

    # --- MotionStage ---

    def push(self, features: np.ndarray) -> list[MotionFrame]:
        feats = np.asarray(features, np.float32)
        start, vectors = self.scheduler.push_vectors(feats)  # validates the rows
        for i, row in enumerate(feats):
            self._rows[self._n_in + i] = row
        self._n_in += feats.shape[0]
        return self._finish(start, vectors)

    def flush(self) -> list[MotionFrame]:
        start, vectors = self.scheduler.flush_vectors()
        frames = self._finish(start, vectors)
        self._new_stream()
        return frames

    def interrupt(self) -> None:
        self.scheduler.interrupt()
        n_out = self.scheduler.frames_emitted
        for f in [f for f in self._rows if f >= n_out]:
            del self._rows[f]
        self._n_in = n_out

    # --- internals ---

    @torch.inference_mode()
    def _finish(self, start: int, vectors: torch.Tensor) -> list[MotionFrame]:
        if vectors.shape[0] == 0:
            return []
        params = self.stitch(vectors)  # [N] relative to the source
        frames = []
        for i in range(vectors.shape[0]):
            f = start + i
            p = MotionParams(*(x[i : i + 1] for x in params))
            if self.lip_head is not None:
                p = p._replace(exp=p.exp + self.lip_head(self._window(f)).offsets)
            loud = None
            if self._loud_col is not None and f in self._rows:
                loud = float(self._rows[f][self._loud_col])
            if self._smoother is not None:
                p = self._smoother(p)
            p = self.controls.apply(p, f, loud)
            frames.append(MotionFrame(f, p))
        horizon = start + vectors.shape[0] - self.config.lip_head_window
        for old in [g for g in self._rows if g < horizon]:
            del self._rows[old]
        return frames

    def _window(self, f: int) -> torch.Tensor:
        rows = [self._rows.get(g, self._silence) for g in range(f - self.config.lip_head_window + 1, f + 1)]
        return torch.from_numpy(np.stack(rows))[None]  # [1, window, D]


def build_neural_motion(
    den: MaskedDenoiser,
    source: SourceFace,
    config: NeuralMotionConfig | None = None,
    *,
    silence: np.ndarray | None = None,
    source_cond: SourceCondition | None = None,
    bank: EmotionBank | None = None,
    lip_head: LipHead | None = None,
    retargeting: Retargeting | None = None,
    stored: Watched[NeuralStored] | None = None,
) -> NeuralMotionStage:
    """Neural motion stage for ``den`` driving ``source``.

    ``silence`` is the feature stage's silence row; by default the engine's log-mel stage (80 mels + loudness),
    which fits denoisers whose condition width is ``80 + 79`` (the ``logmel``/``tiny`` presets). HuBERT-conditioned
    denoisers need the HuBERT stage's ``silence()`` passed in.
    """
    if silence is None:
        audio_dim = int(den.config.cond_dim) - NON_AUDIO_DIM  # type: ignore[attr-defined]
        mel = LogMelConfig()
        if audio_dim != mel.n_mels:
            raise ValueError(
                f"denoiser expects {audio_dim} audio features, the default log-mel stage gives {mel.n_mels}: "
                "pass the feature stage's silence() (e.g. HubertStreaming)"
            )
        silence = LogMelFeatures(mel).silence()
    return NeuralMotionStage(
        den,
        source,
        silence,
        config,
        source_cond=source_cond,
        bank=bank,
        lip_head=lip_head,
        retargeting=retargeting,
        stored=stored,
    )
