"""``engine dataset build`` on a MEAD-style folder holding two good clips, a corrupt file and a faceless video:
it finishes, lists both bad ones with their reasons, writes the good ones with their parsed labels, and a second
build resumes (nothing redone)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.avatar.face import haar_cascade_path
from engine.avatar.prepare import prepare_avatar
from engine.train.shards import Dataset
from streaming.cli import main
from streaming.measure.planted import PlantedStyle, render_clip, speech, write_clip

pytestmark = pytest.mark.skipif(haar_cascade_path() is None, reason="installed OpenCV ships no Haar cascades")


def _astronaut(tmp: Path) -> Path:
    data = pytest.importorskip("skimage.data")
    path = tmp / "astronaut.png"
    Image.fromarray(np.asarray(data.astronaut(), np.uint8)).save(path)
    return path


def test_build_skips_bad_videos_and_resumes(tmp_path: Path) -> None:
    videos = tmp_path / "mead"
    happy = videos / "M003" / "video" / "front" / "happy" / "level_2" / "001.mp4"
    neutral = videos / "M003" / "video" / "front" / "neutral" / "level_1" / "001.mp4"
    happy.parent.mkdir(parents=True)
    neutral.parent.mkdir(parents=True)
    avatar = prepare_avatar(_astronaut(tmp_path), "astro")
    audio = speech("Hello there, how are you today?")[: 16000 * 2]
    render_clip(happy, avatar, audio, PlantedStyle(lip_scale=1.3), size=192)
    shutil.copyfile(happy, neutral)
    corrupt = videos / "M003" / "video" / "front" / "sad" / "level_3" / "002.mp4"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(happy.read_bytes()[:4000])  # cut short: no decodable stream
    faceless = videos / "sky.mp4"
    yy, xx = np.mgrid[0:192, 0:192]
    sky = [np.stack([100 + 0 * xx, 150 + (yy // 4 + i) % 40, 220 + 0 * xx], -1).astype(np.uint8) for i in range(40)]
    write_clip(faceless, np.stack(sky), audio[:25600])

    out = tmp_path / "ds"
    args = ["dataset", "build", str(videos), "--out", str(out), "--workers", "2", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    reasons = {Path(s["source"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"002.mp4", "sky.mp4"}, reasons
    assert "decode" in reasons["002.mp4"] or "damaged" in reasons["002.mp4"] or "no video" in reasons["002.mp4"]
    assert "no face" in reasons["sky.mp4"]
    ds = Dataset(out)
    assert len(ds) == 2
    labels = sorted((c.emotion, c.meta["level"], c.speaker, c.intensity) for c in ds.clips)
    assert labels == [("happy", 2, "M003", 0.75), ("neutral", 1, "M003", 0.5)]
    arrays = ds.arrays(ds.clips[0])
    frames = ds.clips[0].frames
    assert frames == 50
    assert arrays["audio"].shape == (frames, 81) and arrays["mesh/expr"].shape == (frames, 21, 3)
    assert arrays["valid"].mean() > 0.9
    # the lips moved with the speech: the lower lip's vertical spread is well above the tracking noise
    lower_lip = arrays["mesh/expr"][:, 17, 1]
    assert lower_lip.max() - lower_lip.min() > 0.1  # eye distances

    again = CliRunner().invoke(main, [*args[:-3], "--workers", "1", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "0 new" in again.output
    assert json.loads((out / "report.json").read_text())["kept"] == 2
