"""Motion from examples: the expression and head pose of a photo or a clip, in both renderers' spaces.

``engine emotion add`` and ``engine avatar reference`` (and the server's emotion upload) run this:

1. :func:`read_example`: an image, or a clip's frames (PyAV) at a given rate or spread evenly over it;
2. :func:`track_faces`: the face of every frame found and cropped like an avatar's (:class:`FaceLocator`), with its
   landmarks (frames without a face are skipped);
3. the renderer's motion extractor (LivePortrait's M) on each crop -> expression deltas and pose (keypoint space),
   and the 68-point landmarks -> aligned classic keypoints and, by ``solvePnP`` on a mean 3-D face, the head pose
   (mesh space);
4. :func:`emotion_example` keeps the per-coordinate median over the frames (a robust average: a clip of an emotion
   also talks and blinks) of the example and of its neutral example; :func:`reference_clip` keeps the pose
   trajectory relative to the clip's median pose, its statistics and the clip's typical expression relative to the
   avatar's photo.

Without LivePortrait weights only the mesh space is made; with them, both. Untrained (random) weights make a
keypoint space of noise, which only tests use; the record says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
import torch

from engine.avatar.face import FaceLocator
from engine.avatar.image import AvatarError, load_image
from engine.avatar.landmarks import CLASSIC_SCHEMES
from engine.avatar.record import Avatar
from engine.keypoints import EMOTION, MotionParams, params_from_motion
from engine.motion.emotion import EMOTIONS, emotion_index
from engine.motion.library import (
    ALL_MEASURED,
    KEYPOINT_POSE,
    MESH_POSE,
    TEMPLATE_MEASURED,
    EmotionExample,
    KeypointEmotion,
    KeypointReference,
    MeshEmotion,
    MeshReference,
    ReferenceClip,
    aligned_shape,
    mesh_offsets,
    pose_stats,
)
from engine.render.neural import NeuralRenderer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
EMOTION_FRAMES = 32  # frames of a clip an emotion is the median of (spread over the clip)
REFERENCE_SECONDS = 20.0  # the longest reference trajectory read (at the session's frame rate)
MAX_SIDE = 1280  # larger frames are scaled down first (faces stay far above the crop's resolution)

# A mean 3-D face for solvePnP, in inter-ocular distances: x right, y down, z away from the camera (OpenCV's
# camera axes, so a face looking into the camera has the identity rotation). x and y follow typical adult
# proportions (the 68-point template's), the depths a typical profile: the nose tip in front, the eye corners
# 0.3-0.4 behind it, the mouth corners about as deep as the eyes.
FACE_3D: dict[int, tuple[float, float, float]] = {
    36: (-0.73, 0.02, 0.40),  # image-left eye, outer corner
    39: (-0.27, 0.02, 0.33),  # ... inner corner
    42: (0.27, 0.02, 0.33),
    45: (0.73, 0.02, 0.40),
    27: (0.0, 0.0, 0.25),  # nose bridge, between the eyes
    30: (0.0, 0.60, 0.0),  # nose tip
    48: (-0.40, 1.0, 0.38),  # mouth corners
    54: (0.40, 1.0, 0.38),
    8: (0.0, 1.75, 0.25),  # chin
}


class ExampleError(ValueError):
    """An example cannot be read or has no usable face; the message names the file and why."""


@dataclass(frozen=True)
class ExampleFrames:
    source: Path
    frames: list[np.ndarray]  # [H, W, 3] uint8 RGB
    fps: float  # frames per second of ``frames`` (0 for a photo)
    is_clip: bool


@dataclass(frozen=True)
class FaceTrack:
    """The face of each frame that has one."""

    source: str
    crops: list[np.ndarray]  # [S, S, 3] uint8
    landmarks: list[np.ndarray | None]  # crop pixels
    image_landmarks: list[np.ndarray | None]  # frame pixels
    crop_sides: list[float]  # side of each crop in frame pixels
    frame_sizes: list[tuple[int, int]]  # (width, height)
    scheme: str  # landmark scheme of the first frame with landmarks
    method: str  # what made them ("template:...", "2d106det", ...)
    skipped: int  # frames without a face

    @property
    def has_mesh(self) -> bool:
        return self.scheme in CLASSIC_SCHEMES and any(
            lm is not None and np.shape(lm) == (68, 2) for lm in self.landmarks
        )

    @property
    def measured(self) -> tuple[int, ...]:
        return TEMPLATE_MEASURED if self.method.startswith("template") else ALL_MEASURED


def _fit(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    k = MAX_SIDE / max(h, w)
    if k >= 1:
        return rgb
    return cv2.resize(rgb, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA)


def read_example(path: Path | str, *, fps: float | None = None, max_frames: int = EMOTION_FRAMES) -> ExampleFrames:
    """A photo (one frame) or a clip. A clip is read at ``fps`` (frames nearest to ``i / fps``, at most
    ``max_frames``) or, without it, at ``max_frames`` frames spread evenly over its length."""
    path = Path(path)
    if not path.is_file():
        raise ExampleError(f"{path}: file not found")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            return ExampleFrames(path, [_fit(load_image(path).rgb)], 0.0, False)
        except AvatarError as exc:
            raise ExampleError(str(exc)) from exc
    return _read_clip(path, fps, max_frames)


def _read_clip(path: Path, fps: float | None, max_frames: int) -> ExampleFrames:
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ExampleError(f"{path}: no video stream (give a photo or a video clip of a face)")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 25.0)
            duration = float(container.duration or 0) / 1e6 or float(stream.frames or 0) / rate
            # at fps: the frame shown at each i / fps (a slower clip repeats frames); else spread over the clip
            step = 1.0 / fps if fps else (duration / max_frames if duration > 0 else 0.0)
            next_t = 0.0
            for count, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else count / rate
                rgb: np.ndarray | None = None
                while next_t <= t + 0.5 / rate and len(frames) < max_frames:
                    rgb = rgb if rgb is not None else _fit(frame.to_ndarray(format="rgb24"))
                    frames.append(rgb)
                    next_t += step
                    if not fps:
                        next_t = max(next_t, t + 0.5 / rate)  # spread: never the same frame twice
                if len(frames) >= max_frames:
                    break
    except ExampleError:
        raise
    except (OSError, ValueError, av.error.FFmpegError) as exc:
        raise ExampleError(f"{path}: not a readable photo or video ({exc})") from exc
    if not frames:
        raise ExampleError(f"{path}: the clip has no frames")
    return ExampleFrames(path, frames, float(fps or (len(frames) / duration if duration > 0 else rate)), True)


def track_faces(example: ExampleFrames, locator: FaceLocator) -> FaceTrack:
    """Find and crop the face of every frame (as for an avatar); frames without a face are skipped."""
    crops: list[np.ndarray] = []
    lms: list[np.ndarray | None] = []
    img_lms: list[np.ndarray | None] = []
    sides: list[float] = []
    sizes: list[tuple[int, int]] = []
    scheme = method = ""
    skipped = 0
    reason = ""
    for rgb in example.frames:
        try:
            face = locator.locate(rgb, source=str(example.source))
        except AvatarError as exc:
            skipped += 1
            reason = str(exc)
            continue
        crops.append(face.crop)
        lms.append(face.landmarks)
        sides.append(float(face.rect.size))
        sizes.append((int(rgb.shape[1]), int(rgb.shape[0])))
        if face.landmarks is not None:
            m = np.asarray(face.crop_to_image, dtype=np.float64)
            pts = np.asarray(face.landmarks, np.float64)
            img_lms.append(pts @ m[:, :2].T + m[:, 2])
            if not scheme:
                scheme, method = face.landmark_scheme, face.landmark_method
        else:
            img_lms.append(None)
    if not crops:
        raise ExampleError(f"{example.source}: no face found in {len(example.frames)} frame(s) ({reason})")
    return FaceTrack(str(example.source), crops, lms, img_lms, sides, sizes, scheme, method, skipped)


def photo_track(avatar: Avatar, locator: FaceLocator) -> FaceTrack:
    """The avatar's own photo as a one-frame example (the neutral reference when none is given)."""
    return track_faces(ExampleFrames(Path(f"avatar:{avatar.name}"), [_fit(avatar.image)], 0.0, False), locator)


