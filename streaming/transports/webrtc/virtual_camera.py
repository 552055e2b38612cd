"""``engine client --virtual-camera``: the avatar as a webcam for meeting apps (pyvirtualcam: OBS Virtual Camera
on Windows and macOS, v4l2loopback on Linux). Set-up: docs/virtual-camera.md.

A camera is read at a steady rate, so the sink sends one RGB frame every ``1 / fps`` on its own schedule: the
newest received frame that is due, or the previous one again while the stream stalls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import cv2
import numpy as np

from streaming.transports.webrtc.frame_queue import FrameQueue
from streaming.transports.webrtc.playout import ClientError, PlayoutClock

logger = logging.getLogger(__name__)

VIRTUAL_CAMERA_HINT = (
    "install pyvirtualcam (pip install 'avatar-engine[client]') and a virtual camera device: OBS Virtual Camera "
    "on Windows/macOS (install OBS and start its virtual camera once), v4l2loopback on Linux "
    "(sudo apt-get install v4l2loopback-dkms && sudo modprobe v4l2loopback devices=1 exclusive_caps=1); "
    "see docs/virtual-camera.md"
)


class Sent(NamedTuple):
    at: float  # time.monotonic() when the frame was handed to the camera
    pts_s: float  # the received frame it carried (repeated frames carry the same pts)


def _explain(exc: Exception, device: str | None) -> str:
    """pyvirtualcam's error (one line per backend it tried) -> what a user can do about it."""
    text = " ".join(str(exc).split())
    where = device or "the virtual camera"
    if "busy" in text.lower():
        return (
            f"--virtual-camera: {where} is busy: another program is already sending to it (OBS, a second "
            f"'engine client', a browser tab); close it or pick another device with --camera-device ({text})"
        )
    if "not a video output device" in text or "is not a V4L2 device" in text:
        return (
            f"--virtual-camera: {where} is not a v4l2loopback output (a real webcam?); pick the loopback "
            f"device with --camera-device /dev/videoN ({text})"
        )
    return f"--virtual-camera: no virtual camera ({text}); {VIRTUAL_CAMERA_HINT}"


class VirtualCameraSink:
    """Frames of ``width`` x ``height`` RGB to a pyvirtualcam camera at ``fps``; ``run(stop)`` paces them."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        clock: PlayoutClock | None = None,
        device: str | None = None,
        backend: str | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        try:
            import pyvirtualcam
        except ImportError as exc:
            raise ClientError(f"--virtual-camera: pyvirtualcam is not installed; {VIRTUAL_CAMERA_HINT}") from exc
        if width <= 0 or height <= 0 or not fps > 0:
            raise ClientError(f"--virtual-camera: bad camera format {width}x{height} at {fps} fps")
        self.width, self.height, self.fps = width, height, float(fps)
        try:
            self._camera: Any = pyvirtualcam.Camera(
                width=width, height=height, fps=fps, fmt=pyvirtualcam.PixelFormat.RGB, device=device, backend=backend
            )
        except Exception as exc:  # pyvirtualcam raises RuntimeError listing every backend it tried
            raise ClientError(_explain(exc, device)) from exc
        self.device = str(self._camera.device)
        logger.info("virtual camera: %s (%s)", self.device, self._camera.backend)
        # the camera shows a frame about one period after it is sent: send it that much before its sound
        self.queue = FrameQueue(clock, lead_s=self.frame_delay_s)
        self.sent: list[Sent] = []
        self._on_error = on_error
        self._last: tuple[np.ndarray, float] | None = None

    @property
    def frame_delay_s(self) -> float:
        return 1.0 / self.fps

    def __call__(self, rgb: np.ndarray, pts_s: float) -> None:
        self.queue.put(rgb, pts_s, time.monotonic())

    def _fit(self, rgb: np.ndarray) -> np.ndarray:
        """The camera's format is fixed when it opens: a frame of another size is scaled to it."""
        if rgb.shape[:2] != (self.height, self.width):
            rgb = cv2.resize(rgb, (self.width, self.height), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(rgb, dtype=np.uint8)

    def tick(self, now: float) -> None:
        """Send the frame for this camera period (nothing before the first frame arrived)."""
        frame = self.queue.take_due(now)
        if frame is not None:
            self._last = (self._fit(frame.rgb), frame.pts_s)
        if self._last is None:
            return
        self._camera.send(self._last[0])
        self.sent.append(Sent(time.monotonic(), self._last[1]))

    async def run(self, stop: asyncio.Event) -> None:
        """One frame every ``1 / fps`` on a fixed schedule (a late tick does not shift the ones after it)."""
        period = 1.0 / self.fps
        next_t = time.monotonic()
        while not stop.is_set():
            try:
                self.tick(time.monotonic())
            except Exception as exc:  # the device went away mid-call
                if self._on_error is None:
                    raise
                self._on_error(ClientError(f"--virtual-camera: sending to {self.device} failed ({exc})"))
                return
            next_t += period
            delay = next_t - time.monotonic()
            if delay < -period:  # more than a period behind (the loop stalled): skip the missed ticks
                next_t = time.monotonic()
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))

    def close(self) -> None:
        try:
            self._camera.close()
        except Exception as exc:  # closing must not hide why the run ended
            logger.warning("closing the virtual camera: %s", exc)
