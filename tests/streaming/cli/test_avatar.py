"""``engine avatar`` end to end through click (tiny preset, untrained weights, manual crop)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from streaming.cli import main


def _photo(path: Path) -> Path:
    rng = np.random.default_rng(11)
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(path)
    return path


def test_add_list_show_remove(tmp_path: Path, engine_home: Path) -> None:
    runner = CliRunner()
    photo = _photo(tmp_path / "me.png")
    # noise has no face to find landmarks on, and classic mode (no weights imported) needs them: give them
    points = tmp_path / "me.json"
    points.write_text(json.dumps(np.random.default_rng(3).uniform(40, 260, (68, 2)).tolist()))
    args = ["avatar", "add", str(photo), "--name", "me", "--crop", "20,20,256,256", "--landmarks", str(points)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "landmarks: 68 points, ibug68 (file)" in result.output
    # no LivePortrait weights: nothing neural is computed or cached, and no untrained-weights warning is printed
    assert "added avatar 'me'" in result.output and "no neural features" in result.output
    assert "UNTRAINED" not in result.output.upper().replace("NO NEURAL", "")

    result = runner.invoke(main, ["avatar", "list"])
    assert result.exit_code == 0 and result.output.startswith("me\t")
    assert "300x300" in result.output

    result = runner.invoke(main, ["avatar", "show", "me"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["name"] == "me" and shown["crop_size"] == 512 and shown["landmark_count"] == 68
    assert shown["landmark_method"] == "file"
    assert shown["weights_ids"] == []
    assert (engine_home / "avatars" / "entries" / shown["content_hash"] / "crop.png").is_file()

    result = runner.invoke(main, ["avatar", "remove", "me"])
    assert result.exit_code == 0 and "removed" in result.output
    result = runner.invoke(main, ["avatar", "show", "me"])
    assert result.exit_code != 0 and "no avatar named 'me'" in result.output


def test_add_errors_are_clear(tmp_path: Path) -> None:
    runner = CliRunner()
    photo = _photo(tmp_path / "me.png")
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((300, 300, 3), 100, np.uint8)).save(flat)
    cases = [
        (["avatar", "add", str(flat), "--name", "flat"], "--crop"),
        (["avatar", "add", str(photo), "--name", "../up", "--crop", "0,0,200,200"], "invalid avatar name"),
        (["avatar", "add", str(photo), "--name", "default", "--crop", "0,0,200,200"], "reserved"),
        (["avatar", "add", str(photo), "--name", "x", "--crop", "0,0,200"], "four integers"),
        (["avatar", "add", str(tmp_path / "none.png"), "--name", "x"], "not found"),
        (["avatar", "add", str(photo), "--name", "x", "--weights", str(tmp_path)], "not an engine weight store"),
    ]
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_show_default(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["avatar", "show", "default"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["name"] == "default" and shown["landmark_count"] > 0 and shown["landmark_scheme"]
