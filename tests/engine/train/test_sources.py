"""Which videos a dataset takes and their labels: folders, globs, CSVs, MEAD paths and CREMA-D names."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.train.sources import SourceError, list_sources, parse_labels


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_mead_and_crema_names() -> None:
    mead = Path("/data/MEAD/W015/video/front/surprised/level_3/012.mp4")
    assert parse_labels(mead) == ("W015", "surprised", 3, "mead")
    assert parse_labels(Path("/x/1001_DFA_ANG_XX.flv")) == ("1001", "angry", None, "crema-d")
    assert parse_labels(Path("/x/1042_IEO_HAP_HI.flv")) == ("1042", "happy", 3, "crema-d")
    assert parse_labels(Path("/x/webcam.mp4")) == (None, None, None, "")


def test_folder_glob_and_csv(tmp_path: Path) -> None:
    a = _touch(tmp_path / "M003" / "video" / "front" / "sad" / "level_1" / "001.mp4")
    b = _touch(tmp_path / "clips" / "talk.webm")
    _touch(tmp_path / "notes.txt")
    found = list_sources(tmp_path)
    assert [s.path for s in found] == sorted([a, b])
    sad = next(s for s in found if s.path == a)
    assert (sad.speaker, sad.emotion, sad.level, sad.intensity) == ("M003", "sad", 1, 0.5)
    assert [s.path for s in list_sources(str(tmp_path / "clips" / "*.webm"))] == [b]
    csv = tmp_path / "list.csv"
    csv.write_text("path,emotion,intensity,speaker,split\nclips/talk.webm,Happiness,1.2,bob,val\n")
    (row,) = list_sources(csv)
    assert (row.path, row.emotion, row.intensity, row.speaker, row.split) == (b, "happy", 1.2, "bob", "val")
    assert row.id == next(s.id for s in found if s.path == b)  # the same video has the same id either way


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,emotion\nx.mp4,bored\n", "unknown emotion"),
        ("file\nx.mp4\n", "'path' column"),
        ("path,split\nx.mp4,test\n", "split"),
        ("path,intensity\nx.mp4,7\n", "intensity"),
    ],
)
def test_bad_csv_is_refused(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(SourceError, match=match):
        list_sources(tmp_path / "l.csv")


def test_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no videos"):
        list_sources(tmp_path)
    with pytest.raises(SourceError, match="no such"):
        list_sources(tmp_path / "missing")
