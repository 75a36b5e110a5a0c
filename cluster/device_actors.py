"""The device side on Ray: emulated fleet actors and a real device agent actor.

Both are thin: the work is done by ``disco.device_agents`` (coordinator, agent, fleet, HTTP API);
this module only hands them what they need from the cluster — the server's URL (through the
``openai`` engine with our ``prefix`` resume extension) and the scheduler actor behind the Planner
protocol — and places them by custom resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import replace
from typing import Any

import ray

from disco.cluster.config import AgentConfig, FleetConfig, HttpConfig, TestbedConfig, to_dict
from disco.cluster.planner_client import ActorPlanner
from disco.cluster.resolve import build_engine
from disco.scheduler.endpoint import Endpoint
from disco.scheduler.planner import Planner
from disco.scheduler.profiles import DeviceProfile, ServerProfile, load_profile


def server_endpoint(
    server_url: str, model_name: str, api_key: str | None = None, handle: Any = None
) -> Endpoint:
    """The Serve app as a server endpoint: through ``handle`` when given (inside the cluster),
    else its OpenAI SSE API at ``server_url``; prefix resume either way."""
    if handle is not None:
        from disco.cluster.handle_endpoint import ServeHandleEndpoint

        return ServeHandleEndpoint(handle, model_name)
    kw: dict[str, Any] = {"model": model_name, "disco_extensions": True}
    if api_key:
        kw["api_key"] = api_key
    return build_engine("openai", {"base_url": server_url, **kw})


def require_handle(section: str, server_handle: Any) -> None:
    """A device side configured to reach the server through a Serve handle must be given one:
    without it, it would silently reach some other server (HTTP or its own emulated one)."""
    if server_handle is None:
        raise ValueError(
            f"{section}.server is 'handle' but no Serve DeploymentHandle was passed: pass the "
            f"server app's handle (Testbed.server_handle), or set {section}.server to 'http'"
        )


def profiles(server: str, device: str) -> tuple[ServerProfile, DeviceProfile]:
    sp, dp = load_profile(server, "server"), load_profile(device, "device")
    assert isinstance(sp, ServerProfile) and isinstance(dp, DeviceProfile)
    return sp, dp


def build_agent(
    *,
    server: Endpoint,
    device: Endpoint,
    planner: Planner,
    server_profile: ServerProfile,
    device_profile: DeviceProfile,
    config: AgentConfig,
) -> Any:
    """A DeviceAgent (coordinator + planner) over the two endpoints; the planner's
    ``fallback`` (an ActorPlanner's local copy of the scheduler's policy) covers for it."""
    from disco.device_agents.agent import DeviceAgent
    from disco.device_agents.coordinator import Coordinator

    coord = Coordinator(server, device, server_profile, device_profile, config.coordinator())
    return DeviceAgent(coord, planner, config)


def build_device_engine(cfg: AgentConfig) -> Endpoint:
    """The agent's device engine (``cfg.engine`` with ``cfg.engine_kwargs``; a llama.cpp engine
    loads ``cfg.model``, None: the small device model)."""
    kwargs = dict(cfg.engine_kwargs)
    if cfg.engine == "llamacpp":
        kwargs.setdefault("model", cfg.model)
    return build_engine(cfg.engine, kwargs)


# ---- emulated fleet ------------------------------------------------------------------------------


class FleetActor:
    """Hosts ``devices`` emulated devices (``disco.device_agents.fleet.EmulatedFleet``).

    Every public method of the fleet is forwarded; ``stream`` is a streaming actor method
    (call it with ``.options(num_returns="streaming")``).
    """

    def __init__(
        self,
        fleet: dict[str, Any],
        index: int,
        devices: int,
        scheduler_cfg: dict[str, Any],
        server_url: str | None,
        model_name: str,
        scheduler: Any,
        server_handle: Any = None,
    ) -> None:
        from disco.cluster.config import from_dict
        from disco.device_agents.fleet import EmulatedFleet

        cfg = from_dict(FleetConfig, fleet, "fleet")
        if cfg.server == "handle":
            require_handle("fleet", server_handle)
        # This actor's share of the fleet; device i of actor k draws from seed + 100,000 k + i.
        cfg = replace(cfg, devices=devices, seed=cfg.seed + 100_000 * index)
        server = None  # "emulated": the fleet's own in-process server
        if cfg.server == "handle":
            server = server_endpoint("", model_name, handle=server_handle)
        elif cfg.server == "http":
            server = server_endpoint(server_url or "", model_name)
        self.planner = None
        if scheduler is not None:
            self.planner = holder_planner(
                scheduler, scheduler_cfg, f"fleet{index}", devices, cfg.scheduler_rtt_ms
            )
        self.fleet = EmulatedFleet(
            cfg,
            planner=self.planner,
            server=server,
            server_profile=scheduler_cfg["server_profile"],
            id_prefix=f"fleet{index}",
        )

    def device_ids(self) -> list[str]:
        return self.fleet.device_ids()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def generate(self, device_id: str, prompt: str, max_tokens: int, **kw: Any) -> dict:
        return await self.fleet.generate(device_id, prompt, max_tokens, **kw)

    async def generate_many(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Many requests at once (one Ray call), each a dict of ``generate`` arguments."""
        return list(await asyncio.gather(*(self.fleet.generate(**c) for c in calls)))

    async def stream(self, device_id: str, prompt: str, max_tokens: int, **kw: Any):
        async for ev in self.fleet.stream(device_id, prompt, max_tokens, **kw):
            yield ev

    def stats(self) -> dict[str, Any]:
        out = self.fleet.stats()
        status = getattr(self.planner, "status", None)
        if status is not None:
            out = out | {"planner": status()}
        return out

    async def probe(self) -> dict[str, Any]:
        """This actor's process and event loop now (``disco bench soak``)."""
        return {"pid": os.getpid(), "tasks": len(asyncio.all_tasks()),
                "devices": len(self.fleet.agents)}  # fmt: skip

    def metrics_text(self) -> str:
        return self.fleet.metrics_text()

    async def close(self) -> None:
        await self.fleet.close()
        close = getattr(self.planner, "close", None)
        if close is not None:  # a snapshot holder sends what it has left
            await close()


