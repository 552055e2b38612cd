"""The Ray Serve application: engine replicas (one per GPU, or per N CPUs in classic mode) and a front door.

``EngineReplica`` is a Serve deployment; each replica is a whole single-process server (its own ``Runtime``,
render worker, ``AvatarServer`` and peers: ``streaming.transports.webrtc.create_app``) listening on its node's
address. It registers that address with a named Ray actor (``ReplicaRegistry``) and reports ``live_sessions`` to
Serve's autoscaler (``record_autoscaling_stats``, policy ``streaming.cluster.autoscale.LiveSessionsPolicy``).
``FrontDoorReplica`` (one, on the head node) runs ``streaming.cluster.frontdoor`` on a fixed port over the
registry's replicas.

Why not Serve's own HTTP proxy and request router: a session is a long-lived WebRTC peer plus later requests for
it (``DELETE``, ``PATCH``, viewers, the ``/ws`` websocket) that must reach the one replica holding it. Serve's
router picks *a* replica per request from periodically reported stats; it has no way to say "this request
belongs to replica X" and its proxy would also carry every websocket message. The front door places by the
replicas' live numbers and forwards to an address it remembers; Serve still owns the replicas' life cycle:
placement on nodes, health checks, restarts, scaling and graceful shutdown (drain).

Ray is an optional dependency (``pip install -e ".[ray]"``): this module imports it only where it is used, so
``engine serve`` loads without it and ``--ray`` can say what to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from engine.config import ConfigError
from streaming.cluster.autoscale import LIVE_SESSIONS, LiveSessionsPolicy
from streaming.cluster.drain import drain, stop_admitting
from streaming.cluster.frontdoor import FrontDoor, FrontDoorConfig, ReplicaRef, create_front_door_app
from streaming.cluster.placement import Placement
from streaming.factory import open_engine_factory
from streaming.pipelines import RuntimeConfig
from streaming.transports.webrtc import ServerConfig, create_app
from streaming.transports.webrtc.app import SERVER_KEY
from streaming.transports.webrtc.config import IceServer

logger = logging.getLogger(__name__)

NAMESPACE = "avatar-engine"
REGISTRY = "avatar-engine-replicas"
APP_NAME = "avatar-engine"
INSTALL_HINT = 'Ray is not installed: pip install -e ".[ray]"'


def ray_missing() -> str | None:
    """None when Ray Serve can be imported, else the one line that says what to install."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        return INSTALL_HINT
    return None


class ReplicaRegistry:
    """Where each replica says where it listens (Serve does not expose its replicas' addresses)."""

    def __init__(self) -> None:
        self.replicas: dict[str, dict[str, Any]] = {}

    def register(self, name: str, url: str, pid: int, node: str) -> None:
        self.replicas[name] = {"name": name, "url": url, "pid": pid, "node": node, "draining": False}

    def drain(self, name: str) -> None:
        if name in self.replicas:
            self.replicas[name]["draining"] = True

    def remove(self, name: str) -> None:
        self.replicas.pop(name, None)

    def list(self) -> list[dict[str, Any]]:
        return list(self.replicas.values())


@functools.cache
def _registry_actor_class() -> Any:
    import ray

    return ray.remote(num_cpus=0)(ReplicaRegistry)


def registry() -> Any:
    """The cluster's registry actor, created on first use (detached: it outlives the replica that made it)."""
    return (
        _registry_actor_class()
        .options(name=REGISTRY, namespace=NAMESPACE, lifetime="detached", get_if_exists=True)
        .remote()
    )


def ray_directory() -> Any:
    """The front door's ``discover``: the registry's replicas."""

    async def discover() -> list[ReplicaRef]:
        entries = await registry().list.remote()
        return [ReplicaRef(e["name"], e["url"], e["draining"], e["pid"], e["node"]) for e in entries]

    return discover


