"""Contact sheets of classic mode -> docs/img/classic_*.png (look at them after changing classic motion/rendering).

    python benchmarks/classic_sheets.py [--out docs/img]

Sheets: the 8 emotions at intensity 1 on the default avatar and on the astronaut photo
(``skimage.data.astronaut()`` with the hand-placed landmarks in ``tests/data/landmarks/astronaut_68.json``), an
opening-mouth sequence, a blink sequence, and region mixing / gaze examples. Each frame comes from
:class:`ClassicMotion` with the head held still, so only the control under test changes the picture.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from engine.avatar.default import default_avatar
from engine.avatar.face import FaceLocator
from engine.avatar.prepare import prepare_avatar
from engine.avatar.record import Avatar
from engine.motion.classic import ClassicMotion, ClassicMotionConfig
from engine.motion.control_schema import ControlState
from engine.motion.emotion import EMOTIONS
from engine.render.base import PreparedAvatar
from engine.render.classic import ClassicRenderer, face_size

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT_LANDMARKS = ROOT / "tests" / "data" / "landmarks" / "astronaut_68.json"


def astronaut_avatar() -> Avatar:
    """The astronaut photo as an avatar: crop placed from its hand-placed landmarks (no detector involved)."""
    from skimage import data  # optional dependency of this script only

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "astronaut.png"
        cv2.imwrite(str(path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
        return prepare_avatar(path, "astronaut", landmarks_file=ASTRONAUT_LANDMARKS, locator=FaceLocator(None, False))


def render_state(
    renderer: ClassicRenderer,
    prepared: PreparedAvatar,
    state: ControlState,
    frames: int = 12,
    loudness: Callable[[int], float] | None = None,
    seed: int = 0,
    keep: Callable[[int], bool] | None = None,
) -> list[np.ndarray]:
    """Frames ``[H, W, 3]`` uint8 of ``frames`` motion steps under ``state`` (head still unless the state says);
    ``keep``: which frame indices to render (default: the last one)."""
    motion = ClassicMotion(ClassicMotionConfig(seed=seed), face_size=face_size(prepared.source), source=prepared.source)
    motion.apply_controls(dataclasses.replace(state, ramp_s=0.0))
    rows = np.zeros((frames + motion.lookahead_frames, 4), dtype=np.float32)
    if loudness is not None:
        rows[:, 0] = [loudness(i) for i in range(len(rows))]
    out = []
    for f in motion.push(rows):
        if not (keep(f.frame_index) if keep is not None else f.frame_index == frames - 1):
            continue
        kp = renderer.drive(prepared, f.params)
        img = renderer.render([prepared], kp)[0].permute(1, 2, 0).numpy()
        out.append((img * 255 + 0.5).astype(np.uint8))
    return out


def still(**controls: object) -> ControlState:
    base = {"head_pose": "fixed", "blink": False, "gaze": False}
    base.update(controls)
    return ControlState(**base)  # type: ignore[arg-type]


def face_box(prepared: PreparedAvatar) -> tuple[int, int, int, int]:
    """A square around the face: brows to chin, ear to ear, with some forehead."""
    lm = prepared.avatar.landmarks
    assert lm is not None
    width = float(lm[16, 0] - lm[0, 0])
    top, bottom = float(lm[17:27, 1].min()) - 0.3 * width, float(lm[8, 1]) + 0.08 * width
    side = int(max(bottom - top, 1.15 * width))
    cx = float(lm[[0, 16], 0].mean())
    x0, y0 = int(cx - side / 2), int(top)
    return x0, y0, x0 + side, y0 + side


def tile(img: np.ndarray, box: tuple[int, int, int, int], label: str, size: int = 232) -> np.ndarray:
    x0, y0, x1, y1 = box
    pad = np.pad(img, ((512, 512), (512, 512), (0, 0)), mode="edge")
    crop = pad[y0 + 512 : y1 + 512, x0 + 512 : x1 + 512]
    t = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    t = np.ascontiguousarray(t)
    cv2.rectangle(t, (0, size - 24), (size, size), (255, 255, 255), -1)
    cv2.putText(t, label, (6, size - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (20, 20, 20), 1, cv2.LINE_AA)
    return t


def sheet(rows: list[list[np.ndarray]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    blank = np.full_like(rows[0][0], 255)
    return np.concatenate([np.concatenate(r + [blank] * (width - len(r)), 1) for r in rows], 0)


def save(path: Path, image: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    renderer = ClassicRenderer()
    avatars = {"default": renderer.prepare(default_avatar()), "astronaut": renderer.prepare(astronaut_avatar())}

    for name, prepared in avatars.items():
        box = face_box(prepared)
        tiles = [tile(render_state(renderer, prepared, still(emotion=e), 3)[-1], box, e) for e in EMOTIONS]
        save(args.out / f"classic_emotions_{name}.png", sheet([tiles[:4], tiles[4:]]))
    # a smiling photo: with pure_emotion off, the portrait's own smile is undone before the emotion is applied
    prepared = avatars["astronaut"]
    box = face_box(prepared)
    tiles = [
        tile(render_state(renderer, prepared, still(emotion=e, pure_emotion=False), 3)[-1], box, f"{e} (absolute)")
        for e in EMOTIONS
    ]
    save(args.out / "classic_emotions_astronaut_absolute.png", sheet([tiles[:4], tiles[4:]]))

    prepared = avatars["default"]
    box = face_box(prepared)
    mouth = []
    for level in (0.0, 0.35, 0.55, 0.7, 0.85, 1.0):
        frame = render_state(renderer, prepared, still(), 8, loudness=lambda i, v=level: v)[-1]
        mouth.append(tile(frame, box, f"loudness {level:.2f}"))
    astro = avatars["astronaut"]
    abox = face_box(astro)
    for level in (0.0, 0.5, 0.75, 1.0):
        frame = render_state(renderer, astro, still(), 8, loudness=lambda i, v=level: v)[-1]
        mouth.append(tile(frame, abox, f"astronaut {level:.2f}"))
    save(args.out / "classic_mouth.png", sheet([mouth[:5], mouth[5:]]))

    blink_rows = []
    for prep, bx in ((prepared, box), (astro, abox)):
        motion = ClassicMotion(ClassicMotionConfig(seed=1))
        motion.apply_controls(still(blink=True, blink_rate=2.0, ramp_s=0.0))
        lids = [float(f.params.exp[0, 11, 1]) for f in motion.push(np.zeros((42, 4), dtype=np.float32))]
        start = next(i for i, c in enumerate(lids) if c > 0)
        shown = range(start - 1, start + 7)
        frames = render_state(renderer, prep, still(blink=True, blink_rate=2.0), 40, seed=1, keep=shown.__contains__)
        blink_rows.append([tile(f, bx, f"t={(i - start) * 40} ms") for i, f in zip(shown, frames, strict=True)])
    save(args.out / "classic_blink.png", sheet(blink_rows))

    mixes = [
        ("happy, mix sad 0.5", still(emotion="happy", emotion_b="sad", mix=0.5)),
        ("mouth happy, eyes sad", still(emotion="neutral", mouth_emotion="happy", eyes_emotion="sad")),
        ("mouth sad, eyes happy", still(emotion="neutral", mouth_emotion="sad", eyes_emotion="happy")),
        ("surprised x0.5", still(emotion="surprised", intensity=0.5)),
        ("surprised x1.5", still(emotion="surprised", intensity=1.5)),
        ("angry x1.5", still(emotion="angry", intensity=1.5)),
    ]
    tiles = [tile(render_state(renderer, prepared, s, 3)[-1], box, label) for label, s in mixes]
    save(args.out / "classic_mixing.png", sheet([tiles[:3], tiles[3:]]))


if __name__ == "__main__":
    main()
