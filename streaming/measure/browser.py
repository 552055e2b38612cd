"""The lip-sync instrument in headless Chromium: the page's fake microphone plays the sync signal, and script
injected over the DevTools protocol measures what the page plays.

In the page, every video frame the element presents (``requestVideoFrameCallback``) is drawn to a canvas and the
darkness of the mouth box is recorded at the frame's ``expectedDisplayTime``; the received audio track is tapped
through WebAudio (``MediaStreamSource -> AnalyserNode``) and its RMS sampled every few milliseconds, stamped on
the same ``performance.now()`` clock (plus the context's output latency: when it is heard, not processed). The
offset is then computed in Python with :func:`streaming.measure.sync.estimate_offset`, like every other mode.

The fake capture device loops the WAV (no ``%noloop``): the measurement starts once the video plays, a second or
two into the file, and a looping signal keeps bursts coming for the whole window. Chromium's capture path applies
its default microphone processing (noise suppression, gain control) to the page's ``getUserMedia`` audio, so some
noise bursts come back quieter; the cross-correlation does not depend on equal burst levels.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.audio.pcm import resample
from engine.avatar.default import SIZE, default_landmarks
from engine.media import write_wav
from streaming.measure import sync as lipsync
from streaming.measure.live import classic_server, server_picture_lag_ms
from streaming.measure.sync import SyncError, SyncMeasure, measure

MEASURE_JS = """
(() => {
  const box = %(box)s, seconds = %(seconds)s;
  const out = {video: [], audio: [], done: false, error: null};
  window.__lipsync = out;
  const video = document.getElementById('avatar');
  // the receivers' cumulative jitter-buffer and decode times (getStats), per kind; null without the page's pc
  async function receiverDelays() {
    if (typeof pc === 'undefined' || !pc) return null;
    const keep = ['jitterBufferDelay', 'jitterBufferEmittedCount', 'totalDecodeTime', 'framesDecoded'];
    const found = {};
    (await pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp') found[r.kind] = Object.fromEntries(keep.map((k) => [k, r[k] || 0]));
    });
    return found;
  }
  function start() {
    out.started = performance.now();
    const canvas = document.createElement('canvas');
    canvas.width = video.videoWidth; canvas.height = video.videoHeight;
    const g = canvas.getContext('2d', {willReadFrequently: true});
    const s = canvas.width / %(size)s;
    const x0 = Math.floor(box[0] * s), y0 = Math.floor(box[1] * s);
    const w = Math.ceil(box[2] * s) - x0, h = Math.ceil(box[3] * s) - y0;
    const ctx = new AudioContext();
    const src = ctx.createMediaStreamSource(new MediaStream(video.srcObject.getAudioTracks()));
    const an = ctx.createAnalyser();
    an.fftSize = 512;
    const mute = ctx.createGain();
    mute.gain.value = 0;
    src.connect(an); an.connect(mute); mute.connect(ctx.destination);  // keep the graph pulled
    const buf = new Float32Array(an.fftSize);
    const t0 = performance.now();
    let begin = null;
    receiverDelays().then((b) => { begin = b; });
    const timer = setInterval(() => {
      an.getFloatTimeDomainData(buf);
      let e = 0;
      for (let i = 0; i < buf.length; i++) e += buf[i] * buf[i];
      out.audio.push([performance.now(), Math.sqrt(e / buf.length)]);
    }, 4);
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      clearInterval(timer);
      try {
        out.sampleRate = ctx.sampleRate; out.fftSize = an.fftSize;
        out.baseLatency = ctx.baseLatency || 0; out.outputLatency = ctx.outputLatency || 0;
        ctx.close();
      } catch (e) { out.error = String(e); }
      receiverDelays().then((end) => { out.stats = [begin, end]; out.done = true; },
                            (e) => { out.error = String(e); });
    };
    // if the element stops presenting frames, end anyway: the Python side reports how many it saw
    setTimeout(finish, seconds * 1000 + 1000);
    const onFrame = (now, meta) => {
      if (finished) return;
      g.drawImage(video, 0, 0);
      const d = g.getImageData(x0, y0, w, h).data;
      let dark = 0;
      for (let i = 0; i < d.length; i += 4) dark += 1 - (0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]) / 255;
      out.video.push([meta.expectedDisplayTime, meta.presentationTime, meta.mediaTime, dark / (d.length / 4)]);
      if (performance.now() - t0 < seconds * 1000) video.requestVideoFrameCallback(onFrame);
      else finish();
    };
    video.requestVideoFrameCallback(onFrame);
  }
  const wait = () => {
    try {
      const ready = video && video.srcObject && video.srcObject.getAudioTracks().length;
      if (ready && video.readyState >= 2 && video.videoWidth) start();
      else setTimeout(wait, 50);
    } catch (e) { out.error = String(e); }
  };
  wait();
  return true;
})()
"""


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise SyncError("chromium is not installed (Debian: apt-get install chromium)")
    return found


class DevTools:
    """The little of the Chrome DevTools protocol this needs: evaluate an expression, get its JSON value."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._id = 0

    async def evaluate(self, expression: str) -> Any:
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        result = await self._call("Runtime.evaluate", params)
        if "exceptionDetails" in result:
            raise SyncError(f"page script failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def screenshot(self) -> bytes:
        """The page as PNG bytes."""
        return base64.b64decode((await self._call("Page.captureScreenshot", {"format": "png"}))["data"])

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._id += 1
        await self._ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await self._ws.receive_json(timeout=20)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise SyncError(f"DevTools {method} failed: {msg['error']}")
                found: dict[str, Any] = msg.get("result", {})
                return found


@contextlib.asynccontextmanager
async def open_page(url: str, wav: Path, profile: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium on ``url`` with ``wav`` as its (looping) microphone; yields a DevTools handle."""
    import aiohttp

    args = [
        chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={profile}", "--remote-debugging-port=0", url,
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            if proc.poll() is not None:
                raise SyncError(f"chromium exited with {proc.returncode}")
            await asyncio.sleep(0.1)
        else:
            raise SyncError("chromium did not open its DevTools port in 30 s")
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            page = None
            for _ in range(100):
                async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = await resp.json()
                page = next((t for t in targets if t.get("type") == "page"), None)
                if page:
                    break
                await asyncio.sleep(0.1)
            if page is None:
                raise SyncError("chromium shows no page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield DevTools(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def record_page(page: DevTools, seconds: float, start_timeout_s: float = 60.0) -> dict[str, Any]:
    """Inject the measuring script and wait for its series (``video``: [display, presented, media, opening])."""

    box = list(lipsync.mouth_box(default_landmarks()))
    script = MEASURE_JS % {"box": json.dumps(box), "seconds": seconds, "size": SIZE}
    deadline = asyncio.get_running_loop().time() + start_timeout_s + seconds
    while asyncio.get_running_loop().time() < deadline:
        state = await page.evaluate(
            "document.getElementById('avatar') === null ? null"
            " : JSON.stringify(window.__lipsync ? {done: window.__lipsync.done, error: window.__lipsync.error} : null)"
        )
        status = json.loads(state or "null")
        if state is not None and status is None:  # the page is loaded (again): (re)start the measurement
            await page.evaluate(script)
        if status is None:
            await asyncio.sleep(0.1)
            continue
        if status["error"]:
            raise SyncError(f"page measurement failed: {status['error']}")
        if status["done"]:
            data: dict[str, Any] = json.loads(await page.evaluate("JSON.stringify(window.__lipsync)"))
            return data
        await asyncio.sleep(0.25)
    progress = await page.evaluate(
        "JSON.stringify(window.__lipsync ? [window.__lipsync.started, window.__lipsync.video.length,"
        " window.__lipsync.audio.length] : null)"
    )
    raise SyncError(f"the page measurement did not finish ([started, frames, audio readings]: {progress})")


def measure_page_series(data: dict[str, Any]) -> SyncMeasure:
    """The page's two series on its ``performance.now()`` clock -> offset (audio as heard, video as displayed)."""
    video = np.asarray(data["video"], np.float64)  # [N, 4]
    audio = np.asarray(data["audio"], np.float64)  # [M, 2]
    if video.shape[0] < 50 or audio.shape[0] < 100:
        raise SyncError(f"the page recorded {video.shape[0]} frames and {audio.shape[0]} audio samples")
    # the analyser's window ends at the poll; its centre is half a window earlier, heard after the output latency
    heard = (data["baseLatency"] + data["outputLatency"] - 0.5 * data["fftSize"] / data["sampleRate"]) * 1000.0
    audio_t = (audio[:, 0] + heard) / 1000.0
    rate = 1000  # RMS readings resampled onto a 1 ms grid: an "audio" signal whose loudness is the RMS
    grid = np.arange(audio_t[0], audio_t[-1], 1.0 / rate)
    loud = np.interp(grid, audio_t, audio[:, 1])
    latency_ms = round((data["baseLatency"] + data["outputLatency"]) * 1000.0, 1)
    result = measure(
        "browser", video[:, 0] / 1000.0, video[:, 3], loud, rate, float(grid[0]),
        audio_readings=int(audio.shape[0]), output_latency_ms=latency_ms,
        stats_offset_ms=receiver_delay_offset_ms(data.get("stats")),
        video_fps=round(float((video.shape[0] - 1) / ((video[-1, 0] - video[0, 0]) / 1000.0)), 1),
    )  # fmt: skip
    # the same without the output latency: the audio as WebAudio processed it rather than as it is heard
    result.notes["processed_offset_ms"] = round(result.offset_ms + result.notes["output_latency_ms"], 1)
    return result


DRIFT_WINDOW_S = 20.0  # the first and the last this many seconds of a long recording are measured on their own


def drift_windows(data: dict[str, Any], window_s: float = DRIFT_WINDOW_S) -> dict[str, float] | None:
    """Offset (ms) over the first and the last ``window_s`` of the page's series, and their difference: a
    playout that drifts over a long session shows here, where the whole-recording offset would average it away.
    None when the recording is shorter than three windows."""
    video = data["video"]
    if not video or (video[-1][0] - video[0][0]) / 1000.0 < 3 * window_s:
        return None
    t0, t1 = video[0][0], video[-1][0]
    found = {}
    for name, lo in (("start", t0), ("end", t1 - window_s * 1000.0)):
        part = dict(data, stats=None)
        part["video"] = [r for r in video if lo <= r[0] < lo + window_s * 1000.0]
        part["audio"] = [r for r in data["audio"] if lo <= r[0] < lo + window_s * 1000.0]
        found[f"{name}_offset_ms"] = round(measure_page_series(part).offset_ms, 1)
    found["drift_ms"] = round(found["end_offset_ms"] - found["start_offset_ms"], 1)
    return found


def receiver_delay_offset_ms(stats: list[Any] | None) -> float | None:
    """Cross-check from getStats over the measured window: (video jitter buffer + decode) minus audio jitter
    buffer, per emitted frame/sample. Both tracks leave the server on one clock over loopback, so this is how much
    later the receiver hands on a picture than the sound that arrived with it."""
    if not stats or stats[0] is None or stats[1] is None:
        return None
    begin, end = stats
    try:
        d = {k: {f: end[k][f] - begin[k][f] for f in end[k]} for k in ("audio", "video")}
        audio = d["audio"]["jitterBufferDelay"] / d["audio"]["jitterBufferEmittedCount"]
        video = d["video"]["jitterBufferDelay"] / d["video"]["jitterBufferEmittedCount"]
        decode = d["video"]["totalDecodeTime"] / max(d["video"]["framesDecoded"], 1)
    except (KeyError, ZeroDivisionError):
        return None
    return round(1000.0 * (video + decode - audio), 1)


async def measure_browser(seconds: float = 10.0, seed: int = 0, workdir: Path | None = None) -> SyncMeasure:
    """The real classic server, the page in headless Chromium with the sync signal as its microphone."""
    audio, _ = lipsync.sync_signal(seconds, seed=seed)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        wav = Path(tmp) / "sync.wav"
        write_wav(wav, resample(audio, lipsync.SAMPLE_RATE, 48_000), 48_000)
        async with classic_server() as url, open_page(f"{url}/?autostart=1", wav, Path(tmp) / "profile") as page:
            data = await record_page(page, seconds)
            lag = await server_picture_lag_ms(url)
    result = measure_page_series(data)
    result.notes["picture_lag_ms"] = lag
    result.notes["drift"] = drift_windows(data)  # long runs (>= 60 s): start vs end, e.g. --seconds 600
    return result
