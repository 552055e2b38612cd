"""Placement by capacity and the autoscaling target: pure functions, no Ray."""

from __future__ import annotations

import pytest

from engine.config import ConfigError
from streaming.cluster.autoscale import LiveSessionsPolicy
from streaming.cluster.placement import Placement, ReplicaStatus, render_load, replicas_for_sessions
from streaming.cluster.ray_app import parse_args


def replicas(*loads: tuple[int, int]) -> list[ReplicaStatus]:
    return [ReplicaStatus(f"r{i}", f"http://r{i}", used, cap) for i, (used, cap) in enumerate(loads)]


def test_most_headroom_spreads_sessions_two_and_two() -> None:
    pool = {r.name: r for r in replicas((0, 2), (0, 2))}
    placed = []
    for _ in range(4):
        chosen = Placement().choose(pool.values())
        assert chosen is not None
        placed.append(chosen.name)
        pool[chosen.name] = ReplicaStatus(chosen.name, chosen.url, chosen.sessions + 1, chosen.max_sessions)
    assert sorted(placed) == ["r0", "r0", "r1", "r1"]
    assert placed[:2] in (["r0", "r1"], ["r1", "r0"])  # alternates instead of filling one first
    assert Placement().choose(pool.values()) is None  # every slot held: the caller answers 503


def test_pack_fills_the_busiest_replica_first() -> None:
    chosen = Placement("pack").choose(replicas((1, 4), (3, 4), (0, 4)))
    assert chosen is not None and chosen.name == "r1"
    chosen = Placement("most-headroom").choose(replicas((1, 4), (3, 4), (0, 4)))
    assert chosen is not None and chosen.name == "r2"


def test_pending_placements_count_before_the_replica_reports_them() -> None:
    pool = replicas((0, 2), (1, 2))
    assert Placement().choose(pool, {"r0": 1}).name in ("r0", "r1")  # type: ignore[union-attr]
    chosen = Placement().choose(pool, {"r0": 2})
    assert chosen is not None and chosen.name == "r1"
    assert Placement().choose(pool, {"r0": 2, "r1": 1}) is None


def test_draining_replicas_take_no_new_session() -> None:
    pool = [ReplicaStatus("a", "http://a", 0, 4, draining=True), ReplicaStatus("b", "http://b", 3, 4)]
    chosen = Placement().choose(pool)
    assert chosen is not None and chosen.name == "b"
    assert Placement().choose(pool[:1]) is None


def test_render_load_breaks_ties() -> None:
    pool = [
        ReplicaStatus("a", "http://a", 1, 4, render_load=0.9),
        ReplicaStatus("b", "http://b", 1, 4, render_load=0.2),
    ]
    chosen = Placement().choose(pool)
    assert chosen is not None and chosen.name == "b"


def test_a_saturated_renderer_takes_no_new_session_when_capped() -> None:
    # 2 sessions at 25 fps, batches of 1, 30 ms a call: 50 calls/s x 30 ms = busy 1.5 s per second
    assert render_load(2, 25, 1.0, 30.0) == pytest.approx(1.5)
    assert render_load(2, 25, 2.0, 30.0) == pytest.approx(0.75)  # batching halves the calls
    assert render_load(0, 25, 1.0, 30.0) == 0.0
    busy = ReplicaStatus("a", "http://a", 1, 8, render_load=1.2)
    calm = ReplicaStatus("b", "http://b", 3, 4, render_load=0.4)
    assert Placement().choose([busy, calm]) is busy  # uncapped: more free slots wins
    assert Placement(max_render_load=0.9).choose([busy, calm]) is calm
    assert Placement(max_render_load=0.3).choose([busy, calm]) is None
    with pytest.raises(ConfigError, match="max_render_load"):
        Placement(max_render_load=0)


def test_bad_policy_and_numbers_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown placement policy 'random'"):
        Placement("random")
    with pytest.raises(ConfigError, match="must be >= 0"):
        ReplicaStatus("a", "http://a", -1, 2)
    with pytest.raises(ConfigError, match="sessions_per_replica"):
        replicas_for_sessions(3, 0, 1, 4)


@pytest.mark.parametrize(
    ("sessions", "per", "lo", "hi", "expected"),
    [(0, 2, 1, 4, 1), (0, 2, 0, 4, 0), (3, 2, 1, 4, 2), (4, 2, 1, 4, 2), (5, 2, 1, 4, 3), (40, 2, 1, 4, 4)],
)
def test_replicas_for_sessions(sessions: int, per: float, lo: int, hi: int, expected: int) -> None:
    assert replicas_for_sessions(sessions, per, lo, hi) == expected


class _Context:
    """The attributes of Serve's AutoscalingContext the policy reads."""

    def __init__(self, per_replica: dict[str, float], lo: int = 1, hi: int = 8) -> None:
        self.aggregated_metrics = {"live_sessions": per_replica}
        self.capacity_adjusted_min_replicas = lo
        self.capacity_adjusted_max_replicas = hi
        self.policy_state: dict = {}


def test_autoscaling_follows_live_sessions_not_requests() -> None:
    policy = LiveSessionsPolicy(sessions_per_replica=1.5)
    assert policy(_Context({"r1": 2.0, "r2": 2.0}))[0] == 3  # 4 sessions / 1.5 -> 3 replicas
    assert policy(_Context({"r1": 0.0, "r2": 0.0}))[0] == 1  # idle: down to the minimum
    assert policy(_Context({"r1": 2.0, "r2": 2.0}, hi=2))[0] == 2
    wanted, state = policy(_Context({}))
    assert wanted == 1 and state["live_sessions"] == 0.0
    with pytest.raises(ValueError, match="sessions_per_replica"):
        LiveSessionsPolicy(0)


def test_serve_run_arguments_are_parsed_and_unknown_ones_named() -> None:
    runtime, avatar, server, spec = parse_args({"mode": "classic", "replicas": "3", "max_sessions": 2, "port": "9000"})
    assert runtime.mode == "classic" and avatar is None
    assert server.max_sessions == 2 and spec.replicas == 3 and spec.front_port == 9000 and not spec.autoscaling
    _, _, turned, _ = parse_args({"ice_servers": "stun:stun.example.net:3478, turn:u:p@turn.example.net:3478"})
    assert [i.url for i in turned.ice_servers] == ["stun:stun.example.net:3478", "turn:turn.example.net:3478"]
    _, _, _, scaled = parse_args({"min_replicas": 1, "max_replicas": 4, "sessions_per_replica": "1.5"})
    assert scaled.autoscaling and scaled.sessions_per_replica == 1.5
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['replica'\]"):
        parse_args({"replica": 2})
    with pytest.raises(ConfigError, match="bad argument value"):
        parse_args({"replicas": "two"})
    with pytest.raises(ConfigError, match="needs both min_replicas and max_replicas"):
        parse_args({"min_replicas": 1})
    with pytest.raises(ConfigError, match="unknown renderer"):
        parse_args({"mode": "cartoon"})
    with pytest.raises(ConfigError, match="max_render_load must be > 0"):
        parse_args({"max_render_load": "-1"})