class FleetHttpActor(FleetActor):
    """A FleetActor plus one OpenAI-compatible HTTP API per emulated device, mounted at
    ``/devices/<id>`` (the same app a real agent serves), so a load generator can reach every
    device over HTTP like a real one. Call ``serve_http`` once after construction; ``stop_http``
    stops the HTTP front and closes the fleet."""

    _http: Any = None
    _http_task: asyncio.Task | None = None

    async def serve_http(self, host: str = "127.0.0.1", port: int = 0) -> list[str]:
        """Start the HTTP front on the actor's event loop; returns one base URL per device.
        Any host but loopback needs DISCO_API_KEY in the actor's environment (every device's
        API then checks it)."""
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Mount

        from disco.device_agents.agent_http import create_app

        HttpConfig(host=host, port=port).check_exposure()

        ids = self.fleet.device_ids()
        routes = [Mount(f"/devices/{d}", app=create_app(self.fleet.agent(d))) for d in ids]
        cfg = uvicorn.Config(Starlette(routes=routes), host=host, port=port,
                             log_level="warning", lifespan="off")  # fmt: skip
        self._http = uvicorn.Server(cfg)
        self._http_task = asyncio.create_task(self._http.serve())
        for _ in range(1000):  # bounded: ~10 s
            if self._http.started:
                h, p = self._http.servers[0].sockets[0].getsockname()[:2]
                return [f"http://{h}:{p}/devices/{d}" for d in ids]
            if self._http_task.done():
                self._http_task.result()
                break
            await asyncio.sleep(0.01)
        raise RuntimeError("the fleet's HTTP front did not start")

    async def stop_http(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, 10)
        await self.close()


