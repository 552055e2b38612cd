"""The composition root: a runtime's renderer and every session's stages, assembled from two registries.

* :data:`RENDERERS`: ``classic`` (weight-free warp of the portrait) and ``neural`` (LivePortrait's warping network
  and decoder, run on a backend from :mod:`export.backends`).
* :data:`MOTIONS`: ``classic`` (analytic motion from loudness and spectrum), ``ditto`` (Ditto-compatible LMDM
  diffusion over sliding windows) and ``personal`` (the avatar's own heads, learned by ``engine personalize``).

Each entry says what it needs (imported weights or none), which renderers a motion generator can drive, and
(through its stage class's ``CONTROLS``) which controls it honours; the CLI's choices and ``/health`` are read from
here. Adding a motion generator is one new module with its stage plus one :class:`MotionEntry` below.

``mode`` picks the renderer and ``motion`` the generator; ``auto`` resolves from what is imported, and never picks
an untrained model silently: with LivePortrait weights but no Ditto weights, ``auto`` runs classic mode and the
banner names the missing piece (``--motion ditto`` runs the untrained denoiser anyway, and says so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from engine.audio.features import LogMelFeatures
from engine.audio.hubert import HubertStreaming
from engine.avatar.image import AvatarError
from engine.avatar.store import AvatarStore
from engine.models import liveportrait
from engine.motion import lmdm
from engine.motion.adapter import attach_stored_adapter
from engine.motion.base import FeatureStage, MotionStage
from engine.motion.classic import ClassicFeatures, ClassicMotion, ClassicMotionConfig
from engine.motion.control_schema import describe_schema
from engine.motion.library import MotionLibrary, classic_stored, neural_stored
from engine.motion.neural import NeuralMotionStage, build_neural_motion
from engine.motion.personal import PersonalMotion, PersonalMotionConfig
from engine.motion.personal_model import PersonalModel, PersonalModelError
from engine.motion.retarget import DEFAULT_EYE_RATIO, Retargeting, open_ratios
from engine.motion.shared_denoiser import SharedDenoiser
from engine.paths import default_ditto_dir, default_weights_dir
from engine.render.base import PreparedAvatar, Renderer
from engine.render.classic import ClassicRenderer, face_size
from engine.render.neural import NeuralRenderer
from engine.weights.checkpoint import RECORD_NAME
from export.backends import BACKEND_NAMES, BackendConfig, BackendError, DenoiserRuntime, RendererRuntime, get_backend
from streaming.batching import BatchConfig
from streaming.session import SessionConfig

MOTION_BATCHING = ("auto", "on", "off")
logger = logging.getLogger(__name__)

# (features, motion) for one session driving one prepared avatar
StageFactory = Callable[[PreparedAvatar], tuple[FeatureStage, MotionStage]]

CLASSIC_BANNER = "classic mode (weight-free): import LivePortrait and Ditto weights for neural rendering"


class PipelineError(RuntimeError):
    """The pipeline cannot be built as configured (missing weights, unusable backend, incompatible parts)."""


@dataclass(frozen=True)
class RuntimeConfig:
    mode: str = "auto"  # renderer: auto | a RENDERERS name
    motion: str = "auto"  # motion generator: auto | a MOTIONS name
    weights: str | None = None  # LivePortrait store (neural renderer); None: the engine home's
    motion_weights: str | None = None  # Ditto store (ditto motion); None: the engine home's
    preset: str = "tiny"  # renderer preset when no LivePortrait weights are imported (untrained)
    motion_preset: str = "tiny"  # LMDM preset when no Ditto weights are imported (untrained)
    backend: BackendConfig = field(default_factory=BackendConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    # diffusion steps of several sessions in one denoiser call (engine.motion.shared_denoiser): auto = on a GPU,
    # where a small call is mostly launch overhead; on a CPU a batch costs what its parts do and only adds waiting
    motion_batching: str = "auto"  # auto | on | off

    def __post_init__(self) -> None:
        if self.motion_batching not in MOTION_BATCHING:
            raise ValueError(f"motion_batching must be one of {list(MOTION_BATCHING)}, got {self.motion_batching!r}")
        if self.mode not in ("auto", *RENDERERS):
            raise ValueError(f"mode: unknown renderer {self.mode!r}; choose one of {['auto', *RENDERERS]}")
        if self.motion not in ("auto", *MOTIONS):
            raise ValueError(f"motion: unknown motion generator {self.motion!r}; choose one of {['auto', *MOTIONS]}")
        if self.backend.name not in BACKEND_NAMES:
            raise ValueError(f"backend: unknown backend {self.backend.name!r}; choose one of {list(BACKEND_NAMES)}")


@dataclass(frozen=True)
class RendererEntry:
    summary: str
    needs: str | None  # the weights its real output needs ("liveportrait"); None: weight-free
    build: Callable[[RuntimeConfig], Renderer]


class MotionBuild(NamedTuple):
    stages: StageFactory  # the per-session feature and motion stages
    untrained: bool  # runs on random weights
    stats: Callable[[], dict[str, float]] | None = None  # runtime-wide numbers for /metrics (shared parts)


@dataclass(frozen=True)
class MotionEntry:
    summary: str
    needs: str | None  # the weights its real output needs ("ditto"); None: weight-free
    renderers: tuple[str, ...]  # the renderers whose keypoint space it drives
    controls: Mapping[str, str]  # honoured control key -> what it does (the stage class's CONTROLS)
    build: Callable[[RuntimeConfig, Renderer], MotionBuild]


@dataclass(frozen=True)
class Pipeline:
    """What :func:`build` assembled: the runtime's renderer and the per-session stage factory."""

    config: RuntimeConfig
    renderer_name: str
    motion_name: str
    renderer: Renderer
    stages: StageFactory
    controls: Mapping[str, str]
    motion_untrained: bool
    notes: tuple[str, ...] = ()  # what auto resolution decided and why (shown with the banner)
    motion_stats: Callable[[], dict[str, float]] | None = None  # the motion generator's shared parts, for /metrics

    @property
    def untrained(self) -> bool:
        return bool(self.renderer.untrained) or self.motion_untrained

    @property
    def banner(self) -> str | None:
        """One line a user must see (page, CLI, log): why the output is not what imported weights would give."""
        if self.renderer.untrained:
            return "untrained renderer weights: the video is noise; import LivePortrait weights"
        if self.motion_untrained:
            return "untrained motion weights: the motion is random; import Ditto weights (engine weights import ditto)"
        if self.renderer_name == "classic":
            return " — ".join((CLASSIC_BANNER, *self.notes))
        return None

    def describe(self) -> dict[str, Any]:
        backend = self.config.backend
        return {
            "mode": self.renderer_name,
            "motion": self.motion_name,
            "controls": sorted(self.controls),
            "control_schema": describe_schema(self.controls),
            "untrained": self.untrained,
            "banner": self.banner,
            "size": self.renderer.size,
            "fps": self.config.session.fps,
            "backend": {"name": backend.name, "device": str(self.device), "dtype": str(self.dtype)},
        }

    @property
    def device(self) -> Any:
        return getattr(self.renderer, "device", "cpu")

    @property
    def dtype(self) -> Any:
        return str(getattr(self.renderer, "dtype", "float32")).removeprefix("torch.")