# --- keypoint space ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def keypoint_motion(track: FaceTrack, renderer: NeuralRenderer, batch: int = 8) -> MotionParams:
    """LivePortrait's motion extractor on every crop -> :class:`MotionParams` (batch = frames, on the CPU)."""
    outs = []
    for i in range(0, len(track.crops), batch):
        x = torch.cat([renderer.portrait_tensor(c) for c in track.crops[i : i + batch]]).to(renderer.dtype)
        o = renderer.networks.motion(x)
        raw = [getattr(o, k).float().cpu() for k in ("pitch", "yaw", "roll", "t", "exp", "scale")]
        outs.append(params_from_motion(*raw))
    return MotionParams(*(torch.cat([getattr(p, f) for p in outs]) for f in MotionParams._fields))


def _median(x: np.ndarray) -> np.ndarray:
    return np.median(np.asarray(x, dtype=np.float64), axis=0)


# --- mesh space -------------------------------------------------------------------------------------------------


def mesh_shapes(track: FaceTrack) -> np.ndarray | None:
    """Aligned classic keypoints ``[T, 21, 2]`` of the frames with 68-point landmarks, or None."""
    shapes = [aligned_shape(lm) for lm in track.landmarks if lm is not None and np.shape(lm) == (68, 2)]
    if track.scheme not in CLASSIC_SCHEMES or not shapes:
        return None
    return np.stack(shapes)