def holder_planner(
    scheduler: Any, scheduler_cfg: dict[str, Any], name: str, devices: int, rtt_ms: float = 0.0
) -> Planner:
    """The planner a fleet actor or agent gets (``scheduler.planning``): per request over the
    actor (``central``) or on the device from snapshots under a lease (``snapshot``), with the
    devices' emulated round trip to the scheduler (``rtt_ms``)."""
    from disco.cluster.snapshot_client import RttPlanner, snapshot_planner

    rtt_s = rtt_ms / 1000.0
    if scheduler_cfg.get("planning", "central") == "snapshot":
        with contextlib.suppress(Exception):  # outside an actor: the given name
            name = ray.get_runtime_context().get_actor_name() or name
        return snapshot_planner(scheduler, name, scheduler_cfg, devices=devices, rtt_s=rtt_s)
    planner = ActorPlanner(scheduler, config=scheduler_cfg)
    return RttPlanner(planner, rtt_s) if rtt_s > 0 else planner


def _placement(num_cpus: float, resources: dict[str, float]) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if resources:
        opts["resources"] = dict(resources)
    return opts


# ---- names: how `disco status` and `disco down` find what a testbed started ---------------------


def actor_prefix(scheduler_name: str) -> str:
    """The fleet and agent actors a testbed starts are named ``<scheduler>.fleet<i>.<run>`` and
    ``<scheduler>.agent.<device id>.<run>`` in the testbed's namespace (``<run>`` is new at
    each start, so a restart never waits for a killed actor to release its name)."""
    return f"{scheduler_name}."


def _run_token() -> str:
    import uuid

    return uuid.uuid4().hex[:6]


def _register(scheduler: Any, entry: dict[str, Any]) -> None:
    """Tell the scheduler actor (fire and forget: a scheduler without ``register`` or one that
    is down costs nothing here; ``disco status`` also finds the actors by name)."""
    if scheduler is None:
        return
    with contextlib.suppress(Exception):
        scheduler.register.remote(entry)


def start_fleets(
    cfg: TestbedConfig,
    server_url: str,
    scheduler: Any,
    server_handle: Any = None,
    *,
    actor_class: type[FleetActor] = FleetActor,
) -> list[Any]:
    """One fleet actor (``actor_class``, e.g. ``FleetHttpActor``) per ``devices_per_actor``
    devices; returns their handles once ready."""
    f = cfg.fleet
    if f.devices == 0:
        return []
    if f.server == "handle":
        require_handle("fleet", server_handle)
    cls = ray.remote(actor_class)
    run = _run_token()
    handles, names, left, i = [], [], f.devices, 0
    while left > 0:
        n = min(left, f.devices_per_actor)
        names.append(f"{actor_prefix(cfg.scheduler.actor_name)}fleet{i}.{run}")
        opts = _placement(f.num_cpus, f.resources) | {"name": names[-1]}
        handles.append(
            cls.options(**opts).remote(
                to_dict(f), i, n, to_dict(cfg.scheduler), server_url, cfg.server.model_name,
                scheduler, server_handle,
            )
        )  # fmt: skip
        left -= n
        i += 1
    ids = ray.get([h.device_ids.remote() for h in handles])  # surface construction errors now
    for i, (name, devices) in enumerate(zip(names, ids, strict=True)):
        _register(scheduler, {"id": f"fleet{i}", "kind": "fleet", "devices": len(devices),
                              "actor": name, "server": f.server})  # fmt: skip
    return handles


# ---- a real device agent -------------------------------------------------------------------------