# --- weights -----------------------------------------------------------------------------------------------


def store_imported(directory: str | Path | None, default: Path) -> bool:
    return ((Path(directory) if directory is not None else default) / RECORD_NAME).is_file()


def liveportrait_imported(config: RuntimeConfig) -> bool:
    return store_imported(config.weights, default_weights_dir())


def ditto_imported(config: RuntimeConfig) -> bool:
    return store_imported(config.motion_weights, default_ditto_dir())


def _require_store(directory: str | None, default: Path, kind: str, command: str) -> None:
    """An explicitly given store must hold weights: a typo must not fall back to random weights."""
    if directory is not None and not store_imported(directory, default):
        raise PipelineError(
            f"{directory} holds no imported {kind} weights (no {RECORD_NAME}); import yours with '{command}'"
        )


def _backend(config: RuntimeConfig) -> Any:
    try:
        return get_backend(config.backend)
    except BackendError as exc:
        raise PipelineError(str(exc)) from exc


# --- renderers -----------------------------------------------------------------------------------------------


def _build_classic_renderer(config: RuntimeConfig) -> Renderer:
    if config.backend.name != "eager":
        raise PipelineError(
            f"backend {config.backend.name!r} runs neural networks, but the classic renderer runs none: "
            "use the neural renderer (--mode neural) or the eager backend"
        )
    return ClassicRenderer(device=config.backend.torch_device())


def neural_renderer(weights: str | None, backend: BackendConfig | None = None, preset: str = "tiny") -> NeuralRenderer:
    """The neural renderer of an imported LivePortrait store (e.g. to compute an avatar's features once); ``None``:
    the engine home's store, or untrained ``preset`` weights when none is imported (its ``untrained`` says so)."""
    config = RuntimeConfig(mode="neural", weights=weights, preset=preset, backend=backend or BackendConfig())
    renderer = _build_neural_renderer(config)
    assert isinstance(renderer, NeuralRenderer)
    return renderer


def _build_neural_renderer(config: RuntimeConfig) -> Renderer:
    _require_store(config.weights, default_weights_dir(), "LivePortrait", "engine weights import liveportrait SRC")
    nets = liveportrait.load_or_build(Path(config.weights) if config.weights else None, config.preset)
    backend = _backend(config)
    try:
        return NeuralRenderer(RendererRuntime(nets, backend))
    except BackendError as exc:
        raise PipelineError(f"renderer on backend {config.backend.name!r}: {exc}") from exc


