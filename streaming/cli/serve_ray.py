"""``engine serve --ray``: the same HTTP API from a front door over engine replicas on a Ray cluster (see
docs/ray.md). Ray is optional: without it ``--ray`` fails in one line naming the extra to install."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import click

from engine.config import ConfigError
from streaming.cluster.placement import POLICIES
from streaming.cluster.ray_app import ClusterSpec, build_app, ray_missing, run, shutdown
from streaming.pipelines import RuntimeConfig
from streaming.transports.webrtc import ServerConfig

RAY_OPTION_NAMES = (
    "ray_address",
    "replicas",
    "min_replicas",
    "max_replicas",
    "sessions_per_replica",
    "replica_cpus",
    "replica_gpus",
    "placement",
    "max_render_load",
    "drain_timeout",
)


def ray_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--ray", "use_ray", is_flag=True, help="Serve from engine replicas on Ray (docs/ray.md)."),
        click.option(
            "--ray-address", default=None, help="Ray cluster to join (ray://... or auto); default: start a local one."
        ),
        click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True),
        click.option("--min-replicas", type=click.IntRange(min=0), default=None, help="Autoscale from this many..."),
        click.option("--max-replicas", type=click.IntRange(min=1), default=None, help="...to this many replicas."),
        click.option(
            "--sessions-per-replica",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            help="Autoscaling target: live sessions per replica.",
        ),
        click.option("--replica-cpus", type=click.FloatRange(min=0), default=1.0, show_default=True),
        click.option("--replica-gpus", type=click.FloatRange(min=0), default=0.0, show_default=True),
        click.option("--placement", type=click.Choice(POLICIES), default=POLICIES[0], show_default=True),
        click.option(
            "--max-render-load",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Send no new session to a replica whose renderer is this busy (1.0 = always rendering).",
        ),
        click.option(
            "--drain-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=60.0,
            show_default=True,
            help="Seconds a replica being removed waits for its sessions to end.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def serve_on_ray(
    runtime: RuntimeConfig, avatar: str | None, server: ServerConfig, host: str, port: int, options: dict[str, Any]
) -> None:
    """Deploy the application, print the front door's address, run until SIGINT/SIGTERM, then remove it all."""
    missing = ray_missing()
    if missing is not None:
        raise click.ClickException(missing)
    try:
        spec = ClusterSpec(
            replicas=options["replicas"],
            min_replicas=options["min_replicas"],
            max_replicas=options["max_replicas"],
            sessions_per_replica=options["sessions_per_replica"],
            num_cpus=options["replica_cpus"],
            num_gpus=options["replica_gpus"],
            drain_timeout_s=options["drain_timeout"],
            front_host=host,
            front_port=port,
            placement=options["placement"],
            max_render_load=options["max_render_load"],
        )
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc
    import ray  # optional: checked above

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address=options["ray_address"], include_dashboard=False, logging_level=logging.WARNING)
    try:
        run(build_app(runtime, avatar, server, spec))
        count = f"{spec.min_replicas}-{spec.max_replicas}" if spec.autoscaling else str(spec.replicas)
        click.echo(f"serving on http://{host}:{port}/ over {count} engine replica(s) on Ray", err=True)
        stop.wait()
    finally:
        with contextlib.suppress(Exception):
            shutdown()
        ray.shutdown()
