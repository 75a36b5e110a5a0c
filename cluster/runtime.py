"""Bring a testbed up on Ray and take it down again.

``Testbed.start(config)`` connects to Ray (an embedded local instance by default; ``ray.address``
or ``RAY_ADDRESS`` joins a cluster started with ``ray start``), deploys the Serve server app,
starts the scheduler actor, the emulated fleet actors and (optionally) a real llama.cpp device
agent, each placed by the custom resources its config section names, e.g. ``{"disco_server":
0.01}`` on server nodes and ``{"disco_device": 0.01}`` on device nodes. ``shutdown()`` removes
what it started and, if it started Ray itself, stops Ray.

    with Testbed.start(load_config("cluster.yaml")) as tb:
        tb.server_url           # http://127.0.0.1:PORT (OpenAI-compatible, /v1/completions)
        tb.scheduler            # the SchedulerActor handle
        tb.planner()            # a Planner over it, for in-process device agents
        tb.fleets, tb.agent_url
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field, replace
from typing import Any

from disco.cluster.config import (
    SERVER_API_KEY_ENV,
    AgentConfig,
    FleetConfig,
    SchedulerConfig,
    ServerConfig,
    TestbedConfig,
)

SERVE_READY_TIMEOUT_S = 120.0
NAME_RELEASE_TRIES, NAME_RELEASE_WAIT_S = 20, 0.25  # re-creating a just-killed named actor


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def connect_ray(cfg: TestbedConfig) -> bool:
    """Initialise Ray unless the caller already did; True if this call started or joined it.

    ``ray.address`` (or ``RAY_ADDRESS``) joins that cluster; without one, a new local Ray is
    started with ``ray.num_cpus`` and ``ray.include_dashboard``."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=False)
    else:
        # "local": always a fresh embedded instance; a bare ray.init() would join a cluster
        # that someone else started on this machine (and ignore num_cpus / the dashboard flag).
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=cfg.ray.include_dashboard,
            namespace=cfg.ray.namespace,
            log_to_driver=False,
        )
    return True


def start_serve(cfg: ServerConfig) -> int:
    """Start Serve's HTTP proxy on ``cfg.http`` (a free port for port 0); returns the port.
    Off loopback it needs a key (``server.http.api_key`` or DISCO_SERVER_API_KEY here)."""
    from ray import serve

    cfg.http.check_exposure(SERVER_API_KEY_ENV)
    port = cfg.http.port or free_port(cfg.http.host)
    serve.start(
        proxy_location=cfg.proxy_location,
        http_options={"host": cfg.http.host, "port": port},
    )
    # Serve already running on this cluster keeps its own HTTP options: report the real port.
    try:
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    except (ImportError, AttributeError):  # private API moved: trust what we asked for
        return port


def deploy_server(cfg: ServerConfig) -> Any:
    """Deploy (or update) the server application, wait until it is ready; returns its handle."""
    from ray import serve

    from disco.cluster.serve_app import build_app

    return serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)


def server_url(cfg: ServerConfig, port: int) -> str:
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{cfg.http.host}:{port}{prefix}"


def check_capacity(cfg: TestbedConfig) -> None:
    """Refuse a config the cluster cannot place, instead of waiting forever for replicas.

    CPU is summed over what starts at once (replicas or min_replicas, fleet actors, the agent,
    the scheduler); a custom resource must be offered by some node at all.
    """
    import math

    import ray

    from disco.cluster.config import ConfigError

    have = ray.cluster_resources()
    s, f, a = cfg.server, cfg.fleet, cfg.agent
    replicas = s.autoscaling.min_replicas if s.autoscaling is not None else s.num_replicas
    n_fleets = math.ceil(f.devices / f.devices_per_actor) if f.devices else 0
    need = replicas * s.num_cpus + n_fleets * f.num_cpus + cfg.scheduler.num_cpus
    need += a.num_cpus if a.enabled else 0.0
    if need > have.get("CPU", 0.0) + 1e-9:
        raise ConfigError(
            f"the testbed needs {need:g} CPUs at start (server {replicas} x {s.num_cpus:g}, "
            f"{n_fleets} fleet actors x {f.num_cpus:g}, agent {a.num_cpus if a.enabled else 0:g}, "
            f"scheduler {cfg.scheduler.num_cpus:g}) but the Ray cluster has "
            f"{have.get('CPU', 0.0):g}: lower num_cpus in the config or raise ray.num_cpus"
        )
    for section, res in (("server", s.resources), ("fleet", f.resources),
                         ("scheduler", cfg.scheduler.resources),
                         ("agent", a.resources if a.enabled else {})):  # fmt: skip
        for name in res:
            if name not in have:
                raise ConfigError(
                    f"{section}.resources asks for {name!r} but no Ray node offers it "
                    f"(start nodes with --resources '{{\"{name}\": N}}')"
                )