RENDERERS: dict[str, RendererEntry] = {
    "classic": RendererEntry(
        "warp of the portrait by a landmark mesh, no learned weights", None, _build_classic_renderer
    ),
    "neural": RendererEntry("LivePortrait warping network + SPADE decoder", "liveportrait", _build_neural_renderer),
}


# --- motion generators -----------------------------------------------------------------------------------------


def _build_classic_motion(config: RuntimeConfig, renderer: Renderer) -> MotionBuild:
    fps = config.session.fps

    def stages(prepared: PreparedAvatar) -> tuple[FeatureStage, MotionStage]:
        # the source face lets pure_emotion = false see the portrait's own expression; stored examples and the
        # reference clip come from the motion library (engine emotion add, engine avatar reference)
        avatar = prepared.avatar
        motion = ClassicMotion(
            ClassicMotionConfig(fps=fps),
            face_size=face_size(prepared.source),
            source=prepared.source,
            stored=classic_stored(MotionLibrary(), avatar.name, avatar.landmarks),
        )
        return ClassicFeatures(fps), motion

    return MotionBuild(stages, False)


def _build_ditto_motion(config: RuntimeConfig, renderer: Renderer) -> MotionBuild:
    _require_store(config.motion_weights, default_ditto_dir(), "Ditto", "engine weights import ditto SRC")
    ditto = Path(config.motion_weights) if config.motion_weights is not None else default_ditto_dir()
    hubert: Path | None = None
    if (ditto / RECORD_NAME).is_file():
        denoiser = lmdm.load(ditto)
        attach_stored_adapter(denoiser, ditto)  # an EAT emotion adapter trained on it (engine train adapter)
        if int(denoiser.config.cond_dim) != lmdm.logmel_cond_dim():
            hubert = lmdm.hubert_onnx_path(ditto)
            if hubert is None:
                raise PipelineError(
                    f"{ditto}: the imported Ditto denoiser is HuBERT-conditioned but the store has no HuBERT "
                    "ONNX model; import Ditto again from a folder that holds hubert_streaming_fix_kv.onnx"
                )
    else:
        denoiser = lmdm.build(config.motion_preset, cond_dim=lmdm.logmel_cond_dim())
    denoiser.eval()
    backend = _backend(config)
    try:
        # batch 2: classifier-free guidance runs the cond and uncond passes as one batch
        runtime = DenoiserRuntime(denoiser, backend, batch=2)
    except BackendError as exc:
        raise PipelineError(f"denoiser on backend {config.backend.name!r}: {exc}") from exc
    batching = config.motion_batching == "on" or (config.motion_batching == "auto" and backend.device.type == "cuda")
    shared: SharedDenoiser | DenoiserRuntime = SharedDenoiser(runtime) if batching else runtime

    def stages(prepared: PreparedAvatar) -> tuple[FeatureStage, MotionStage]:
        features: HubertStreaming | LogMelFeatures = HubertStreaming(hubert) if hubert else LogMelFeatures()
        stored = None
        if isinstance(renderer, NeuralRenderer):  # stored examples live in this renderer's keypoint space
            stored = neural_stored(MotionLibrary(), prepared.avatar.name, prepared.source, renderer.nets.weights_id)
        motion = build_neural_motion(
            shared,
            prepared.source,
            silence=features.silence(),
            retargeting=_retargeting(renderer, prepared),
            stored=stored,
        )
        return features, motion

    stats = shared.stats.as_metrics if isinstance(shared, SharedDenoiser) else None
    return MotionBuild(stages, bool(denoiser.untrained), stats)


def _retargeting(renderer: Renderer, prepared: PreparedAvatar) -> Retargeting | None:
    """The renderer's eye and lip retargeting networks for this avatar: blinks close its eyes from their own open
    ratio (measured on its landmarks; a typical ratio without them), an open mouth closes at rest."""
    if not isinstance(renderer, NeuralRenderer):
        return None
    avatar = prepared.avatar
    ratios = open_ratios(avatar.landmarks, avatar.landmark_scheme)
    eye, lip = ratios if ratios is not None else (DEFAULT_EYE_RATIO, None)
    return Retargeting(prepared.source, renderer.nets.eye, renderer.nets.lip, eye, lip)


PERSONAL_SPACES = {"classic": "mesh", "neural": "keypoints"}  # renderer -> the motion space its personal model uses


