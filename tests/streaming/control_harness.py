"""Sessions built the way ``engine serve`` builds them, for the control-effect tests.

:func:`build_library` makes the stored examples with the real commands (``engine emotion add``, ``engine avatar
add``, ``engine avatar reference``) into an engine home; :class:`Renders` runs sessions of a
:class:`~streaming.runtime.Runtime` (``Runtime.create(RuntimeConfig(mode=...))`` + ``open_session``) and keeps, per
frame, the picture and the motion the stage produced (cached per process: a session is deterministic, so a
baseline is computed once for every test that compares against it).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import skimage.data
import torch
from click.testing import CliRunner
from PIL import Image

from engine.avatar.default import default_landmarks
from engine.motion.base import MotionFrame
from streaming.cli import main
from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime
from streaming.session import SessionConfig
from streaming.testing import drain
from tests.engine.motion.example_media import clip, photo, speech

LANDMARKS = Path(__file__).resolve().parents[1] / "data" / "landmarks" / "astronaut_68.json"
STILL: dict[str, Any] = {"head_pose": "fixed", "blink": False, "gaze": False, "ramp_s": 0.0}
Box = tuple[int, int, int, int]


def cli(home: Path, *args: str) -> str:
    result = CliRunner().invoke(main, list(args), env={"AVATAR_ENGINE_HOME": str(home)})
    assert result.exit_code == 0, f"engine {' '.join(args)}:\n{result.output}"
    return result.output


def build_library(home: Path, work: Path) -> dict[str, str]:
    """Stored examples made by the engine's commands -> what each printed."""
    for name in ("neutral", "happy", "surprised"):
        photo(work, name)
    path, _ = clip(work, frames=12)
    out = {}
    for name in ("happy", "surprised"):  # both spaces: untrained tiny keypoints and the classic landmark mesh
        out[name] = cli(home, "emotion", "add", name, "--from", str(work / f"{name}.png"), "--neutral",
                        str(work / "neutral.png"), "--mode", "neural")  # fmt: skip
    Image.fromarray(skimage.data.astronaut()).save(work / "astronaut.png")
    out["astronaut"] = cli(home, "avatar", "add", str(work / "astronaut.png"), "--name", "astronaut", "--landmarks",
                           str(LANDMARKS))  # fmt: skip
    out["reference"] = cli(home, "avatar", "reference", "default", "--clip", str(path), "--mode", "neural")
    return out


def copy_home(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


class Run(NamedTuple):
    rgb: np.ndarray  # [T, S, S, 3] float64 0..255
    exp: np.ndarray  # [T, 21, 3] the motion stage's expression
    pose: np.ndarray  # [T, 6] pitch, yaw, roll, tx, ty, scale


AUDIO: dict[str, np.ndarray] = {
    "speech": speech(0.8),  # 20 frames: the first blink at 2 / s comes at frame 9 (classic) / 12 (neural)
    "long": speech(1.0),  # 25: neural gaze's first saccade comes at frame 22
    "quiet": speech(0.8, level=0.02),
}


_RUNS: dict[tuple[Any, ...], Run] = {}  # per test process: sessions are deterministic


class Renders:
    """Session outputs per (mode, avatar, controls, audio), computed on first use on one runtime per mode (created
    in the running loop: a module-scoped loop shares them between tests)."""

    def __init__(self, runtimes: dict[str, Runtime]) -> None:
        self.runtimes = runtimes

    async def run(self, mode: str, controls: Mapping[str, Any], audio: str = "speech", avatar: str = "default") -> Run:
        key = (mode, avatar, tuple(sorted(controls.items())), audio)
        if key not in _RUNS:
            if mode not in self.runtimes:
                self.runtimes[mode] = Runtime.create(RuntimeConfig(mode=mode, session=SessionConfig(realtime=False)))
            _RUNS[key] = await _session(self.runtimes[mode], dict(controls), AUDIO[audio], avatar)
        return _RUNS[key]


async def _session(runtime: Runtime, controls: dict[str, Any], audio: np.ndarray, avatar: str) -> Run:
    session = await runtime.open_session(avatar, controls=controls)
    motion: list[MotionFrame] = []
    for name in ("push", "flush"):  # what the motion stage produced, frame by frame
        call = getattr(session.motion, name)

        def recorded(*args: Any, _call: Any = call) -> list[MotionFrame]:
            out: list[MotionFrame] = _call(*args)
            motion.extend(out)
            return out

        setattr(session.motion, name, recorded)
    session.push_audio(audio, 16_000)
    session.end_of_stream()
    frames, _ = await drain(session)
    await runtime.close_session(session)
    motion.sort(key=lambda f: f.frame_index)
    p = [f.params for f in motion]
    pose = torch.stack([torch.cat([x.pitch, x.yaw, x.roll, x.t[0, :2], x.scale[0]]) for x in p]).double().numpy()
    return Run(
        np.stack([f.rgb for f in frames]).astype(np.float64),
        torch.cat([x.exp for x in p]).double().numpy(),
        pose,
    )


def regions(landmarks: np.ndarray | None = None) -> dict[str, Box]:
    """Picture regions of the default avatar's crop (brows, eyes, mouth, the background corners)."""
    lm = default_landmarks() if landmarks is None else landmarks
    iod = float(np.linalg.norm(lm[42:48].mean(0) - lm[36:42].mean(0)))

    def box(lo: int, hi: int, mx: float, up: float, down: float) -> Box:
        p = lm[lo:hi]
        return (int(p[:, 0].min() - mx), int(p[:, 1].min() - up), int(p[:, 0].max() + mx), int(p[:, 1].max() + down))

    return {
        "brows": box(17, 27, 0.08 * iod, 0.12 * iod, 0.03 * iod),
        "eyes": box(36, 48, 0.05 * iod, 0.04 * iod, 0.04 * iod),
        "mouth": box(48, 68, 0.1 * iod, 0.05 * iod, 0.3 * iod),
        "background": (0, 0, 40, 40),
    }


def picture_effect(a: Run, b: Run, box: Box) -> float:
    """The largest per-frame mean absolute difference (0..255 levels) inside ``box``."""
    x0, y0, x1, y1 = box
    n = min(len(a.rgb), len(b.rgb))
    return float(np.abs(a.rgb[:n, y0:y1, x0:x1] - b.rgb[:n, y0:y1, x0:x1]).mean(axis=(1, 2, 3)).max())


def keypoint_effect(a: Run, b: Run, keypoints: tuple[int, ...] | list[int]) -> float:
    """The largest expression difference on ``keypoints`` over every frame."""
    n = min(len(a.exp), len(b.exp))
    return float(np.abs(a.exp[:n, list(keypoints)] - b.exp[:n, list(keypoints)]).max()) if keypoints else 0.0
