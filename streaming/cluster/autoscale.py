"""Scaling on live sessions, not on request count: a Ray Serve custom autoscaling policy (a class Serve builds
with ``policy_kwargs`` and calls with its ``AutoscalingContext``). Each replica reports ``live_sessions`` from
``record_autoscaling_stats``; Serve averages it over its look-back window per replica (``aggregated_metrics``).
No Ray import here: the context is read by attribute, so the policy is tested with a stand-in."""

from __future__ import annotations

from typing import Any

from streaming.cluster.placement import replicas_for_sessions

LIVE_SESSIONS = "live_sessions"  # the custom metric every replica reports


class LiveSessionsPolicy:
    """Desired replicas = ceil(live sessions / ``sessions_per_replica``) within Serve's capacity-adjusted bounds.
    Set ``sessions_per_replica`` below a replica's ``max_sessions`` so new replicas start before all are full."""

    def __init__(self, sessions_per_replica: float = 1.0) -> None:
        if not sessions_per_replica > 0:
            raise ValueError(f"sessions_per_replica must be > 0, got {sessions_per_replica}")
        self.sessions_per_replica = float(sessions_per_replica)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = (ctx.aggregated_metrics or {}).get(LIVE_SESSIONS, {})
        total = float(sum(metrics.values()))
        wanted = replicas_for_sessions(
            total, self.sessions_per_replica, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        )
        state = dict(ctx.policy_state or {})
        state["live_sessions"] = total
        return wanted, state
