"""``engine weights import liveportrait`` on bad input: clear errors naming keys and files, unsafe pickles refused,
the destination untouched; ``engine weights info`` on a store and on a non-store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engine.importers.liveportrait import describe, import_liveportrait
from engine.models import liveportrait
from engine.weights.checkpoint import CheckpointError, save_tensors, write_record
from engine.weights.deterministic import deterministic_state_dict
from streaming.cli import main


class NotATensor:
    """Anything that needs arbitrary unpickling (a class from this test module)."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def _appearance_state() -> dict[str, torch.Tensor]:
    entries = liveportrait.reference_manifest()["appearance_feature_extractor"]
    return deterministic_state_dict(entries)


def _src_with_appearance(tmp_path: Path, state: object) -> Path:
    src = tmp_path / "pretrained_weights" / "liveportrait"
    (src / "base_models").mkdir(parents=True)
    torch.save(state, src / "base_models" / "appearance_feature_extractor.pth")
    return src


@pytest.fixture
def existing_store(tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    dst.mkdir()
    (dst / "marker.txt").write_text("previous import")
    return dst


def _assert_untouched(dst: Path) -> None:
    assert sorted(p.name for p in dst.iterdir()) == ["marker.txt"]
    assert (dst / "marker.txt").read_text() == "previous import"
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith(".store.")]
    assert leftovers == []


def _import_cli(src: Path, dst: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["weights", "import", "liveportrait", str(src), "--out", str(dst)])
    return result.exit_code, result.output


def test_mismatched_checkpoint_names_keys_and_file(tmp_path: Path, existing_store: Path) -> None:
    state = _appearance_state()
    del state["second.bias"]  # missing
    state["extra.weight"] = torch.zeros(3)  # unexpected
    state["first.conv.weight"] = torch.zeros(64, 3, 5, 5)  # mis-shaped
    src = _src_with_appearance(tmp_path, state)
    code, output = _import_cli(src, existing_store)
    assert code != 0
    assert "appearance_feature_extractor.pth" in output
    assert "second.bias" in output and "extra.weight" in output
    assert "first.conv.weight: expected [64, 3, 3, 3], got [64, 3, 5, 5]" in output
    _assert_untouched(existing_store)


def test_partial_folder_names_the_missing_file(tmp_path: Path, existing_store: Path) -> None:
    src = _src_with_appearance(tmp_path, _appearance_state())  # motion/warping/decoder/stitching absent
    with pytest.raises(CheckpointError, match=r"motion_extractor\.pth"):
        import_liveportrait(src.parent, existing_store)  # the pretrained_weights root is accepted too
    _assert_untouched(existing_store)


def test_unsafe_pickle_is_refused(tmp_path: Path, existing_store: Path) -> None:
    src = _src_with_appearance(tmp_path, {"first.conv.weight": NotATensor()})
    code, output = _import_cli(src, existing_store)
    assert code != 0
    assert "refused" in output and "appearance_feature_extractor.pth" in output
    _assert_untouched(existing_store)


@pytest.mark.parametrize("content", [b"definitely not protobuf", b""])
def test_invalid_detector_onnx_fails_before_writing(tmp_path: Path, existing_store: Path, content: bytes) -> None:
    src = _src_with_appearance(tmp_path, _appearance_state())
    (src / "landmark.onnx").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"landmark\.onnx"):
        import_liveportrait(src, existing_store)
    _assert_untouched(existing_store)


def test_not_a_pretrained_weights_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="base_models"):
        import_liveportrait(tmp_path / "empty", tmp_path / "store")
    with pytest.raises(CheckpointError, match="not a directory"):
        import_liveportrait(tmp_path / "missing", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_info_describes_a_store_and_rejects_other_folders(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    write_record(
        store,
        {
            "kind": "liveportrait",
            "preset": "liveportrait",
            "weights_id": "liveportrait-0123456789abcdef",
            "engine_version": "0.1.0",
            "networks": {"appearance": {"file": "appearance.safetensors", "parameters": 1_500_000}},
            "detectors": {},
        },
    )
    result = CliRunner().invoke(main, ["weights", "info", str(store)])
    assert result.exit_code == 0, result.output
    assert "liveportrait-0123456789abcdef" in result.output and "1.50 M" in result.output
    assert "detectors: none" in result.output

    empty = tmp_path / "not-a-store"
    empty.mkdir()
    result = CliRunner().invoke(main, ["weights", "info", str(empty)])
    assert result.exit_code != 0 and "not an engine weight store" in result.output

    other = tmp_path / "other"
    other.mkdir()
    (other / "engine_weights.json").write_text(json.dumps({"format": 1, "kind": "something-else"}))
    with pytest.raises(CheckpointError, match="something-else"):
        describe(other)


def test_load_refuses_a_store_with_wrong_shapes(tmp_path: Path) -> None:
    """``liveportrait.load`` is strict: a tampered safetensors file is named in the error."""

    nets = liveportrait.build("tiny")
    store = tmp_path / "store"
    store.mkdir()
    for name, module in nets.networks().items():
        save_tensors(store / f"{name}.safetensors", module.state_dict())
    write_record(store, {"kind": "liveportrait", "preset": "tiny", "weights_id": "t"})
    assert liveportrait.load(store).untrained is False  # the store itself is trusted as imported

    save_tensors(store / "lip.safetensors", {"mlp.0.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match=r"lip\.safetensors"):
        liveportrait.load(store)
