"""LivePortrait's eye and lip retargeting networks as expression offsets for one source face.

The networks map ``[x_s, ratio of the source, target ratio]`` to a keypoint offset that opens or closes the eyes or
the lips (``docs/spec/liveportrait.md`` §5, :func:`engine.keypoints.eye_retarget_delta`). Here they serve two
controls of neural motion:

* a blink drives the eye-open ratio from the source's own (measured on its landmarks) to 0 at full closure;
* lips at rest: a source whose mouth is open (lip-open ratio above LivePortrait's lip-normalisation threshold)
  closes it in pauses and after an interrupt, where relative motion would otherwise keep the photo's open mouth.

Both offsets depend only on the source and one target ratio, so they are tabulated once per avatar (no network
call per frame). An offset is applied in keypoint space after rotation (``x = s (x_c R + exp) + t``), so the
expression offset that produces it is the keypoint offset divided by the frame's scale. Each is restricted to its
region (``EYE`` / ``LIP``): the networks are trained to move those keypoints, and an untrained one must not move
the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from engine.avatar.landmarks import CLASSIC_SCHEMES
from engine.keypoints import EYE, LIP, NUM_KP, SourceFace, eye_open_ratio, eye_retarget_delta, lip_retarget_delta
from engine.keypoints import lip_open_ratio as lip_open_ratio_203

Net = Callable[[Tensor], Tensor]

BLINK_STEPS = 16  # table resolution of the eye closure (linear in between)
DEFAULT_EYE_RATIO = np.array([0.3, 0.3])  # a typical open eye, for a face without landmarks
LIP_NORMALISE_RATIO = 0.03  # LivePortrait's lip-normalisation threshold: a source more open than this closes at rest


def _dist(p: np.ndarray, i: int, j: int) -> float:
    return float(np.linalg.norm(p[i] - p[j]))


def open_ratios(landmarks: np.ndarray | None, scheme: str) -> tuple[np.ndarray, float] | None:
    """Eye-open ratios ``[2]`` (image left, right eye) and the lip-open ratio of a face's landmarks, as LivePortrait
    measures them (lid gap at the eye's middle over its width; inner-lip gap over mouth width). ``None`` when the
    landmarks are missing or of a layout without these points."""
    if landmarks is None:
        return None
    p = np.asarray(landmarks, dtype=np.float64)
    if scheme in CLASSIC_SCHEMES and p.shape == (68, 2):
        left = 0.5 * (_dist(p, 37, 41) + _dist(p, 38, 40)) / max(_dist(p, 36, 39), 1e-6)
        right = 0.5 * (_dist(p, 43, 47) + _dist(p, 44, 46)) / max(_dist(p, 42, 45), 1e-6)
        lip = _dist(p, 62, 66) / max(_dist(p, 48, 54), 1e-6)
        return np.array([left, right]), lip
    if scheme == "lp203" and p.shape == (203, 2):
        lmk = torch.from_numpy(p)[None]
        return eye_open_ratio(lmk)[0].numpy(), float(lip_open_ratio_203(lmk)[0, 0])
    return None


def _run(net: Net, x: Tensor) -> Tensor:
    """Run a (CPU or GPU) retargeting MLP on a CPU float32 batch; the result comes back to the CPU."""
    params = getattr(net, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    if first is not None:
        x = x.to(first.device, first.dtype)
    with torch.inference_mode():
        return net(x).float().cpu()


def _region(keys: tuple[int, ...]) -> Tensor:
    mask = torch.zeros(NUM_KP, 1)
    mask[list(keys)] = 1.0
    return mask


class Retargeting:
    """Blink and rest-lip offsets of one source face from the eye / lip retargeting MLPs (see the module docstring).

    ``eye_ratio`` ``[2]`` and ``lip_ratio``: the source's own open ratios (:func:`open_ratios`). Without a network or a
    ratio the corresponding table is ``None`` and the caller falls back (a geometric blink; no lip closure).
    """

    def __init__(
        self,
        source: SourceFace,
        eye: Net | None,
        lip: Net | None,
        eye_ratio: np.ndarray | None,
        lip_ratio: float | None,
        steps: int = BLINK_STEPS,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps
        x_s = source.kp_source.detach().float().cpu().reshape(1, NUM_KP, 3)
        self.eye_ratio = None if eye_ratio is None else np.asarray(eye_ratio, dtype=np.float64).reshape(2)
        self.lip_ratio = lip_ratio
        self.blink_table: Tensor | None = None  # [steps + 1, 21, 3] keypoint offsets, closure 0 .. 1
        if eye is not None and self.eye_ratio is not None:
            n = steps + 1
            src = torch.from_numpy(self.eye_ratio).float().reshape(1, 2).expand(n, 2)
            targets = (1.0 - torch.linspace(0.0, 1.0, n)) * float(self.eye_ratio.mean())  # open .. 0
            deltas = eye_retarget_delta(lambda x: _run(eye, x), x_s.expand(n, NUM_KP, 3), src, targets[:, None])
            self.blink_table = (deltas - deltas[:1]) * _region(EYE)  # exactly 0 at no closure
        self.lip_close: Tensor | None = None  # [21, 3] keypoint offset that closes the source's open mouth
        if lip is not None and lip_ratio is not None and lip_ratio > LIP_NORMALISE_RATIO:
            src = torch.full((2, 1), float(lip_ratio))
            target = torch.tensor([[float(lip_ratio)], [0.0]])
            deltas = lip_retarget_delta(lambda x: _run(lip, x), x_s.expand(2, NUM_KP, 3), src, target)
            self.lip_close = (deltas[1] - deltas[0]) * _region(LIP)

    def blink(self, amount: float, scale: Tensor) -> Tensor | None:
        """Expression offset ``[1, 21, 3]`` of eyes closed by ``amount`` (0 open .. 1 shut); None without a table."""
        if self.blink_table is None:
            return None
        pos = min(max(float(amount), 0.0), 1.0) * self.steps
        i = min(int(pos), self.steps - 1)
        frac = pos - i
        kp = self.blink_table[i] * (1.0 - frac) + self.blink_table[i + 1] * frac
        return (kp / scale.reshape(-1, 1, 1).to(kp)).to(scale)[:1]

    def rest_lips(self, weight: float, scale: Tensor) -> Tensor | None:
        """Expression offset ``[1, 21, 3]`` closing an open source mouth by ``weight``; None when nothing to close."""
        if self.lip_close is None or weight <= 0:
            return None
        return (self.lip_close * float(weight) / scale.reshape(-1, 1, 1).to(self.lip_close)).to(scale)[:1]
