"""The one control vocabulary of the engine: names, types, ranges, and the validated state they build.

Every motion generator, transport and client speaks this schema (the CLI's ``--control key=value``, the page,
the data channel, the websocket, Python). A generator declares which of these controls it honours
(:class:`Controllable`); a control it cannot honour is refused with the reason, never acknowledged and ignored.

Controls (seed papers): emotion x intensity; interpolation between two emotions (EDTalk); region mixing and
pure-emotion subtraction ``P(e) - P(neutral)`` (PC-Talk); emotion from a reference clip (EP-Talk); lip scale and
loudness-scaled lips (PC-Talk); blinks, blink rate and gaze; head pose mode; temporal smoothing of the generated
motion (One-Euro, or PC-Talk's Kalman filter); the ramp time of every change. Invalid messages raise
:class:`ControlValueError` (a ``ValueError``) and the last valid state stays. :func:`describe_schema` is the schema as
JSON (``/health``'s ``control_schema``, which the page builds its controls from).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from engine.motion.emotion import EMOTIONS

HEAD_POSE_MODES = ("diffusion", "reference", "fixed")
EMOTION_SOURCES = ("label", "reference")
SMOOTHING_MODES = ("none", "one_euro", "kalman")


class ControlValueError(ValueError):
    """A control message or value is invalid; the previous state stays in effect."""


# name -> (kind, bounds or choices)
CONTROL_SPEC: dict[str, tuple[str, Any]] = {
    "emotion": ("emotion", None),
    "intensity": ("float", (0.0, 1.5)),
    "emotion_b": ("emotion?", None),
    "mix": ("float", (0.0, 1.0)),
    "mouth_emotion": ("emotion?", None),
    "eyes_emotion": ("emotion?", None),
    "pure_emotion": ("bool", None),
    "emotion_source": ("choice", EMOTION_SOURCES),
    "lip_scale": ("float", (0.0, 3.0)),
    "loudness_lips": ("bool", None),
    "blink": ("bool", None),
    "blink_rate": ("float", (0.0, 2.0)),
    "gaze": ("bool", None),
    "head_pose": ("choice", HEAD_POSE_MODES),
    "smoothing": ("choice", SMOOTHING_MODES),
    "ramp_s": ("float", (0.0, 5.0)),
}


def _validate_value(name: str, value: Any) -> Any:
    kind, extra = CONTROL_SPEC[name]
    if kind in ("emotion", "emotion?"):
        if value is None and kind == "emotion?":
            return None
        if not isinstance(value, str) or value.lower() not in EMOTIONS:
            raise ControlValueError(f"{name}: unknown emotion {value!r}; choose one of {list(EMOTIONS)}")
        return value.lower()
    if kind == "bool":
        if not isinstance(value, bool):
            raise ControlValueError(f"{name}: expected true or false, got {value!r}")
        return value
    if kind == "choice":
        if value not in extra:
            raise ControlValueError(f"{name}: expected one of {list(extra)}, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ControlValueError(f"{name}: expected a number, got {value!r}")
    lo, hi = extra
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ControlValueError(f"{name}: {value!r} is outside [{lo}, {hi}]")
    return float(value)


def validate_control(message: Mapping[str, Any]) -> dict[str, Any]:
    """Check a control message (unknown keys, types, ranges, NaN) -> normalised copy. Raises ControlValueError."""
    if not isinstance(message, Mapping):
        raise ControlValueError(f"a control message must be a JSON object, got {type(message).__name__}")
    unknown = sorted(set(message) - set(CONTROL_SPEC))
    if unknown:
        raise ControlValueError(f"unknown control(s) {unknown}; known: {sorted(CONTROL_SPEC)}")
    return {name: _validate_value(name, value) for name, value in message.items()}


@dataclass(frozen=True)
class ControlState:
    emotion: str = "neutral"
    intensity: float = 1.0  # 0..1.5
    emotion_b: str | None = None  # interpolation partner (EDTalk)
    mix: float = 0.0  # 0: emotion only, 1: emotion_b only
    mouth_emotion: str | None = None  # region mixing (PC-Talk): mouth keypoints from this emotion
    eyes_emotion: str | None = None  # ... eye / brow keypoints from this one
    pure_emotion: bool = True  # P(e) - P(neutral): only what the emotion adds
    emotion_source: str = "label"  # "reference": the emotion of the reference clip
    lip_scale: float = 1.0
    loudness_lips: bool = True
    blink: bool = True
    blink_rate: float = 0.3  # blinks per second
    gaze: bool = True
    head_pose: str = "diffusion"
    smoothing: str = "one_euro"  # filter of the generated motion (a generator may start from its own default)
    ramp_s: float = 0.3

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _validate_value(field.name, getattr(self, field.name))

    def apply(self, message: Mapping[str, Any]) -> ControlState:
        return dataclasses.replace(self, **validate_control(message))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe_schema(honoured: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The schema as JSON: per control its ``kind`` (``emotion``, ``emotion?`` = an emotion or none, ``bool``,
    ``choice``, ``float``), ``min``/``max`` or ``choices``, the ``default``, and, given a generator's ``CONTROLS``,
    whether it is ``honoured`` and what it ``does`` there."""
    defaults = ControlState().as_dict()
    out: dict[str, dict[str, Any]] = {}
    for name, (kind, extra) in CONTROL_SPEC.items():
        entry: dict[str, Any] = {"kind": kind, "default": defaults[name]}
        if kind in ("emotion", "emotion?"):
            entry["choices"] = list(EMOTIONS)
        elif kind == "choice":
            entry["choices"] = list(extra)
        elif kind == "float":
            entry["min"], entry["max"] = extra
        if honoured is not None:
            entry["honoured"] = name in honoured
            if name in honoured:
                entry["does"] = honoured[name]
        out[name] = entry
    return out


@runtime_checkable
class Controllable(Protocol):
    """A motion stage that takes live controls. The session validates a message against the schema, checks
    that every key is one the stage honours (``CONTROLS``) and that the stage can honour the values
    (``check_controls``, synchronous: the acknowledgement stays truthful), then hands the new state to
    ``apply_controls`` on the stage's own thread, in order with the audio."""

    CONTROLS: ClassVar[Mapping[str, str]]  # honoured control key -> what it does in this generator

    def check_controls(self, state: ControlState) -> None:
        """Raise :class:`ControlValueError` when ``state`` asks for something this stage cannot do."""
        ...

    def apply_controls(self, state: ControlState) -> None: ...
