"""Checkpoint compatibility: the golden deterministic weights, saved in the official LivePortrait file layout,
go through the real ``engine weights import liveportrait`` and the loaded networks must reproduce the golden
tensors (``tests/data/golden/liveportrait_golden.npz``) to 1e-4."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from engine.models import liveportrait
from engine.weights.deterministic import deterministic_state_dict
from streaming.cli import main

TOL = 1e-4

OFFICIAL_FILES = {
    "appearance_feature_extractor": "base_models/appearance_feature_extractor.pth",
    "motion_extractor": "base_models/motion_extractor.pth",
    "warping_module": "base_models/warping_module.pth",
    "spade_generator": "base_models/spade_generator.pth",
}


def _tiny_onnx(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path))


def write_official_layout(root: Path, manifest: dict[str, Any]) -> None:
    """``root`` = a pretrained_weights folder with liveportrait/ and insightface/ as shipped officially."""
    lp_dir = root / "liveportrait"
    for entry, rel in OFFICIAL_FILES.items():
        path = lp_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(deterministic_state_dict([(k, s) for k, s, _ in manifest[entry]]), path)
    bundle = {}
    for entry in ("retarget_shoulder", "retarget_mouth", "retarget_eye"):
        state = deterministic_state_dict([(k, s) for k, s, _ in manifest[f"stitching_retargeting_module.{entry}"]])
        # DDP leftovers: a leading prefix on one net, an inner occurrence on another
        if entry == "retarget_shoulder":
            state = {f"module.{k}": v for k, v in state.items()}
        elif entry == "retarget_eye":
            state = {k.replace("mlp.", "mlp.module."): v for k, v in state.items()}
        bundle[entry] = state
    path = lp_dir / "retargeting_models" / "stitching_retargeting_module.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(bundle, path)
    _tiny_onnx(root / "insightface" / "models" / "buffalo_l" / "det_10g.onnx")
    _tiny_onnx(root / "insightface" / "models" / "buffalo_l" / "2d106det.onnx")
    _tiny_onnx(lp_dir / "landmark.onnx")


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict[str, np.ndarray]:
    with np.load(golden_dir / "liveportrait_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, golden_dir: Path) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("lp")
    root = base / "pretrained_weights"
    manifest = json.loads((golden_dir / "liveportrait_manifest.json").read_text())
    write_official_layout(root, manifest)
    dst = base / "store"
    result = CliRunner().invoke(main, ["weights", "import", "liveportrait", str(root), "--out", str(dst)])
    shutil.rmtree(root)  # ~0.5 GB of checkpoints; pytest keeps old temp dirs around
    assert result.exit_code == 0, result.output
    assert "imported LivePortrait weights" in result.output
    yield dst
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def nets(store: Path) -> liveportrait.LivePortraitNets:
    return liveportrait.load(store)


def _t(golden: dict[str, np.ndarray], key: str) -> torch.Tensor:
    return torch.from_numpy(golden[key])


def _check(actual: torch.Tensor, golden: dict[str, np.ndarray], key: str) -> None:
    expected = golden[key]
    assert tuple(actual.shape) == expected.shape, key
    err = float(np.abs(actual.detach().numpy() - expected).max())
    assert err <= TOL, f"{key}: max abs err {err:.3g} > {TOL}"


def test_store_record_and_detectors(store: Path, nets: liveportrait.LivePortraitNets) -> None:
    record = json.loads((store / "engine_weights.json").read_text())
    assert record["kind"] == "liveportrait" and record["preset"] == "liveportrait"
    assert set(record["source_sha256"]) == {
        *OFFICIAL_FILES.values(),
        "retargeting_models/stitching_retargeting_module.pth",
    }
    assert sorted(record["detectors"]) == ["2d106det.onnx", "det_10g.onnx", "landmark.onnx"]
    for rel in record["detectors"].values():
        onnx.load(str(store / rel))
    assert nets.untrained is False and nets.preset == "liveportrait"
    for module in nets.networks().values():
        assert not module.training
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())
    info = CliRunner().invoke(main, ["weights", "info", str(store)])
    assert info.exit_code == 0, info.output
    assert "det_10g.onnx" in info.output and record["weights_id"] in info.output


def test_stitching_mlps(nets: liveportrait.LivePortraitNets, golden: dict[str, np.ndarray]) -> None:
    with torch.inference_mode():
        for entry, net in (
            ("retarget_shoulder", nets.stitching),
            ("retarget_mouth", nets.lip),
            ("retarget_eye", nets.eye),
        ):
            _check(net(_t(golden, f"stitching_input.{entry}")), golden, f"stitching.{entry}")


@pytest.mark.slow
def test_appearance(nets: liveportrait.LivePortraitNets, golden: dict[str, np.ndarray]) -> None:
    with torch.inference_mode():
        _check(nets.appearance(_t(golden, "input.image")), golden, "appearance.feature_3d")


@pytest.mark.slow
def test_motion(nets: liveportrait.LivePortraitNets, golden: dict[str, np.ndarray]) -> None:
    with torch.inference_mode():
        out = nets.motion(_t(golden, "input.image"))
    for field in ("pitch", "yaw", "roll", "t", "exp", "scale", "kp"):
        _check(getattr(out, field), golden, f"motion.{field}")


@pytest.mark.slow
def test_warping(nets: liveportrait.LivePortraitNets, golden: dict[str, np.ndarray]) -> None:
    with torch.inference_mode():
        out = nets.warping(
            _t(golden, "appearance.feature_3d"), _t(golden, "input.kp_driving"), _t(golden, "input.kp_source")
        )
    _check(out.out, golden, "warping.out")
    _check(out.occlusion, golden, "warping.occlusion_map")
    _check(out.deformation, golden, "warping.deformation")


@pytest.mark.slow
def test_decoder(nets: liveportrait.LivePortraitNets, golden: dict[str, np.ndarray]) -> None:
    with torch.inference_mode():
        _check(nets.decoder(_t(golden, "warping.out")), golden, "spade.image")
