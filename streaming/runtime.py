"""The engine runtime: one renderer and one render worker per process, sessions opened on demand.

How a transport (server, CLI, client) opens a session::

    from streaming.runtime import Runtime, RuntimeConfig

    runtime = Runtime.create(RuntimeConfig(mode="classic"))  # inside a running event loop
    if runtime.untrained:
        print(runtime.untrained_message)  # show a banner: the output is noise
    session = await runtime.open_session("default")  # avatar name (None: the default avatar), or an Avatar
    session.control({"emotion": "happy", "intensity": 0.8})
    session.push_audio(pcm, 48_000)  # any rate, [n] or [n, channels], int16 or float32
    frame = await session.next_video()  # VideoFrame (pts = frame_index / fps), None after the end
    audio = await session.next_audio()  # OutputAudio: the input delayed to match the frames
    session.interrupt()  # barge-in
    await session.close()
    await runtime.aclose()  # every session, the worker task and its thread

Mode ``auto`` (the default) is neural when LivePortrait weights are imported, else classic (weight-free). Neural
mode without imported weights runs the ``preset`` networks on deterministic random weights: ``untrained`` is
True and the output is noise, which is what tests and benchmarks need and nothing else.

``backend`` (neural mode) names the :mod:`engine.backends` backend the renderer's networks and the motion denoiser
run on: ``eager`` (the default: the PyTorch modules, called directly), ``compile``, ``onnxruntime`` or
``tensorrt``. Classic mode runs no networks, so it accepts only ``eager`` and refuses another backend with an error
rather than silently ignoring it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.avatar.record import Avatar
from engine.motion.base import FeatureStage, MotionStage
from engine.paths import default_ditto_dir, default_weights_dir
from engine.render.base import PreparedAvatar, Renderer
from engine.weights import UNTRAINED_MESSAGE
from engine.weights.checkpoint import RECORD_NAME
from streaming.batching import BatchConfig, BatchRenderer
from streaming.clock import Clock, MonotonicClock
from streaming.session import Session, SessionConfig

if TYPE_CHECKING:
    from engine.backends import Backend
    from engine.motion.samplers.guidance import MaskedDenoiser

logger = logging.getLogger(__name__)

MODES = ("auto", "classic", "neural")

# (features, motion) for one session driving one prepared avatar
StageFactory = Callable[[PreparedAvatar], tuple[FeatureStage, MotionStage]]


class RuntimeBuildError(RuntimeError):
    """The runtime cannot be built as configured (missing module, unreadable weights)."""


@dataclass(frozen=True)
class RuntimeConfig:
    mode: str = "auto"  # auto | classic | neural
    weights: str | None = None  # LivePortrait store (neural); None: the engine home's
    motion_weights: str | None = None  # Ditto store (neural motion); None: the engine home's
    preset: str = "tiny"  # renderer preset when no LivePortrait weights are imported (neural)
    motion_preset: str = "tiny"  # LMDM preset when no Ditto weights are imported (neural)
    session: SessionConfig = field(default_factory=SessionConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    backend: str = "eager"  # engine.backends name for the neural networks (renderer and denoiser)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        check_backend_name(self.backend)


def check_backend_name(name: str) -> None:
    """``ValueError`` naming the backends usable on this machine when ``name`` is not a backend at all (whether the
    backend can run on the runtime's device is checked when the runtime is built)."""
    from engine.backends import BACKEND_NAMES, available_backends

    if name not in BACKEND_NAMES:
        usable = [n for n, reason in available_backends("cpu").items() if reason is None]
        raise ValueError(f"backend: unknown backend {name!r}; available here: {usable} (all: {list(BACKEND_NAMES)})")


def weights_imported(weights: str | Path | None) -> bool:
    directory = Path(weights) if weights is not None else default_weights_dir()
    return (directory / RECORD_NAME).is_file()


def resolve_mode(config: RuntimeConfig) -> str:
    if config.mode != "auto":
        return config.mode
    return "neural" if weights_imported(config.weights) else "classic"


class Runtime:
    """Owns the renderer, the shared render worker and the open sessions. Build with :meth:`create`."""

    def __init__(
        self,
        config: RuntimeConfig,
        renderer: Renderer,
        stages: StageFactory,
        *,
        clock: Clock | None = None,
        motion_untrained: bool = False,
    ) -> None:
        self.config = config
        self.mode = renderer.name
        self.renderer = renderer
        self.clock: Clock = clock or MonotonicClock()
        self._stages = stages
        self.worker = BatchRenderer(renderer, self.clock, config.batch)
        self.untrained = bool(renderer.untrained) or motion_untrained
        self.sessions: dict[str, Session] = {}
        self._prepared: dict[tuple[str, str], PreparedAvatar] = {}
        self._closed = False

    @property
    def untrained_message(self) -> str:
        return UNTRAINED_MESSAGE if self.untrained else ""

    @classmethod
    def create(cls, config: RuntimeConfig | None = None, *, clock: Clock | None = None) -> Runtime:
        """Build renderer and motion for ``config.mode``; call inside a running event loop."""
        config = config or RuntimeConfig()
        mode = resolve_mode(config)
        if mode == "neural":
            renderer, stages, motion_untrained = _build_neural(config)
        elif config.backend != "eager":
            why = " (mode auto found no imported LivePortrait weights)" if config.mode == "auto" else ""
            raise RuntimeBuildError(
                f"backend {config.backend!r} runs the neural networks, but the runtime is in classic mode{why}, "
                "which runs none: use mode neural, or backend eager"
            )
        else:
            renderer, stages, motion_untrained = _build_classic(config)
        if renderer.untrained or motion_untrained:
            logger.warning("runtime (%s mode): %s", mode, UNTRAINED_MESSAGE)
        return cls(config, renderer, stages, clock=clock, motion_untrained=motion_untrained)

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "size": self.renderer.size,
            "fps": self.config.session.fps,
            "untrained": self.untrained,
            "sessions": len(self.sessions),
            "max_batch": self.config.batch.max_batch,
            "backend": self.config.backend,
        }

    # --- avatars ---

    def load_avatar(self, name: str | None = None, image: str | Path | None = None) -> Avatar:
        """A stored avatar by name (None: the default avatar), or a portrait image prepared now (not stored)."""
        if image is not None:
            from engine.avatar.prepare import prepare_avatar

            path = Path(image)
            return prepare_avatar(path, name or path.stem)
        from engine.avatar.store import DEFAULT_NAME, AvatarStore

        return AvatarStore().get(name or DEFAULT_NAME)

    def prepare(self, avatar: Avatar) -> PreparedAvatar:
        """The renderer's per-avatar state (computed once per avatar and runtime)."""
        key = (avatar.name, avatar.content_hash)
        if key not in self._prepared:
            with torch.inference_mode():
                self._prepared[key] = self.renderer.prepare(avatar)
        return self._prepared[key]

    # --- sessions ---

    async def open_session(
        self,
        avatar: str | Avatar | None = None,
        *,
        config: SessionConfig | None = None,
        controls: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        """A new :class:`streaming.api.LiveSession` for ``avatar`` on the shared render worker."""
        if self._closed:
            raise RuntimeError("the runtime is closed")
        record = avatar if isinstance(avatar, Avatar) else self.load_avatar(avatar)
        prepared = self.prepare(record)
        features, motion = self._stages(prepared)
        cfg = config or self.config.session
        if cfg.fps != features.fps:
            raise ValueError(f"this runtime's feature stage runs at {features.fps} fps, not {cfg.fps}")
        session = Session(
            features=features,
            motion=motion,
            renderer=self.renderer,
            prepared=prepared,
            worker=self.worker,
            config=cfg,
            clock=self.clock,
            session_id=session_id,
        )
        if controls:
            try:
                session.control(controls)
            except Exception:
                await session.close()
                raise
        self.sessions[session.id] = session
        return session

    async def close_session(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        await session.close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(s.close() for s in self.sessions.values()))
        self.sessions.clear()
        await self.worker.aclose()


# --- builders per mode ---------------------------------------------------------------------------------------


def _build_neural(config: RuntimeConfig) -> tuple[Renderer, StageFactory, bool]:
    from engine.audio.features import LogMelFeatures
    from engine.models.liveportrait import load_or_build
    from engine.motion import lmdm
    from engine.motion.neural import build_neural_motion
    from engine.render.neural import NeuralRenderer

    weights = Path(config.weights) if config.weights is not None else None
    if weights is not None and not weights_imported(weights):
        raise FileNotFoundError(
            f"{weights} holds no imported LivePortrait weights (no {RECORD_NAME}); "
            "import yours with 'engine weights import liveportrait SRC --out DIR'"
        )
    nets = load_or_build(weights, config.preset)
    backend = _backend(config.backend, next(nets.appearance.parameters()).device)
    with _backend_errors(f"renderer on backend {config.backend!r}: "):
        renderer = NeuralRenderer(nets, backend=backend)
    ditto = Path(config.motion_weights) if config.motion_weights is not None else default_ditto_dir()
    hubert_path: Path | None = None
    if (ditto / RECORD_NAME).is_file():
        from engine.weights.ditto import hubert_onnx_path

        denoiser = lmdm.load(ditto)
        if int(denoiser.config.cond_dim) != lmdm.logmel_cond_dim():
            hubert_path = hubert_onnx_path(ditto)
            if hubert_path is None:
                raise FileNotFoundError(
                    f"{ditto}: the imported Ditto denoiser is HuBERT-conditioned but the store has no HuBERT "
                    "ONNX model; import Ditto again from a folder that holds hubert_streaming_fix_kv.onnx"
                )
    elif config.motion_weights is not None:
        raise FileNotFoundError(f"{ditto} holds no imported Ditto weights (no {RECORD_NAME})")
    else:
        denoiser = lmdm.build(config.motion_preset, cond_dim=lmdm.logmel_cond_dim())
    denoiser.eval()
    motion_untrained = bool(getattr(denoiser, "untrained", False))
    den: MaskedDenoiser = denoiser
    if backend is not None:
        from engine.backends import DenoiserRuntime

        with _backend_errors(f"denoiser on backend {config.backend!r}: "):
            # batch 2: classifier-free guidance runs the cond and uncond passes as one batch
            den = DenoiserRuntime(denoiser, backend, batch=2)

    def stages(prepared: PreparedAvatar) -> tuple[FeatureStage, MotionStage]:
        features: Any
        if hubert_path is not None:
            from engine.audio.hubert import HubertStreaming

            features = HubertStreaming(hubert_path)
        else:
            features = LogMelFeatures()
        motion = build_neural_motion(den, prepared.source, silence=features.silence())
        return features, motion

    return renderer, stages, motion_untrained


def _backend(name: str, device: torch.device) -> Backend | None:
    """The selected backend on ``device``; ``None`` for eager, which calls the modules directly (bit-identical to
    the reference path). An unusable backend is a :class:`RuntimeBuildError` saying why and listing usable ones."""
    if name == "eager":
        return None
    from engine.backends import get_backend

    with _backend_errors():  # its message names the backend and lists the usable ones
        return get_backend(name, device)


@contextmanager
def _backend_errors(context: str = "") -> Iterator[None]:
    """A backend that cannot be selected or cannot load a network fails the build as a :class:`RuntimeBuildError`
    (what transports report to the user) rather than as a bare runtime error."""
    from engine.backends import BackendError

    try:
        yield
    except BackendError as exc:
        raise RuntimeBuildError(f"{context}{exc}") from exc


def _build_classic(config: RuntimeConfig) -> tuple[Renderer, StageFactory, bool]:
    try:
        from engine.motion.classic import ClassicFeatures, ClassicMotion, ClassicMotionConfig
        from engine.render.classic import ClassicRenderer, face_size
    except ImportError as exc:  # the classic path lives in its own modules; say which one is missing
        raise RuntimeBuildError(f"classic mode is unavailable: {exc}") from exc

    renderer = ClassicRenderer()
    fps = config.session.fps

    def stages(prepared: PreparedAvatar) -> tuple[FeatureStage, MotionStage]:
        motion = ClassicMotion(ClassicMotionConfig(fps=fps), face_size=face_size(prepared.source))
        return ClassicFeatures(fps), ClassicControlled(motion)

    return renderer, stages, False


class ClassicControlled:
    """Classic motion with the session's control messages: ``emotion`` and ``intensity`` (the classic path has
    no other controls; other keys are errors, not silently ignored)."""

    KEYS = ("emotion", "intensity")

    def __init__(self, motion: Any) -> None:
        from engine.motion.classic import EMOTIONS

        self.motion = motion
        self.emotions = tuple(EMOTIONS)
        self.lookahead_frames = motion.lookahead_frames
        self.state: dict[str, Any] = {"emotion": "neutral", "intensity": 1.0}

    def push(self, features: Any) -> Any:
        return self.motion.push(features)

    def flush(self) -> Any:
        return self.motion.flush()

    def interrupt(self) -> None:
        self.motion.interrupt()

    def update_controls(self, message: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(message) - set(self.KEYS))
        if unknown:
            raise ValueError(f"unknown control(s) {unknown}; classic mode supports {list(self.KEYS)}")
        new = {**self.state, **message}
        emotion, intensity = new["emotion"], new["intensity"]
        if not isinstance(emotion, str) or emotion.lower() not in self.emotions:
            raise ValueError(f"emotion: unknown emotion {emotion!r}; choose one of {list(self.emotions)}")
        if isinstance(intensity, bool) or not isinstance(intensity, int | float) or not 0.0 <= intensity <= 1.5:
            raise ValueError(f"intensity: expected a number in [0, 1.5], got {intensity!r}")  # (NaN fails too)
        self.motion.set_emotion(emotion.lower(), float(intensity))
        self.state = {"emotion": emotion.lower(), "intensity": float(intensity)}
        return dict(self.state)


def with_session(config: RuntimeConfig, **changes: Any) -> RuntimeConfig:
    """``config`` with its session config changed (e.g. ``realtime=False`` for offline rendering)."""
    return replace(config, session=replace(config.session, **changes))