def _euler_zyx(m: np.ndarray) -> tuple[float, float, float]:
    """``M = Rz(roll) Ry(yaw) Rx(pitch)`` -> (pitch, yaw, roll) in degrees (:func:`engine.keypoints.rotation_matrix`'s
    convention, with its row vectors transposed)."""
    pitch = math.degrees(math.atan2(m[2, 1], m[2, 2]))
    yaw = math.degrees(math.asin(float(np.clip(-m[2, 0], -1.0, 1.0))))
    roll = math.degrees(math.atan2(m[1, 0], m[0, 0]))
    return pitch, yaw, roll


def head_poses(track: FaceTrack) -> np.ndarray | None:
    """Head pose of each frame with 68-point landmarks from ``solvePnP`` on :data:`FACE_3D` -> ``[T, 6]``: pitch,
    yaw, roll in degrees relative to the clip's median pose, translation ``tx, ty`` of the face in crop half-sides
    (the classic renderer's units) and ``scale - 1``, both relative to the median too. None without landmarks."""
    idx = list(FACE_3D)
    model = np.array([FACE_3D[i] for i in idx], dtype=np.float64)
    rots, trans = [], []
    for lm, (w, h) in zip(track.image_landmarks, track.frame_sizes, strict=True):
        if lm is None or np.shape(lm) != (68, 2):
            continue
        f = float(max(w, h))
        cam = np.array([[f, 0.0, w / 2.0], [0.0, f, h / 2.0], [0.0, 0.0, 1.0]])
        pts = np.asarray(lm, dtype=np.float64)[idx]
        ok, rvec, tvec = cv2.solvePnP(model, pts, cam, None, flags=cv2.SOLVEPNP_EPNP)
        if ok:
            ok, rvec, tvec = cv2.solvePnP(model, pts, cam, None, rvec, tvec, True, cv2.SOLVEPNP_ITERATIVE)
        if not ok or not np.isfinite(tvec).all() or float(tvec[2, 0]) <= 0:
            continue
        rots.append(cv2.Rodrigues(rvec)[0])
        trans.append((float(tvec[0, 0]) / float(tvec[2, 0]) * f, float(tvec[1, 0]) / float(tvec[2, 0]) * f,
                      float(tvec[2, 0])))  # fmt: skip
    if track.scheme not in CLASSIC_SCHEMES or not rots:
        return None
    # the median rotation: the frame whose rotation is closest to all others (a robust centre)
    stack = np.stack(rots)
    centre = stack[int(np.argmin([np.abs(stack - r).sum() for r in stack]))]
    side = float(np.median(track.crop_sides))
    t = np.asarray(trans)
    t_med = np.median(t, axis=0)
    poses = []
    for r, (px, py, z) in zip(rots, t, strict=True):
        pitch, yaw, roll = _euler_zyx(r @ centre.T)
        poses.append([pitch, yaw, roll, (px - t_med[0]) * 2 / side, (py - t_med[1]) * 2 / side, t_med[2] / z - 1])
    return np.asarray(poses, dtype=np.float64)