class DeviceAgentActor:
    """A llama.cpp (or any engine) device agent serving its OpenAI API from inside a Ray actor."""

    def __init__(
        self,
        agent: dict[str, Any],
        server_url: str,
        model_name: str,
        scheduler_cfg: dict[str, Any],
        scheduler: Any,
        server_handle: Any = None,
    ) -> None:
        from disco.cluster.config import from_dict

        self.cfg = from_dict(AgentConfig, agent, "agent")
        self.cfg.http.check_exposure()  # before the model loads
        if self.cfg.server == "handle":
            require_handle("agent", server_handle)
        handle = server_handle if self.cfg.server == "handle" else None
        device = build_device_engine(self.cfg)
        sp, dp = profiles(
            scheduler_cfg["server_profile"],
            self.cfg.device_profile or scheduler_cfg["device_profile"],
        )
        self.planner = holder_planner(scheduler, scheduler_cfg, f"agent.{self.cfg.device_id}", 1)
        self.agent = build_agent(
            server=server_endpoint(server_url, model_name, handle=handle),
            device=device,
            planner=self.planner,
            server_profile=sp,
            device_profile=dp,
            config=self.cfg,
        )
        self._server: Any = None
        self._task: asyncio.Task | None = None

    async def start(self) -> str:
        """Serve the agent's HTTP API on the actor's event loop; returns its base URL."""
        import uvicorn

        from disco.device_agents.agent_http import create_app

        http = self.cfg.http
        app = create_app(self.agent, http)
        config = uvicorn.Config(
            app, host=http.host, port=http.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        for _ in range(1000):  # bounded: ~10 s
            if self._server.started:
                host, port = self._server.servers[0].sockets[0].getsockname()[:2]
                return f"http://{host}:{port}"
            if self._task.done():
                self._task.result()  # raises the start error
                break
            await asyncio.sleep(0.01)
        raise RuntimeError("the device agent's HTTP server did not start")

    async def generate(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        """One request without HTTP (tests): the full outcome with the token events."""
        from disco.device_agents.results import outcome_to_dict
        from disco.scheduler.endpoint import GenerationRequest

        ex = await self.agent.start(GenerationRequest(prompt, max_tokens))
        events = []
        try:
            async for ev in ex:
                events.append(ev)
        except Exception:  # noqa: BLE001 - the outcome carries the error
            pass
        finally:
            await ex.aclose()
        d = outcome_to_dict(ex.outcome, failovers=ex.failovers)
        d["events"] = [
            {"index": e.index, "text": e.text, "source": e.source.value if e.source else None}
            for e in events
        ]
        return d

    def metrics(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self.agent.metrics)

    async def probe(self) -> dict[str, Any]:
        """This actor's process and event loop now (``disco bench soak``)."""
        return {"pid": os.getpid(), "tasks": len(asyncio.all_tasks())}

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        await self.agent.drain()
        close = getattr(self.planner, "close", None)
        if close is not None:  # a snapshot holder sends what it has left
            await close()


def start_agent(
    cfg: TestbedConfig,
    server_url: str,
    scheduler: Any,
    server_handle: Any = None,
    *,
    actor_class: type[DeviceAgentActor] = DeviceAgentActor,
) -> tuple[Any, str]:
    a = cfg.agent
    if a.server == "handle":
        require_handle("agent", server_handle)
    name = f"{actor_prefix(cfg.scheduler.actor_name)}agent.{a.device_id}.{_run_token()}"
    cls = ray.remote(actor_class).options(
        **_placement(a.num_cpus, a.resources), max_concurrency=1000, name=name
    )
    handle = cls.remote(
        to_dict(a), server_url, cfg.server.model_name, to_dict(cfg.scheduler), scheduler,
        server_handle,
    )  # fmt: skip
    url = ray.get(handle.start.remote())
    _register(scheduler, {"id": a.device_id, "kind": "agent-actor", "devices": 1, "actor": name,
                          "url": url, "engine": a.engine})  # fmt: skip
    return handle, url


__all__ = [
    "DeviceAgentActor",
    "FleetActor",
    "FleetHttpActor",
    "actor_prefix",
    "build_agent",
    "build_device_engine",
    "profiles",
    "require_handle",
    "server_endpoint",
    "start_agent",
    "start_fleets",
]
