"""``engine client --show``: the avatar in a desktop window (pygame / SDL2, which installs with pip on Linux,
Windows and macOS and runs on X11, Wayland, Windows and Cocoa).

The window runs on the event loop's thread (SDL wants its window on the main thread on macOS): a task pumps its
events and shows each frame when it is due (see :class:`FrameQueue`). Keys: q / Esc quit, space / i interrupt
the avatar, e cycles the emotion. The title shows the frames shown per second and the latency.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from streaming.transports.webrtc.frame_queue import FrameQueue
from streaming.transports.webrtc.playout import ClientError, PlayoutClock

POLL_S = 0.01  # events are pumped at least this often, so the window stays responsive
TITLE_EVERY_S = 1.0
HEADLESS_DRIVERS = ("offscreen", "dummy")  # SDL's fallbacks when no display is reachable: nothing a person sees

# key -> what the client does ("quit", "interrupt", "emotion")
KEY_ACTIONS = {"q": "quit", "escape": "quit", "space": "interrupt", "i": "interrupt", "e": "emotion"}


NO_DISPLAY = (
    "--show: no display to open a window on (DISPLAY / WAYLAND_DISPLAY is not set); "
    "use --record DIR or --virtual-camera instead"
)


def _no_display() -> bool:
    """On Linux and the BSDs a window needs an X11 or Wayland display named in the environment."""
    if not sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd")) or os.environ.get("SDL_VIDEODRIVER"):
        return False
    return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class Shown(NamedTuple):
    at: float  # time.monotonic() right after the frame was put on screen
    pts_s: float
    arrival: float


def import_pygame() -> Any:
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # its banner would land in the client's JSON output
    try:
        import pygame
    except ImportError as exc:
        raise ClientError(
            f"--show needs pygame ({exc}): pip install 'avatar-engine[client]'; or use --record DIR / --virtual-camera"
        ) from exc
    return pygame


class WindowSink:
    """A window of the stream's size. ``sink(rgb, pts_s)`` queues a frame; ``run(stop)`` shows them."""

    def __init__(
        self,
        title: str = "avatar",
        clock: PlayoutClock | None = None,
        lead_s: float = 0.0,
        on_action: Callable[[str], None] | None = None,
        status: Callable[[], str] | None = None,
    ) -> None:
        if _no_display():  # checked before SDL starts: it would print its own complaints while looking for one
            raise ClientError(NO_DISPLAY)
        if sys.platform.startswith("linux") and os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            os.environ.setdefault("SDL_VIDEODRIVER", "x11")  # X11 only: SDL's Wayland probe would print errors
        self._pg = import_pygame()
        try:
            self._pg.display.init()
            driver = self._pg.display.get_driver()
        except self._pg.error as exc:
            shown = os.environ.get("WAYLAND_DISPLAY") or os.environ.get("DISPLAY")
            raise ClientError(
                f"--show: cannot open a window on display {shown!r} ({exc}); use --record DIR or --virtual-camera"
            ) from exc
        if driver in HEADLESS_DRIVERS and os.environ.get("SDL_VIDEODRIVER") != driver:
            self._pg.display.quit()
            shown = os.environ.get("WAYLAND_DISPLAY") or os.environ.get("DISPLAY")
            raise ClientError(
                f"--show: cannot open a window on display {shown!r} (no X11/Wayland server answers there); "
                "use --record DIR or --virtual-camera instead"
            )
        self.driver = driver
        self.title = title
        self.queue = FrameQueue(clock, lead_s)
        self.shown: list[Shown] = []
        self._on_action = on_action or (lambda action: None)
        self._status = status or (lambda: "")
        self._screen: Any = None
        self._recent: deque[float] = deque(maxlen=50)
        self._hold_s: deque[float] = deque(maxlen=50)  # arrival -> shown, the window's own share of the latency

    def bind(self, on_action: Callable[[str], None], status: Callable[[], str]) -> None:
        """What the keys do and what the title shows (known once the server answered)."""
        self._on_action = on_action
        self._status = status

    def __call__(self, rgb: np.ndarray, pts_s: float) -> None:
        self.queue.put(rgb, pts_s, time.monotonic())

    def fps(self) -> float:
        if len(self._recent) < 2 or self._recent[-1] <= self._recent[0]:
            return 0.0
        return (len(self._recent) - 1) / (self._recent[-1] - self._recent[0])

    def hold_ms(self) -> float:
        return 1000.0 * float(np.mean(self._hold_s)) if self._hold_s else 0.0

    def title_text(self) -> str:
        parts = [self.title, f"{self.fps():.1f} fps"]
        status = self._status()
        if status:
            parts.append(status)
        parts.append("q quit, space interrupt, e emotion")
        return " | ".join(parts)

    def _show(self, rgb: np.ndarray) -> None:
        pg = self._pg
        height, width = rgb.shape[:2]
        if self._screen is None or self._screen.get_size() != (width, height):
            self._screen = pg.display.set_mode((width, height))
            pg.display.set_caption(self.title_text())
        image = pg.image.frombuffer(np.ascontiguousarray(rgb).tobytes(), (width, height), "RGB")
        self._screen.blit(image, (0, 0))
        pg.display.flip()

    def _pump(self) -> None:
        pg = self._pg
        for event in pg.event.get():
            if event.type == pg.QUIT:
                self._on_action("quit")
            elif event.type == pg.KEYDOWN:
                action = KEY_ACTIONS.get(pg.key.name(event.key))
                if action is not None:
                    self._on_action(action)

    async def run(self, stop: asyncio.Event) -> None:
        """Show frames as they fall due and handle the keys until ``stop`` is set."""
        next_title = 0.0
        while not stop.is_set():
            self._pump()
            now = time.monotonic()
            frame = self.queue.take_due(now)
            if frame is not None:
                self._show(frame.rgb)
                shown = time.monotonic()
                self.shown.append(Shown(shown, frame.pts_s, frame.arrival))
                self._recent.append(shown)
                self._hold_s.append(shown - frame.arrival)
            if self._screen is not None and now >= next_title:
                self._pg.display.set_caption(self.title_text())
                next_title = now + TITLE_EVERY_S
            due = self.queue.next_due()
            wait = POLL_S if due is None else min(POLL_S, max(0.0, due - time.monotonic()))
            await asyncio.sleep(wait)

    def close(self) -> None:
        self._pg.display.quit()