# --- records ----------------------------------------------------------------------------------------------------


def emotion_example(
    name: str,
    example: Path | str,
    *,
    neutral: Path | str | None = None,
    avatar: Avatar | None = None,
    scope: str | None = None,
    renderer: NeuralRenderer | None = None,
    locator: FaceLocator | None = None,
    mesh: bool = True,
    max_frames: int = EMOTION_FRAMES,
) -> EmotionExample:
    """The stored form of emotion ``name`` shown in ``example`` (see the module docstring).

    ``neutral``: the same person's neutral face (photo or clip); without it, ``avatar``'s own photo when given,
    else none (the runtime then uses the stored ``neutral`` emotion, or the portrait). ``scope``: the avatar the
    example is stored for (None: every avatar). ``renderer``: LivePortrait networks for the keypoint space (None:
    mesh space only); ``mesh``: also the classic space when the example has 68-point landmarks."""
    emotion_index(name)
    locator = locator or FaceLocator(None)
    track = track_faces(read_example(example, max_frames=max_frames), locator)
    if neutral is not None:
        n_track: FaceTrack | None = track_faces(read_example(neutral, max_frames=max_frames), locator)
        neutral_source: str | None = Path(neutral).name
    elif avatar is not None:
        n_track, neutral_source = photo_track(avatar, locator), f"avatar {avatar.name}'s photo"
    else:
        n_track, neutral_source = None, None
    keypoints = None
    if renderer is not None:
        exp = keypoint_motion(track, renderer).exp.numpy()  # [T, 21, 3]
        n_exp = keypoint_motion(n_track, renderer).exp.numpy() if n_track is not None else None
        keypoints = KeypointEmotion(
            weights_id=renderer.nets.weights_id,
            untrained=bool(renderer.untrained),
            delta=_median(exp).astype(np.float32),
            neutral=None if n_exp is None else _median(n_exp).astype(np.float32),
        )
    mesh_record = None
    shapes = mesh_shapes(track) if mesh else None
    if shapes is not None:
        n_shapes = mesh_shapes(n_track) if n_track is not None else None
        measured = track.measured
        if n_track is not None and n_shapes is not None:
            measured = tuple(k for k in measured if k in n_track.measured)
        mesh_record = MeshEmotion(
            shape=_median(shapes).astype(np.float32),
            neutral=None if n_shapes is None else _median(n_shapes).astype(np.float32),
            measured=measured,
        )
    if keypoints is None and mesh_record is None:
        why = f"its landmarks are {track.scheme or 'missing'}" if mesh else "the classic space was not asked for"
        raise ExampleError(
            f"{example}: nothing to store: no LivePortrait weights for the keypoint space, and no 68-point "
            f"landmarks for classic mode ({why})"
        )
    return EmotionExample(
        name=EMOTIONS[emotion_index(name)],
        avatar=scope,
        source=Path(example).name,
        neutral_source=neutral_source,
        frames=len(track.crops),
        keypoints=keypoints,
        mesh=mesh_record,
    )


