"""Ditto's streaming HuBERT features (1024-d at 25 fps) from the user's ``hubert_streaming_fix_kv.onnx``.

Spec ``docs/spec/ditto.md`` §5.1: one model call per 6480-sample chunk (hop 3200 = 5 video frames); of the 50 Hz
encodings it returns, ``[-14:-4]`` are kept and averaged in pairs -> 5 rows per chunk. The stream is prefixed with
``prefix_samples`` zeros: 1920 in Ditto's online pipeline, 2000 in its offline ``wav2feat`` (which this class then
reproduces exactly, see :func:`hubert_offline`). Row ``5k + j`` therefore needs audio up to
``3200 k + 6480 - prefix`` samples: a lookahead of 1360 samples (85 ms) past its frame online.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

CHUNK_SAMPLES = 6480  # (3 + 5 + 2) * 640 + 80
HOP_SAMPLES = 3200  # 5 video frames
ROWS_PER_CHUNK = 5
KEEP_FROM, KEEP_TO = -14, -4  # 50 Hz encodings kept per chunk: 2 * (5 + 2) back to 2 * 2 from the end
ONLINE_PREFIX = 1920  # 3 * 640
OFFLINE_PREFIX = 2000  # 6480 - 4480
SAMPLES_PER_FRAME = 640


class HubertStreaming:
    """:class:`engine.motion.base.FeatureStage` running the streaming HuBERT ONNX model with onnxruntime."""

    fps = 25

    def __init__(
        self,
        onnx_path: str | Path,
        prefix_samples: int = ONLINE_PREFIX,
        threads: int = 2,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"HuBERT ONNX model not found: {path} (Ditto's hubert_streaming_fix_kv.onnx)")
        if not 0 <= prefix_samples < CHUNK_SAMPLES:
            raise ValueError(f"prefix_samples must be in [0, {CHUNK_SAMPLES}), got {prefix_samples}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or not outputs:
            names = [i.name for i in inputs]
            raise ValueError(f"{path.name}: expected one audio input [1, {CHUNK_SAMPLES}] float32, got inputs {names}")
        _check_input(inputs[0], path.name)
        self._input = inputs[0].name
        self._output = outputs[0].name
        self.prefix_samples = prefix_samples
        self._silence_rows = self.encode_chunk(np.zeros(CHUNK_SAMPLES, np.float32))  # also validates the output
        self.dim = int(self._silence_rows.shape[1])
        self.reset()

    def encode_chunk(self, chunk: np.ndarray) -> np.ndarray:
        """One 6480-sample chunk -> ``[5, dim]`` rows (kept encodings averaged in pairs)."""
        if chunk.shape != (CHUNK_SAMPLES,):
            raise ValueError(f"a HuBERT chunk is {CHUNK_SAMPLES} samples, got shape {chunk.shape}")
        out = self._session.run([self._output], {self._input: chunk[None].astype(np.float32)})[0]  # [1, T, D]
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[1] < -KEEP_FROM:
            raise ValueError(f"HuBERT output must be [1, T >= {-KEEP_FROM}, D], got {list(out.shape)}")
        kept = out[0, KEEP_FROM:KEEP_TO]  # [10, D]
        return kept.reshape(ROWS_PER_CHUNK, 2, -1).mean(axis=1).astype(np.float32)  # [5, D]

    def silence(self) -> np.ndarray:
        """Mean row of an all-zero chunk ``[dim]`` (the past of the stream, for window padding)."""
        return self._silence_rows.mean(axis=0)

    def reset(self) -> None:
        self._buf = np.zeros(self.prefix_samples, np.float32)  # prefixed stream from absolute index _buf_start
        self._buf_start = 0
        self._samples = 0
        self._chunks = 0

    def push(self, pcm: np.ndarray) -> np.ndarray:
        if not isinstance(pcm, np.ndarray) or pcm.ndim != 1 or pcm.dtype not in (np.float32, np.float64):
            raise ValueError("HubertStreaming.push takes 16 kHz mono float32 [n] (see engine.audio.to_mono_16k)")
        if not np.all(np.isfinite(pcm)):
            raise ValueError("pcm contains NaN or infinite samples")
        self._buf = np.concatenate([self._buf, pcm.astype(np.float32)])
        self._samples += pcm.shape[0]
        ready = max(0, (self.prefix_samples + self._samples - CHUNK_SAMPLES) // HOP_SAMPLES + 1)
        return self._run_chunks(ready)

    def flush(self) -> np.ndarray:
        total = math.ceil(self._samples / SAMPLES_PER_FRAME)
        chunks = math.ceil(total / ROWS_PER_CHUNK)
        need = (chunks - 1) * HOP_SAMPLES + CHUNK_SAMPLES - (self._buf_start + self._buf.shape[0])
        if chunks and need > 0:  # the future after the end of stream is silence
            self._buf = np.concatenate([self._buf, np.zeros(need, np.float32)])
        emitted = self._chunks * ROWS_PER_CHUNK
        rows = self._run_chunks(chunks)[: max(0, total - emitted)]
        self.reset()
        return rows

    def _run_chunks(self, upto: int) -> np.ndarray:
        rows = []
        for k in range(self._chunks, upto):
            start = k * HOP_SAMPLES - self._buf_start
            rows.append(self.encode_chunk(self._buf[start : start + CHUNK_SAMPLES]))
        self._chunks = max(self._chunks, upto)
        drop = self._chunks * HOP_SAMPLES - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)


def hubert_offline(hubert: HubertStreaming, audio: np.ndarray) -> np.ndarray:
    """Ditto's offline ``wav2feat``: ``[ceil(n / 640), dim]``, chunk starts ``int(i * 0.04 * 16000)``, i = 0, 5, ...

    Uses the model of ``hubert`` but not its streaming state.
    """
    num_f = math.ceil(audio.shape[0] / 16000 * 25)
    padded = np.concatenate(
        [np.zeros(CHUNK_SAMPLES - 4480, np.float32), audio.astype(np.float32), np.zeros(CHUNK_SAMPLES, np.float32)]
    )
    rows = []
    for i in range(0, num_f, ROWS_PER_CHUNK):
        start = int(i * 0.04 * 16000)  # float truncation kept on purpose: Ditto's frame 1615 starts 1 sample early
        rows.append(hubert.encode_chunk(padded[start : start + CHUNK_SAMPLES]))
    if not rows:
        return np.zeros((0, hubert.dim), np.float32)
    return np.concatenate(rows)[:num_f]


def _check_input(info: Any, name: str) -> None:
    if "float" not in str(info.type):
        raise ValueError(f"{name}: audio input {info.name!r} must be float32, model declares {info.type}")
    shape = list(info.shape or [])
    if len(shape) != 2 or any(isinstance(d, int) and d not in (1, CHUNK_SAMPLES) for d in shape):
        raise ValueError(f"{name}: audio input {info.name!r} must be [1, {CHUNK_SAMPLES}], model declares {shape}")
