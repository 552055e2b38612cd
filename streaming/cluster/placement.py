"""Where a new session goes: a pure policy over the replicas' live numbers (no I/O, no Ray), so it is tested
without a cluster and the front door only feeds it what the replicas report."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from engine.config import ConfigError

POLICIES = ("most-headroom", "pack")


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as the front door last saw it."""

    name: str  # stable while the replica lives (Ray's replica id, or any unique label)
    url: str  # its own HTTP root: the single server's API, answered by that replica
    sessions: int  # live sessions (slots held)
    max_sessions: int
    draining: bool = False  # scaling down: keeps its sessions, takes no new one
    render_load: float = 0.0  # busy fraction of the render worker's frame budget (tie-break; 0 when unknown)

    def __post_init__(self) -> None:
        if self.max_sessions < 0 or self.sessions < 0:
            raise ConfigError(f"replica {self.name!r}: sessions and max_sessions must be >= 0")

    @property
    def headroom(self) -> int:
        return max(0, self.max_sessions - self.sessions)


@dataclass(frozen=True)
class Placement:
    """``most-headroom`` spreads sessions (each replica's renderer shares its CPU/GPU with fewer sessions);
    ``pack`` fills the busiest replica first (leaves whole replicas idle so scale-down can remove them)."""

    policy: str = "most-headroom"
    max_render_load: float | None = None  # a replica whose renderer is this busy takes no new session (None: off)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown placement policy {self.policy!r}; known: {list(POLICIES)}")
        if self.max_render_load is not None and not self.max_render_load > 0:
            raise ConfigError(f"max_render_load must be > 0, got {self.max_render_load}")

    def choose(
        self, replicas: Iterable[ReplicaStatus], pending: Mapping[str, int] | None = None
    ) -> ReplicaStatus | None:
        """The replica for a new session, or None when every replica is full or draining. ``pending``: sessions
        the front door has sent to a replica that its last report does not count yet (name -> count)."""
        pending = pending or {}
        cap = self.max_render_load
        free = [
            (r.headroom - pending.get(r.name, 0), r)
            for r in replicas
            if not r.draining and (cap is None or r.render_load < cap)
        ]
        free = [(room, r) for room, r in free if room > 0]
        if not free:
            return None
        if self.policy == "pack":
            return min(free, key=lambda item: (item[0], item[1].render_load, item[1].name))[1]
        return max(free, key=lambda item: (item[0], -item[1].render_load, _reverse(item[1].name)))[1]


def _reverse(name: str) -> tuple[int, ...]:
    """Ties go to the smallest name (max() over the negated code points) so a choice is reproducible."""
    return tuple(-ord(c) for c in name)


def render_load(sessions: int, fps: float, batch_mean: float, call_ms: float) -> float:
    """The busy fraction of a replica's render worker: the calls per second its sessions need (frames per second
    over the mean batch) times the mean call time. 1.0 = it renders all the time (later frames repeat)."""
    if sessions <= 0 or fps <= 0 or batch_mean <= 0 or call_ms <= 0:
        return 0.0
    return sessions * fps / batch_mean * call_ms / 1000.0


def replicas_for_sessions(total_sessions: float, sessions_per_replica: float, lowest: int, highest: int) -> int:
    """How many replicas ``total_sessions`` live sessions need at ``sessions_per_replica`` each (the autoscaling
    target: below a replica's capacity, so a burst lands before the next replica is up), within bounds."""
    if sessions_per_replica <= 0:
        raise ConfigError(f"sessions_per_replica must be > 0, got {sessions_per_replica}")
    if not 0 <= lowest <= highest:
        raise ConfigError(f"need 0 <= min replicas <= max replicas, got {lowest}, {highest}")
    wanted = -int(-max(0.0, total_sessions) // sessions_per_replica)  # ceiling
    return min(highest, max(lowest, wanted))