def reference_clip(
    avatar: Avatar,
    clip: Path | str,
    *,
    renderer: NeuralRenderer | None = None,
    locator: FaceLocator | None = None,
    fps: float = 25.0,
    max_seconds: float = REFERENCE_SECONDS,
) -> ReferenceClip:
    """A reference clip of ``avatar`` (EP-Talk's MAPD role): the head-pose trajectory at ``fps`` relative to the
    clip's median pose, its statistics, and the clip's typical (median) expression relative to the avatar's photo
    (``emotion_source: reference``)."""
    locator = locator or FaceLocator(None)
    frames = read_example(clip, fps=fps, max_frames=max(2, round(max_seconds * fps)))
    if not frames.is_clip or len(frames.frames) < 2:
        raise ExampleError(f"{clip}: a reference must be a video clip of several frames (a head moving)")
    track = track_faces(frames, locator)
    photo = photo_track(avatar, locator)
    stats: dict[str, object] = {}
    keypoints = None
    if renderer is not None:
        params = keypoint_motion(track, renderer)
        pose = torch.cat([torch.stack([params.pitch, params.yaw, params.roll], 1), params.t, params.scale], 1)
        pose_np = pose.numpy().astype(np.float64)  # [T, 7]
        stats["keypoints"] = pose_stats(pose_np, KEYPOINT_POSE)
        mask = np.zeros((21, 1))
        mask[list(EMOTION)] = 1.0
        own = keypoint_motion(photo, renderer).exp.numpy()[0]
        keypoints = KeypointReference(
            weights_id=renderer.nets.weights_id,
            untrained=bool(renderer.untrained),
            pose=(pose_np - np.median(pose_np, axis=0)).astype(np.float32),
            emotion=((_median(params.exp.numpy()) - own) * mask).astype(np.float32),
        )
    mesh = None
    poses = head_poses(track)
    shapes = mesh_shapes(track)
    own_shapes = mesh_shapes(photo)
    if poses is not None and shapes is not None:
        stats["mesh"] = pose_stats(poses, MESH_POSE)
        measured = tuple(k for k in track.measured if k in photo.measured)
        emotion = (
            mesh_offsets(_median(shapes), own_shapes[0], measured) if own_shapes is not None else np.zeros((21, 2))
        )
        mesh = MeshReference(pose=poses.astype(np.float32), emotion=emotion.astype(np.float32), measured=measured)
    if keypoints is None and mesh is None:
        raise ExampleError(
            f"{clip}: nothing to store: no LivePortrait weights for the keypoint space, and no 68-point landmarks "
            f"for classic mode's pose (landmarks: {track.scheme or 'none'})"
        )
    return ReferenceClip(
        avatar=avatar.name,
        source=Path(clip).name,
        frames=len(track.crops),
        fps=float(fps),
        keypoints=keypoints,
        mesh=mesh,
        stats=stats,
    )


def describe(record: EmotionExample | ReferenceClip) -> str:
    """One line on what was stored (for the CLI and the server)."""
    spaces = ", ".join(record.spaces()) or "nothing"
    if isinstance(record, EmotionExample):
        neutral = record.neutral_source or "none (the stored neutral emotion, else the portrait, is used)"
        scope = f"avatar {record.avatar}" if record.avatar else "every avatar"
        line = f"emotion {record.name!r} for {scope} from {record.source} ({record.frames} frame(s)); "
        line += f"neutral: {neutral}; spaces: {spaces}"
        if record.keypoints is not None:
            line += f"; keypoints of weights {record.keypoints.weights_id}"
            line += " (UNTRAINED: noise, for tests only)" * record.keypoints.untrained
        return line
    line = f"reference clip for avatar {record.avatar} from {record.source}: {record.frames} frames at "
    line += f"{record.fps:g} fps; spaces: {spaces}"
    mesh = (record.stats or {}).get("mesh")
    if isinstance(mesh, dict):
        line += "; head pose std " + ", ".join(f"{k} {mesh[k]['std']:.1f} deg" for k in ("pitch", "yaw", "roll"))
    return line