@dataclass(frozen=True)
class ClusterSpec:
    """How many replicas, what each one gets from Ray, and how a replica leaves."""

    replicas: int = 2  # fixed count, unless autoscaling (min_replicas < max_replicas)
    min_replicas: int | None = None
    max_replicas: int | None = None
    sessions_per_replica: float = 1.0  # autoscaling target (below max_sessions: scale before all are full)
    upscale_delay_s: float = 10.0  # Serve waits this long on a scale-up decision (its default: 30 s)
    downscale_delay_s: float = 300.0  # and this long on a scale-down one (sessions come and go in bursts)
    look_back_period_s: float = 10.0  # live_sessions is averaged over this window
    num_cpus: float = 1.0  # per replica (classic mode: the CPUs one replica's renderer uses)
    num_gpus: float = 0.0  # per replica (neural mode: 1)
    drain_timeout_s: float = 60.0  # scale-down: how long a leaving replica waits for its sessions to end
    host: str = "0.0.0.0"  # what replicas listen on; they advertise their node's IP
    front_port: int = 8080
    front_host: str = "0.0.0.0"
    placement: str = "most-headroom"
    max_render_load: float | None = None  # the front door skips replicas whose renderer is this busy (None: off)
    extra_actor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError("autoscaling needs both min_replicas and max_replicas")
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and not (0 <= self.min_replicas <= self.max_replicas and self.max_replicas >= 1)
        ):
            raise ConfigError(f"need 0 <= min_replicas <= max_replicas >= 1, got {self.min_replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0 or not self.drain_timeout_s > 0:
            raise ConfigError("num_cpus and num_gpus must be >= 0 and drain_timeout_s > 0")
        if min(self.upscale_delay_s, self.downscale_delay_s) < 0 or not self.look_back_period_s > 0:
            raise ConfigError("autoscaling delays must be >= 0 and look_back_period_s > 0")
        Placement(self.placement, self.max_render_load)  # a bad name or cap fails here, not in the front door
        if not 0 <= self.front_port < 65536:
            raise ConfigError(f"front_port out of range: {self.front_port}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None


class _LoopThread:
    """An asyncio loop on its own thread: the replica's server runs there, beside Serve's own loop."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5.0)


async def _listen(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    return runner, sockets[0].getsockname()[1] if sockets else port


class EngineReplica:
    """One engine replica: the single server over its own runtime, on its node's address."""

    def __init__(
        self, runtime: RuntimeConfig, avatar: str | None, server: ServerConfig, host: str, drain_timeout_s: float
    ) -> None:
        import ray
        from ray import serve

        self.name = serve.get_replica_context().replica_id.unique_id
        self.drain_timeout_s = drain_timeout_s
        self.loop = _LoopThread(f"engine-{self.name}")
        self.runner, port, self.app = self.loop.run(self._start(runtime, avatar, server, host))
        node_ip = ray.util.get_node_ip_address()
        self.url = f"http://{node_ip}:{port}"
        ray.get(registry().register.remote(self.name, self.url, os.getpid(), node_ip))
        logger.info("replica %s serves on %s (pid %d)", self.name, self.url, os.getpid())

    async def _start(
        self, runtime: RuntimeConfig, avatar: str | None, server: ServerConfig, host: str
    ) -> tuple[web.AppRunner, int, web.Application]:
        factory = await open_engine_factory(runtime, avatar)
        app = create_app(factory, server)
        runner, port = await _listen(app, host, 0)
        return runner, port, app

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "pid": os.getpid()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {LIVE_SESSIONS: float(self.app[SERVER_KEY].active)}

    def check_health(self) -> None:
        if not self.loop.thread.is_alive():
            raise RuntimeError(f"replica {self.name}: its server loop stopped")

    def __del__(self) -> None:
        """Serve removes this replica (scale-down, redeploy, shutdown): drain, then close what is left."""
        import ray

        if not hasattr(self, "app"):
            return
        server = self.app[SERVER_KEY]
        # no new session from now on, whoever asks (the front door also sees the registry's flag)
        self.loop.loop.call_soon_threadsafe(stop_admitting, server)
        try:
            ray.get(registry().drain.remote(self.name), timeout=5)
        except Exception:  # the registry may be gone at cluster shutdown; draining goes on regardless
            logger.debug("replica %s could not mark itself draining", self.name)
        self.loop.run(drain(server, self.drain_timeout_s), timeout=self.drain_timeout_s + 10)
        try:
            self.loop.run(self.runner.cleanup(), timeout=15)
        finally:
            self.loop.stop()
        try:
            ray.get(registry().remove.remote(self.name), timeout=5)
        except Exception:
            logger.debug("replica %s could not deregister", self.name)


class FrontDoorReplica:
    """The front door inside the Serve application (RayService / ``serve run``): one replica on the head node,
    listening on ``spec.front_port``. ``engine`` (the EngineReplica deployment) only ties both into one app."""

    def __init__(self, engine: Any, config: FrontDoorConfig, host: str, port: int) -> None:
        self.loop = _LoopThread("front-door")
        self.door = FrontDoor(ray_directory(), config)
        self.runner, self.port = self.loop.run(_listen(create_front_door_app(self.door), host, port))
        logger.info("front door on %s:%d", host, self.port)

    def info(self) -> dict[str, Any]:
        return {"port": self.port, "replicas": sorted(self.door.replicas)}

    def __del__(self) -> None:
        if hasattr(self, "runner"):
            try:
                self.loop.run(self.runner.cleanup(), timeout=10)
            finally:
                self.loop.stop()


def build_app(
    runtime: RuntimeConfig,
    avatar: str | None,
    server: ServerConfig,
    spec: ClusterSpec,
    front: FrontDoorConfig | None = None,
) -> Any:
    """The Serve application: ``spec.replicas`` engine replicas (or autoscaled on live sessions) + a front door."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    scaling: dict[str, Any]
    if spec.min_replicas is not None and spec.max_replicas is not None:
        policy = AutoscalingPolicy(
            policy_function=LiveSessionsPolicy, policy_kwargs={"sessions_per_replica": spec.sessions_per_replica}
        )
        scaling = {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=spec.min_replicas,
                max_replicas=spec.max_replicas,
                initial_replicas=max(spec.min_replicas, 1),
                upscale_delay_s=spec.upscale_delay_s,
                downscale_delay_s=spec.downscale_delay_s,
                look_back_period_s=spec.look_back_period_s,
                metrics_interval_s=min(spec.look_back_period_s, 2.0),
                policy=policy,
            )
        }
    else:
        scaling = {"num_replicas": spec.replicas}
    engine = serve.deployment(
        name="EngineReplica",
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, **spec.extra_actor_options},
        graceful_shutdown_timeout_s=spec.drain_timeout_s + 20.0,
        health_check_period_s=2.0,
        health_check_timeout_s=10.0,
        **scaling,
    )(EngineReplica).bind(runtime, avatar, server, spec.host, spec.drain_timeout_s)
    front = front or FrontDoorConfig(
        token=server.token,
        placement=spec.placement,
        max_render_load=spec.max_render_load,
        retry_after_s=server.retry_after_s,
    )
    door = serve.deployment(
        name="FrontDoor",
        num_replicas=1,
        # on the head node: the address clients are given; it renders nothing, so it reserves no CPU
        ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
    )(FrontDoorReplica).bind(engine, front, spec.front_host, spec.front_port)
    return door


def run(app: Any, name: str = APP_NAME) -> None:
    """Deploy ``app`` on the connected cluster without Serve's HTTP proxies (the front door is the ingress)."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    serve.run(app, name=name, route_prefix=None)


def shutdown(name: str = APP_NAME) -> None:
    """Remove the application (replicas drain) and the registry."""
    import ray
    from ray import serve

    serve.delete(name)
    with contextlib.suppress(ValueError):  # no registry: nothing registered
        ray.kill(ray.get_actor(REGISTRY, namespace=NAMESPACE))


# ``serve run streaming.cluster.ray_app:app_builder replicas=2 max_sessions=4`` and a RayService's ``args``:
# every key is optional; unknown keys are errors (a typo must not silently fall back to a default)
_ARGS: dict[str, type] = {
    "mode": str,
    "motion": str,
    "weights": str,
    "motion_weights": str,
    "device": str,
    "motion_batching": str,
    "avatar": str,
    "token": str,
    "max_sessions": int,
    "max_viewers": int,
    "replicas": int,
    "min_replicas": int,
    "max_replicas": int,
    "sessions_per_replica": float,
    "upscale_delay_s": float,
    "downscale_delay_s": float,
    "look_back_period_s": float,
    "num_cpus": float,
    "num_gpus": float,
    "drain_timeout_s": float,
    "port": int,
    "placement": str,
    "max_render_load": float,
    "ice_servers": str,  # comma-separated, as --ice-server takes them (stun:host:port, turn:USER:PASS@host:port)
}


def app_builder(args: dict[str, Any]) -> Any:
    """The Serve application from ``serve run`` / RayService arguments (strings or JSON values); the token may
    also come from ``AVATAR_ENGINE_TOKEN``."""
    return build_app(*parse_args(args))


def parse_args(args: dict[str, Any]) -> tuple[RuntimeConfig, str | None, ServerConfig, ClusterSpec]:
    """What :func:`app_builder` builds from its arguments (ConfigError naming a bad or unknown one)."""
    unknown = sorted(set(args) - set(_ARGS))
    if unknown:
        raise ConfigError(f"unknown argument(s) {unknown}; known: {sorted(_ARGS)}")
    try:
        values = {key: _ARGS[key](value) for key, value in args.items()}
    except ValueError as exc:
        raise ConfigError(f"bad argument value: {exc}") from exc
    backend = RuntimeConfig().backend
    try:
        runtime = RuntimeConfig(
            mode=values.get("mode", "auto"),
            motion=values.get("motion", "auto"),
            weights=values.get("weights"),
            motion_weights=values.get("motion_weights"),
            backend=dataclasses.replace(backend, device=values.get("device", backend.device)),
            motion_batching=values.get("motion_batching", "auto"),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    ice = tuple(IceServer.parse(url.strip()) for url in values.get("ice_servers", "").split(",") if url.strip())
    server = ServerConfig(
        token=values.get("token") or os.environ.get("AVATAR_ENGINE_TOKEN") or None,
        max_sessions=values.get("max_sessions", 4),
        max_viewers=values.get("max_viewers", 4),
        ice_servers=ice,
    )
    spec = ClusterSpec(
        replicas=values.get("replicas", 2),
        min_replicas=values.get("min_replicas"),
        max_replicas=values.get("max_replicas"),
        sessions_per_replica=values.get("sessions_per_replica", 1.0),
        upscale_delay_s=values.get("upscale_delay_s", 10.0),
        downscale_delay_s=values.get("downscale_delay_s", 300.0),
        look_back_period_s=values.get("look_back_period_s", 10.0),
        num_cpus=values.get("num_cpus", 1.0),
        num_gpus=values.get("num_gpus", 0.0),
        drain_timeout_s=values.get("drain_timeout_s", 60.0),
        front_port=values.get("port", 8080),
        placement=values.get("placement", "most-headroom"),
        max_render_load=values.get("max_render_load"),
    )
    return runtime, values.get("avatar"), server, spec