@dataclass
class Testbed:
    __test__ = False  # not a pytest test class

    config: TestbedConfig
    server_url: str
    server_handle: Any  # ray.serve.handle.DeploymentHandle
    scheduler: Any  # ActorHandle of SchedulerActor
    fleets: list[Any] = field(default_factory=list)  # FleetActor handles
    agent: Any = None  # DeviceAgentActor handle
    agent_url: str | None = None
    owns_ray: bool = False
    # With fleet_http (see restart_device_side): one agent HTTP API per emulated device.
    fleet_http: bool = False
    fleet_urls: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, config: TestbedConfig | None = None) -> Testbed:
        from disco.cluster.scheduler_actor import start_scheduler

        cfg = config or TestbedConfig()
        owns = connect_ray(cfg)
        tb: Testbed | None = None
        try:
            check_capacity(cfg)
            port = start_serve(cfg.server)
            scheduler = start_scheduler(cfg.scheduler)
            handle = deploy_server(cfg.server)
            tb = cls(cfg, server_url(cfg.server, port), handle, scheduler, owns_ray=owns)
            tb._start_devices()
            return tb
        except BaseException:
            if tb is not None:
                tb.shutdown()
            else:
                _stop(owns)
            raise

    def _start_devices(self, fleet_http: bool = False) -> None:
        import ray

        from disco.cluster import device_actors

        cfg = self.config
        actor_class = device_actors.FleetHttpActor if fleet_http else device_actors.FleetActor
        self.fleet_http = fleet_http
        self.fleets = device_actors.start_fleets(
            cfg, self.server_url, self.scheduler, self.server_handle, actor_class=actor_class
        )
        if cfg.agent.enabled:
            self.agent, self.agent_url = device_actors.start_agent(
                cfg, self.server_url, self.scheduler, self.server_handle
            )
        if fleet_http:
            per_actor = ray.get([f.serve_http.remote() for f in self.fleets])
            self.fleet_urls = [u for urls in per_actor for u in urls]

    @property
    def device_urls(self) -> list[str]:
        """Every device's HTTP API: the real agent's, then the emulated ones' (fleet_http)."""
        return ([self.agent_url] if self.agent_url else []) + list(self.fleet_urls)

    def stop_device_side(self, timeout_s: float = 15.0) -> None:
        """Stop the fleets, the agent and the scheduler actor (each given ``timeout_s`` to close
        its HTTP server and drain), then kill them; Ray, Serve and the server app stay up.
        Idempotent."""
        import ray

        stops = [(f, "stop_http" if self.fleet_http else "close") for f in self.fleets]
        if self.agent is not None:
            stops.append((self.agent, "stop"))
        for handle, method in stops:
            with contextlib.suppress(Exception):
                ray.get(getattr(handle, method).remote(), timeout=timeout_s)
        for h in [*self.fleets, self.agent, self.scheduler]:
            if h is not None:
                with contextlib.suppress(Exception):
                    ray.kill(h, no_restart=True)
        self.fleets, self.fleet_urls = [], []
        self.agent, self.agent_url, self.scheduler = None, None, None

    def restart_device_side(
        self,
        scheduler: SchedulerConfig | None = None,
        *,
        fleet: FleetConfig | None = None,
        agent: AgentConfig | None = None,
        fleet_http: bool = False,
    ) -> None:
        """A fresh scheduler actor, device agent and fleet (budgets, online estimates and
        counters from zero) with the given config sections (None: keep the current one); Ray,
        Serve and the server replicas stay up. ``fleet_http`` starts ``FleetHttpActor`` fleets
        and fills ``fleet_urls`` (see ``device_urls``)."""
        import time

        import ray

        from disco.cluster.scheduler_actor import start_scheduler

        self.stop_device_side()
        self.config = replace(
            self.config,
            scheduler=self.config.scheduler if scheduler is None else scheduler,
            fleet=self.config.fleet if fleet is None else fleet,
            agent=self.config.agent if agent is None else agent,
        )
        for i in range(NAME_RELEASE_TRIES):
            try:  # a killed named actor releases its name asynchronously: retry briefly
                self.scheduler = start_scheduler(self.config.scheduler)
                break
            except ValueError:
                if i == NAME_RELEASE_TRIES - 1:
                    raise
                time.sleep(NAME_RELEASE_WAIT_S)
        ray.get(self.scheduler.ping.remote())
        self._start_devices(fleet_http)

    def planner(self, **kwargs: Any) -> Any:
        """A Planner over the scheduler actor (``disco.scheduler.planner.Planner``), its
        fallback starting from the scheduler's config."""
        from disco.cluster.config import to_dict
        from disco.cluster.planner_client import ActorPlanner

        kwargs.setdefault("config", to_dict(self.config.scheduler))
        return ActorPlanner(self.scheduler, **kwargs)

    def stats(self) -> dict[str, Any]:
        """The scheduler's counters and budget ledger, and each fleet actor's metrics."""
        import ray

        out: dict[str, Any] = {"scheduler": ray.get(self.scheduler.stats.remote())}
        out["fleets"] = ray.get([f.stats.remote() for f in self.fleets])
        if self.agent is not None:
            out["agent"] = ray.get(self.agent.metrics.remote())
        return out

    def shutdown(self) -> None:
        import ray
        from ray import serve

        for h in [*self.fleets, self.agent, self.scheduler]:
            if h is not None:
                with contextlib.suppress(Exception):
                    ray.kill(h, no_restart=True)
        self.fleets, self.fleet_urls, self.agent = [], [], None
        with contextlib.suppress(Exception):
            serve.delete(self.config.server.app_name)
        if self.owns_ray:
            with contextlib.suppress(Exception):
                serve.shutdown()
        _stop(self.owns_ray)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _stop(owns_ray: bool) -> None:
    import ray

    if owns_ray and ray.is_initialized():
        ray.shutdown()