def load_personal_model(prepared: PreparedAvatar, renderer_name: str) -> PersonalModel:
    """The stored personal model of ``prepared``'s avatar for this renderer (raises :class:`PipelineError`)."""
    avatar = prepared.avatar
    space = PERSONAL_SPACES[renderer_name]
    how = f"make one with 'engine personalize CLIP --avatar {avatar.name}'"
    if avatar.name == "default":  # the drawn portrait is nobody: personalize a stored photo of the person
        how = (
            "add the person's photo (engine avatar add PHOTO --name NAME), then 'engine personalize CLIP --avatar NAME'"
        )
    store = AvatarStore()
    try:
        stored = store.info(avatar.name).content_hash == avatar.content_hash
        directory = store.personal_dir(avatar.name, space) if stored else None
    except AvatarError:
        directory = None
    if directory is None:
        raise PipelineError(f"avatar {avatar.name!r} is not a stored avatar, so it has no personal motion model; {how}")
    if not directory.is_dir():
        others = store.personal_spaces(avatar.name)
        extra = f" (it has one for the {', '.join(others)} space)" if others else ""
        raise PipelineError(
            f"avatar {avatar.name!r} has no personal motion model for the {renderer_name} renderer ({space} "
            f"space){extra}; {how}"
        )
    try:
        return PersonalModel.load(directory)
    except PersonalModelError as exc:
        raise PipelineError(f"avatar {avatar.name!r}: {exc}; personalize it again") from exc


def _build_personal_motion(config: RuntimeConfig, renderer: Renderer) -> MotionBuild:
    fps = config.session.fps

    def stages(prepared: PreparedAvatar) -> tuple[FeatureStage, MotionStage]:
        model = load_personal_model(prepared, renderer.name)
        unit = face_size(prepared.source) if renderer.name == "classic" else 1.0
        features = LogMelFeatures()
        motion = PersonalMotion(model, prepared.source, features.silence(), unit, PersonalMotionConfig(fps=fps))
        return features, motion

    return MotionBuild(stages, False)


MOTIONS: dict[str, MotionEntry] = {
    "classic": MotionEntry(
        "analytic jaw, lips, blinks and head sway from loudness and spectrum, no learned weights",
        None,
        ("classic",),
        ClassicMotion.CONTROLS,
        _build_classic_motion,
    ),
    "ditto": MotionEntry(
        "Ditto-compatible motion diffusion (LMDM) over sliding windows",
        "ditto",
        ("neural",),
        NeuralMotionStage.CONTROLS,
        _build_ditto_motion,
    ),
    "personal": MotionEntry(
        "the avatar's own lip, head and emotion heads learned from its clips (engine personalize)",
        None,
        ("classic", "neural"),
        PersonalMotion.CONTROLS,
        _build_personal_motion,
    ),
}


# --- assembly --------------------------------------------------------------------------------------------------


def resolve(config: RuntimeConfig) -> tuple[str, str, tuple[str, ...]]:
    """``(renderer, motion, notes)`` for ``config``: ``auto`` resolved from the imported weights."""
    notes: list[str] = []
    renderer = config.mode
    motion = config.motion
    if renderer == "auto":
        if liveportrait_imported(config) and (motion == "ditto" or ditto_imported(config)):
            renderer = "neural"
        else:
            renderer = "classic"
            if liveportrait_imported(config):
                # the neural renderer with untrained motion would move the face at random: say what is missing
                notes.append("LivePortrait weights found but no Ditto motion weights (engine weights import ditto)")
    if motion == "auto":
        motion = next(name for name, entry in MOTIONS.items() if renderer in entry.renderers)
    return renderer, motion, tuple(notes)


def build(config: RuntimeConfig) -> Pipeline:
    """Build the renderer and the motion generator ``config`` asks for (see the module docstring)."""
    renderer_name, motion_name, notes = resolve(config)
    motion_entry = MOTIONS[motion_name]
    if renderer_name not in motion_entry.renderers:
        raise PipelineError(
            f"motion generator {motion_name!r} drives the {', '.join(motion_entry.renderers)} renderer, "
            f"not {renderer_name!r}"
        )
    renderer = RENDERERS[renderer_name].build(config)
    motion = motion_entry.build(config, renderer)
    pipeline = Pipeline(
        config,
        renderer_name,
        motion_name,
        renderer,
        motion.stages,
        MappingProxyType(dict(motion_entry.controls)),
        motion.untrained,
        notes,
        motion.stats,
    )
    logger.info(
        "pipeline: renderer %s, motion %s%s",
        renderer_name,
        motion_name,
        f" ({pipeline.banner})" * bool(pipeline.banner),
    )
    return pipeline


def registry() -> dict[str, Any]:
    """The registries as JSON-able facts (``/health``, ``engine serve --help``)."""
    return {
        "renderers": {n: {"summary": e.summary, "needs": e.needs} for n, e in RENDERERS.items()},
        "motions": {
            n: {"summary": e.summary, "needs": e.needs, "renderers": list(e.renderers), "controls": sorted(e.controls)}
            for n, e in MOTIONS.items()
        },
    }
