"""Full-size golden weights through the user path: official layout -> ``engine weights import liveportrait`` ->
``engine export onnx --weights`` -> onnxruntime (CPU), matching eager to 1e-4 and the golden tensors to 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.models import liveportrait
from engine.models.motion_extractor import MotionOutput
from export import graphs, onnx_export
from export.backends import BackendConfig, get_backend
from streaming.cli import main
from tests.engine.models.test_golden import write_official_layout

TOL = 1e-4
MODULES = ("appearance", "motion", "warping_decoder", "stitching", "eye", "lip")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict[str, np.ndarray]:
    with np.load(golden_dir / "liveportrait_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, golden_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("lp") / "pretrained_weights"
    write_official_layout(root, json.loads((golden_dir / "liveportrait_manifest.json").read_text()))
    dst = root.parent / "store"
    result = CliRunner().invoke(main, ["weights", "import", "liveportrait", str(root), "--out", str(dst)])
    assert result.exit_code == 0, result.output
    return dst


@pytest.fixture(scope="module")
def exported(store: Path) -> Path:
    out = store.parent / "onnx"
    args = ["export", "onnx", "--weights", str(store), "--out", str(out)]
    for name in MODULES:
        args += ["--module", name]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "UNTRAINED" not in result.output
    return out


@pytest.fixture(scope="module")
def golden_graphs(store: Path) -> dict[str, graphs.Graph]:
    return graphs.renderer_graphs(liveportrait.load(store), names=MODULES)


def _err(a: torch.Tensor, b: torch.Tensor | np.ndarray) -> float:
    b = torch.as_tensor(b)
    assert tuple(a.shape) == tuple(b.shape)
    return float((a - b).abs().max())


def test_index_records_the_store(exported: Path, store: Path) -> None:
    index = onnx_export.read_index(exported)
    assert index["source"]["preset"] == "liveportrait" and index["source"]["untrained"] == []
    assert index["source"]["liveportrait"]["store"] == str(store)
    recorded = json.loads((store / "engine_weights.json").read_text())["source_sha256"]
    assert index["source"]["liveportrait"]["source_sha256"] == recorded and len(recorded) == 5
    assert list(index["modules"]) == list(MODULES)
    assert index["modules"]["appearance"]["outputs"][0]["shape"] == [1, 32, 16, 64, 64]
    assert index["modules"]["warping_decoder"]["outputs"][0]["shape"] == [1, 3, 512, 512]


def test_onnxruntime_matches_eager_and_golden(
    exported: Path, golden_graphs: dict[str, graphs.Graph], golden: dict[str, np.ndarray]
) -> None:
    backend = get_backend(BackendConfig("onnxruntime", "cpu", "fp32", {"dir": exported}))
    t = {k: torch.from_numpy(v) for k, v in golden.items()}
    cases = {
        "appearance": ((t["input.image"],), ("appearance.feature_3d",)),
        "motion": ((t["input.image"],), tuple(f"motion.{k}" for k in MotionOutput._fields)),
        "warping_decoder": (
            (t["appearance.feature_3d"], t["input.kp_driving"], t["input.kp_source"]),
            ("spade.image",),
        ),
        "stitching": ((t["stitching_input.retarget_shoulder"],), ("stitching.retarget_shoulder",)),
        "eye": ((t["stitching_input.retarget_eye"],), ("stitching.retarget_eye",)),
        "lip": ((t["stitching_input.retarget_mouth"],), ("stitching.retarget_mouth",)),
    }
    for name, (inputs, golden_keys) in cases.items():
        graph = golden_graphs[name]
        got = backend.load(graph)(*inputs)
        eager = graph.run(*inputs)
        for key, a, e in zip(golden_keys, got, eager, strict=True):
            assert _err(a, e) <= TOL, f"{name}/{key}: onnxruntime vs eager"
            assert _err(a, golden[key]) <= TOL, f"{name}/{key}: onnxruntime vs golden"
