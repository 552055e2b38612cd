"""streaming.measure.info: the environment every benchmark result records, and the JSON writer."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import pytest

from streaming.measure import info as benchinfo


def test_environment_names_device_commit_and_time() -> None:
    env = benchinfo.environment()
    assert isinstance(env["device"], str) and env["device"].strip()
    assert env["device_type"] == "cpu"
    # a checkout gives a full sha (maybe marked dirty); only a copy without git may say "unknown"
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", env["commit"]), env["commit"]
    assert env["torch"] and env["python"] and env["platform"]
    assert env["torch_threads"] >= 1 and env["cpu_count"] >= 1
    assert datetime.fromisoformat(env["timestamp_utc"]).utcoffset() is not None


@pytest.mark.parametrize(("status", "expected"), [("", "abc123"), (" M engine/x.py", "abc123-dirty")])
def test_commit_marks_a_dirty_tree(monkeypatch: pytest.MonkeyPatch, status: str, expected: str) -> None:
    answers = {"rev-parse": "abc123", "status": status}
    monkeypatch.setattr(benchinfo, "_git", lambda *args: answers[args[0]])
    assert benchinfo.git_commit() == expected


def test_write_result_round_trips_and_adds_environment(tmp_path: Path) -> None:
    payload = {"benchmark": "demo", "results": [{"ms": 1.5}], "config": {"threads": 2}}
    path = benchinfo.write_result(tmp_path / "new" / "dir" / "demo.json", payload)
    written = json.loads(path.read_text())
    assert {k: written[k] for k in payload} == payload
    assert written["environment"]["device"] and written["environment"]["commit"]

    given = {"benchmark": "demo", "environment": {"device": "given", "commit": "c0ffee"}}
    assert json.loads(benchinfo.write_result(path, given).read_text()) == given
