"""HubertStreaming: Ditto's chunking / alignment (§5.1) with a small stand-in ONNX model built here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.audio.hubert import (
    CHUNK_SAMPLES,
    OFFLINE_PREFIX,
    ONLINE_PREFIX,
    HubertStreaming,
    hubert_offline,
)

DIM = 1024
WIN, STRIDE = 400, 320  # HuBERT's conv front end: 6480 samples -> 20 encodings at 50 Hz


def _weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((DIM, 1, WIN)) * 0.05).astype(np.float32), rng.standard_normal(DIM).astype(np.float32)


def _reference_chunk(chunk: np.ndarray) -> np.ndarray:
    """What the stand-in model computes, in numpy: encoding j = W . chunk[320 j : 320 j + 400] + b."""
    w, b = _weights()
    n = (chunk.shape[0] - WIN) // STRIDE + 1
    windows = np.stack([chunk[j * STRIDE : j * STRIDE + WIN] for j in range(n)])  # [20, 400]
    return (windows.astype(np.float64) @ w[:, 0].T.astype(np.float64) + b).astype(np.float32)  # [20, D]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w, b = _weights()
    nodes = [
        helper.make_node("Reshape", ["audio", "shape3"], ["x3"]),
        helper.make_node("Conv", ["x3", "w", "b"], ["conv"], strides=[STRIDE]),  # [1, D, 20]
        helper.make_node("Transpose", ["conv"], ["encodings"], perm=[0, 2, 1]),  # [1, 20, D]
    ]
    graph = helper.make_graph(
        nodes,
        "hubert_standin",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, CHUNK_SAMPLES])],
        [helper.make_tensor_value_info("encodings", TensorProto.FLOAT, [1, 20, DIM])],
        [
            numpy_helper.from_array(np.array([1, 1, CHUNK_SAMPLES], np.int64), "shape3"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(b, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("hubert") / "hubert_streaming_fix_kv.onnx"
    onnx.save(model, str(path))
    return path


def _expected_rows(audio: np.ndarray, prefix: int) -> np.ndarray:
    """Ditto's loop written out: chunk k starts at 3200 k of [prefix zeros, audio, zeros]; keep [-14:-4], pair-avg."""
    total = math.ceil(audio.shape[0] / 640)
    padded = np.concatenate([np.zeros(prefix, np.float32), audio, np.zeros(2 * CHUNK_SAMPLES, np.float32)])
    rows = []
    for k in range(math.ceil(total / 5)):
        enc = _reference_chunk(padded[3200 * k : 3200 * k + CHUNK_SAMPLES])
        rows.append(enc[-14:-4].reshape(5, 2, DIM).mean(axis=1))
    return np.concatenate(rows)[:total] if rows else np.zeros((0, DIM), np.float32)


def _audio(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def test_chunk_encoding_matches_reference(model_path: Path) -> None:
    hub = HubertStreaming(model_path)
    assert hub.dim == DIM and hub.fps == 25
    chunk = _audio(CHUNK_SAMPLES, 1)
    rows = hub.encode_chunk(chunk)
    ref = _reference_chunk(chunk)
    assert rows.shape == (5, DIM)
    np.testing.assert_allclose(rows[0], (ref[6] + ref[7]) / 2, atol=1e-4)
    np.testing.assert_allclose(rows[4], (ref[14] + ref[15]) / 2, atol=1e-4)


@pytest.mark.parametrize("prefix", [ONLINE_PREFIX, OFFLINE_PREFIX])
@pytest.mark.parametrize("seed", range(3))
def test_streaming_alignment_and_chunking(model_path: Path, prefix: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 16000 * 2))
    audio = _audio(n, seed)
    hub = HubertStreaming(model_path, prefix_samples=prefix)
    parts, i = [], 0
    while i < n:
        k = int(rng.integers(0, 4000))
        parts.append(hub.push(audio[i : i + k]))
        i += k
    streamed = np.concatenate([*parts, hub.flush()])
    assert streamed.shape == (math.ceil(n / 640), DIM)
    np.testing.assert_allclose(streamed, _expected_rows(audio, prefix), atol=1e-4)
    if prefix == OFFLINE_PREFIX:  # offline prefix == Ditto's wav2feat
        np.testing.assert_array_equal(streamed, hubert_offline(hub, audio))


def test_rows_released_with_documented_lookahead(model_path: Path) -> None:
    hub = HubertStreaming(model_path)
    audio = _audio(16000, 5)
    # chunk 0 (rows 0..4) needs 6480 - 1920 = 4560 samples; chunk 1 another 3200
    assert hub.push(audio[:4559]).shape[0] == 0
    assert hub.push(audio[4559:4560]).shape[0] == 5
    assert hub.push(audio[4560:7759]).shape[0] == 0
    assert hub.push(audio[7759:7760]).shape[0] == 5
    assert hub.silence().shape == (DIM,)


def test_bad_model_and_input(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        HubertStreaming(tmp_path / "missing.onnx")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["y"])],
        "bad",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 100])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])],
    )
    bad = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(bad))
    with pytest.raises(ValueError, match="must be"):
        HubertStreaming(bad)
    with pytest.raises(ValueError, match="mono"):
        HubertStreaming(model_path).push(np.zeros((4, 2), np.float32))
