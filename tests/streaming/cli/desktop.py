"""A desktop without hardware for the client's tests: a PulseAudio server with null sinks (speakers nobody hears,
a microphone fed from a file), an Xvfb display, and screenshots of it.

Everything runs as the test's own processes on local sockets: PulseAudio listens on a unix socket in a temporary
folder (no D-Bus, no system daemon), Xvfb on a display number it picks itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

PULSE_RATE = 48_000
# Debian packages behind each tool (.ci/run installs them)
PACKAGES = {"pulseaudio": "pulseaudio", "pactl": "pulseaudio-utils", "parec": "pulseaudio-utils",
            "paplay": "pulseaudio-utils", "Xvfb": "xvfb", "xwd": "x11-apps", "xdotool": "xdotool"}  # fmt: skip


def need(*tools: str) -> None:
    """Skip (fail in CI) when a tool is missing; also PortAudio with its ALSA -> PulseAudio route for audio."""
    missing = [t for t in tools if shutil.which(t) is None]
    reason = ""
    if missing:
        reason = "missing " + ", ".join(f"{t} (Debian {PACKAGES.get(t, t)})" for t in missing)
    elif "pulseaudio" in tools:
        try:
            import sounddevice  # noqa: F401 - PortAudio's library is loaded on import
        except (ImportError, OSError) as exc:
            reason = f"sounddevice / PortAudio unavailable ({exc}): pip install -e '.[client]', Debian libportaudio2"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs it")
        pytest.skip(reason)


@dataclass
class Pulse:
    """A running PulseAudio: ``env`` points clients at it; sink ``avatar_out`` is the default output and source
    ``test_mic`` (what is played into sink ``mic_feed``) the default input."""

    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def run(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def play_into_mic(self, wav: Path) -> subprocess.Popen[bytes]:
        """Play ``wav`` into the microphone's sink, in real time (returns the running paplay)."""
        return subprocess.Popen(["paplay", "-d", "mic_feed", str(wav)], env=self.env)


PULSE_CONFIG = """
load-module module-native-protocol-unix auth-anonymous=1 socket={socket}
load-module module-null-sink sink_name=avatar_out rate=48000 sink_properties=device.description=AvatarOut
load-module module-null-sink sink_name=mic_feed rate=48000 sink_properties=device.description=MicFeed
load-module module-remap-source source_name=test_mic master=mic_feed.monitor source_properties=device.description=Mic
set-default-sink avatar_out
set-default-source test_mic
"""


