"""Ditto checkpoint import: layout search, HuBERT ONNX copy, and clear errors for bad input."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from engine.importers.ditto import LMDM_FILE, describe, import_ditto
from engine.motion import lmdm
from engine.motion.lmdm import hubert_onnx_path
from engine.weights.checkpoint import CheckpointError, read_record, save_tensors, write_record
from streaming.cli import main


@dataclasses.dataclass
class NotATensor:
    """Pickled into a checkpoint, it needs arbitrary unpickling: the importer must refuse the file."""

    value: int = 1


def _cheap_state() -> dict[str, torch.Tensor]:
    # stride-0 views of one scalar: right shapes, a few bytes on disk (errors are found before materialising)
    return {k: torch.zeros(()).expand(s) for k, s in lmdm.manifest_entries()}


def _save(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def _tiny_onnx(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_missing_and_misshaped_keys_are_named(tmp_path: Path) -> None:
    state = _cheap_state()
    del state["seqTransDecoder.stack.3.film2.block.1.weight"]
    state["final_layer.weight"] = torch.zeros(264, 512)
    state["extra.bias"] = torch.zeros(3)
    src = _save(tmp_path / LMDM_FILE, {"model_state_dict": state})
    with pytest.raises(CheckpointError) as info:
        import_ditto(src, tmp_path / "store")
    message = str(info.value)
    assert str(src) in message
    assert "missing keys (1): seqTransDecoder.stack.3.film2.block.1.weight" in message
    assert "unexpected keys (1): extra.bias" in message
    assert "final_layer.weight: expected [265, 512], got [264, 512]" in message
    assert not (tmp_path / "store").exists()


def test_wrong_top_level_structure(tmp_path: Path) -> None:
    src = _save(tmp_path / LMDM_FILE, _cheap_state())  # a bare state dict, not Ditto's {"model_state_dict": ...}
    with pytest.raises(CheckpointError, match="a dict with 'model_state_dict'"):
        import_ditto(src, tmp_path / "store")
    src = _save(tmp_path / "list.pth", [torch.zeros(1)])
    with pytest.raises(CheckpointError, match="found list"):
        import_ditto(src, tmp_path / "store")


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    src = _save(tmp_path / LMDM_FILE, {"model_state_dict": _cheap_state(), "cfg": NotATensor()})
    with pytest.raises(CheckpointError, match="refused"):
        import_ditto(src, tmp_path / "store")


def test_missing_source_is_explained(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file or folder"):
        import_ditto(tmp_path / "nowhere", tmp_path / "store")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"ditto_pytorch/models/lmdm_v0\.4_hubert\.pth"):
        import_ditto(tmp_path / "empty", tmp_path / "store")


def test_disagreeing_rotary_copies_are_refused(tmp_path: Path) -> None:
    state = _cheap_state()
    state["seqTransDecoder.stack.5.rotary.freqs"] = torch.ones(256)
    src = _save(tmp_path / LMDM_FILE, {"model_state_dict": state})
    with pytest.raises(CheckpointError, match=r"rotary\.freqs copies disagree.*stack\.5"):
        import_ditto(src, tmp_path / "store")


def test_bad_hubert_onnx_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "ckpt" / "ditto_pytorch" / "models" / LMDM_FILE, {"model_state_dict": _cheap_state()})
    (tmp_path / "ckpt" / "ditto_onnx").mkdir()
    (tmp_path / "ckpt" / "ditto_onnx" / "hubert_streaming_fix_kv.onnx").write_bytes(b"\xff\xff not onnx")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        import_ditto(tmp_path / "ckpt", tmp_path / "store")


@pytest.mark.parametrize("point_at", ["folder", "pth"])
def test_release_layout_with_hubert_through_cli(tmp_path: Path, point_at: str) -> None:
    """Ditto's release (ditto_pytorch/models + ditto_onnx) imports through the CLI, HuBERT included, whether the
    user names the release folder or the .pth inside it."""
    state = _cheap_state()
    src = _save(tmp_path / "checkpoints" / "ditto_pytorch" / "models" / LMDM_FILE, {"model_state_dict": state})
    onnx_src = _tiny_onnx(tmp_path / "checkpoints" / "ditto_onnx" / "hubert_streaming_fix_kv.onnx")
    dst = tmp_path / "store"
    given = tmp_path / "checkpoints" if point_at == "folder" else src
    result = CliRunner().invoke(main, ["weights", "import", "ditto", str(given), "--out", str(dst)])
    assert result.exit_code == 0, result.output
    assert "streaming HuBERT: hubert_streaming_fix_kv.onnx" in result.output
    record = read_record(dst)
    assert record["kind"] == "ditto" and record["preset"] == "ditto"
    assert record["files"]["hubert_onnx"] == "hubert_streaming_fix_kv.onnx"
    assert record["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest() == record["sources"]["lmdm"]["sha256"]
    copied = hubert_onnx_path(dst)
    assert copied is not None and copied.read_bytes() == onnx_src.read_bytes()
    info = CliRunner().invoke(main, ["weights", "info", str(dst)])
    assert info.exit_code == 0 and "LMDM denoiser (preset ditto)" in info.output, info.output


def test_failed_cli_import_is_a_clean_error(tmp_path: Path) -> None:
    src = _save(tmp_path / LMDM_FILE, {"weights": {}})
    result = CliRunner().invoke(main, ["weights", "import", "ditto", str(src), "--out", str(tmp_path / "s")])
    assert result.exit_code != 0
    assert "model_state_dict" in result.output and "Traceback" not in result.output


def test_load_refuses_other_stores(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not an engine weight store"):
        lmdm.load(tmp_path)
    (tmp_path / "engine_weights.json").write_text('{"format": 1, "kind": "liveportrait"}')
    with pytest.raises(CheckpointError, match="not a Ditto one"):
        lmdm.load(tmp_path)
    with pytest.raises(CheckpointError, match="not a Ditto one"):
        describe(tmp_path)


def _write_tiny_store(dst: Path, state: dict[str, torch.Tensor]) -> None:
    dst.mkdir()
    save_tensors(dst / "lmdm.safetensors", state)
    config = dataclasses.asdict(lmdm.preset_config("tiny"))
    write_record(dst, {"kind": "ditto", "preset": "tiny", "config": config, "files": {"lmdm": "lmdm.safetensors"}})


def test_load_round_trip_and_tampered_store(tmp_path: Path) -> None:
    built = lmdm.build("tiny")
    state = {k: v.clone() for k, v in built.state_dict().items()}
    _write_tiny_store(tmp_path / "good", state)
    loaded = lmdm.load(tmp_path / "good")
    assert not loaded.untrained and loaded.config == built.config
    for key, value in built.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    del state["seqTransDecoder.stack.1.norm3.bias"]
    _write_tiny_store(tmp_path / "bad", state)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): seqTransDecoder\.stack\.1\.norm3\.bias"):
        lmdm.load(tmp_path / "bad")