@contextlib.contextmanager
def pulse_server(tmp: Path, with_mic: bool = True) -> Iterator[Pulse]:
    """A user-space PulseAudio (``--daemonize=no -n``: no default config, only the modules above)."""
    need("pulseaudio", "pactl", "parec", "paplay")
    tmp.mkdir(parents=True, exist_ok=True)
    socket = tmp / "native"
    config = PULSE_CONFIG.format(socket=socket)
    if not with_mic:  # only speakers: "no input device" is what the client must explain
        config = "\n".join(line for line in config.splitlines() if "mic" not in line)
    (tmp / "default.pa").write_text(config)
    env = {**os.environ, "PULSE_SERVER": f"unix:{socket}", "PULSE_RUNTIME_PATH": str(tmp / "run"),
           "HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp / "config")}  # fmt: skip
    env.pop("DISPLAY", None)  # PulseAudio would try X11 for its cookie
    log = tmp / "pulseaudio.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["pulseaudio", "--daemonize=no", "-n", f"--file={tmp / 'default.pa'}", "--exit-idle-time=-1",
             "--disallow-exit", "--disallow-module-loading", "--log-target=stderr"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    pulse = Pulse(env, process, log)
    try:
        deadline = time.monotonic() + 15.0
        while pulse.run("pactl", "info").returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PulseAudio did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield pulse
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Capture:
    """What ``parec`` recorded from a sink's monitor, placed on this machine's monotonic clock."""

    audio: np.ndarray  # mono float [-1, 1]
    rate: int
    t0: float  # time.monotonic() at which audio[0] was played into the sink


@dataclass
class MonitorRecorder:
    """Records a sink's monitor with ``parec`` (10 ms fragments, which also keeps the null sink running in small
    steps: a null sink nobody listens to closely plays in 2 s gulps)."""

    pulse: Pulse
    source: str = "avatar_out.monitor"
    _chunks: list[bytes] = field(default_factory=list)
    _reads: list[tuple[float, int]] = field(default_factory=list)  # (monotonic after the read, bytes so far)
    _process: subprocess.Popen[bytes] | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            ["parec", "-d", self.source, "--raw", "--format=s16le", f"--rate={PULSE_RATE}", "--channels=1",
             "--latency-msec=10"],
            env=self.pulse.env, stdout=subprocess.PIPE,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        total = 0
        while True:
            data = self._process.stdout.read1(4096)  # type: ignore[attr-defined]
            if not data:
                return
            total += len(data)
            self._chunks.append(data)
            self._reads.append((time.monotonic(), total))

    def stop(self) -> Capture:
        assert self._process is not None and self._thread is not None
        self._process.terminate()
        self._process.wait(10)
        self._thread.join(10)
        raw = b"".join(self._chunks)
        audio = np.frombuffer(raw[: len(raw) // 2 * 2], "<i2").astype(np.float32) / 32768.0
        # the read that came back soonest after its samples tells where sample 0 sits (later reads only waited)
        t0 = min(t - n / 2 / PULSE_RATE for t, n in self._reads) if self._reads else 0.0
        return Capture(audio, PULSE_RATE, t0)


@dataclass
class Display:
    name: str
    env: dict[str, str]


@contextlib.contextmanager
def xvfb(width: int = 800, height: int = 600) -> Iterator[Display]:
    """Xvfb on the first free display number (it tells which through ``-displayfd``)."""
    need("Xvfb", "xwd")
    read_fd, write_fd = os.pipe()
    process = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write_fd)
    try:
        number = b""
        deadline = time.monotonic() + 15.0
        while not number.endswith(b"\n"):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("Xvfb did not start")
            chunk = os.read(read_fd, 16)
            if not chunk:
                raise RuntimeError("Xvfb did not start")
            number += chunk
        name = f":{number.decode().strip()}"
        env = {**os.environ, "DISPLAY": name}
        env.pop("WAYLAND_DISPLAY", None)
        yield Display(name, env)
    finally:
        os.close(read_fd)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def screenshot(display: Display) -> np.ndarray:
    """The whole screen as ``[H, W, 3]`` uint8 (``xwd -root``, a ZPixmap of 24/32-bit true colour)."""
    raw = subprocess.run(["xwd", "-root", "-silent"], env=display.env, capture_output=True, check=True,
                         timeout=20).stdout  # fmt: skip
    fields = struct.unpack(">25I", raw[:100])
    header_size, width, height = fields[0], fields[4], fields[5]
    byte_order, bits_per_pixel, bytes_per_line = fields[7], fields[11], fields[12]
    masks, ncolors = fields[14:17], fields[19]
    if bits_per_pixel not in (24, 32):
        raise ValueError(f"xwd: expected a 24- or 32-bit true colour screen, got {bits_per_pixel} bits per pixel")
    start = header_size + 12 * ncolors
    size = bits_per_pixel // 8
    rows = np.frombuffer(raw[start : start + bytes_per_line * height], np.uint8).reshape(height, bytes_per_line)
    data = rows[:, : width * size].reshape(height, width, size).astype(np.uint32)
    order = range(size) if byte_order == 0 else range(size - 1, -1, -1)  # 0: least significant byte first
    pixels = sum(data[..., i] << (8 * k) for k, i in enumerate(order))
    channels = []
    for mask in masks:
        shift = (mask & -mask).bit_length() - 1
        channels.append(((pixels & mask) >> shift).astype(np.uint8))
    return np.stack(channels, axis=-1)
