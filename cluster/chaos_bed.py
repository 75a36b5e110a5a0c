"""The testbed of the chaos and soak benchmarks (issue 15), with its fault handles.

Local and loopback only: an embedded Ray of its own (its own namespace), Serve's proxy on a free
port, ``replicas`` emulated server replicas behind Serve (fast: a profile replay, each engine
wrapped in :class:`~disco.cluster.faults.FaultyEndpoint`), the scheduler actor (checkpointed to
Ray's GCS, restarted by Ray when killed), ``fleets`` emulated fleet actors that serve one OpenAI
API per device (:class:`ChaosFleetActor`: each device can be partitioned from the server) and one
real llama.cpp device agent (:class:`ChaosAgentActor`: its engine takes injected failures). Every
device reaches the server through a Serve handle; the fleet's devices through their own last-hop
network too (``device_agents/network.py``, where partitions happen).

Both benchmarks drive it with an open-loop load (``chaos_load.py``); the chaos benchmark kills and
restarts its parts (:meth:`ChaosBed.kill_fleet`, :meth:`ChaosBed.kill_replica`, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from disco.cluster.config import (
    AgentConfig,
    FleetConfig,
    HttpConfig,
    NetworkConfig,
    RayConfig,
    SchedulerConfig,
    ServerConfig,
    TestbedConfig,
    to_dict,
)
from disco.cluster.device_actors import DeviceAgentActor, FleetHttpActor, actor_prefix
from disco.scheduler.types import EndpointKind

FAULTY = "disco.cluster.faults:faulty_engine"
REPLICA_PREFIX = "SERVE_REPLICA::"
# The emulated replicas' profile: a fast, self-hosted-looking server (TTFT 40-400 ms, ~33
# tokens/s per stream), so a stream lasts long enough for a fault to land inside it.
SERVER_PROFILE = {
    "kind": "server", "name": "chaos-server",
    "prices": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
    "tbt_s": 0.03, "tbt_cv": 0.2, "ttft_per_prompt_token_s": 0.0002,
    "ttft_samples": [0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.25, 0.4],
    "source": "disco bench chaos: an assumption, not a measurement",
}  # fmt: skip


# On a loaded machine Serve's HTTP proxy can take longer than the 5 s Serve gives it to become
# ready; Serve then kills it and serve.start() fails. The Ray this bed starts gives it 60 s (and
# a testbed that still fails to come up is started again, twice at most).
SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


@dataclass(frozen=True)
class BedOptions:
    seed: int = 0
    replicas: int = 2
    fleets: int = 2
    devices_per_fleet: int = 4
    agent: bool = True  # the real llama.cpp agent
    agent_model: str = "smollm2-135m"
    policy: str = "disco"
    regime: str = "server"
    budget: float = 0.5
    recompute_every: int = 20  # the policy's first fit comes after this many requests
    # The coordinators' silence limits (agent and fleet alike): a hung stream is failed over
    # after stall_timeout_ms; a stream's first token may take first_token_timeout_ms.
    first_token_timeout_ms: float = 5000.0
    stall_timeout_ms: float = 1500.0
    rtt_ms: float = 20.0
    jitter_ms: float = 5.0
    num_cpus: int = 8  # Ray's logical CPUs (placement only)


def _data(name: str) -> Path:
    import disco.scheduler.data as data

    return Path(data.__file__).with_name(name)


def bed_config(opts: BedOptions, workdir: Path) -> TestbedConfig:
    """The whole testbed's config; ``workdir`` receives the server profile file."""
    workdir.mkdir(parents=True, exist_ok=True)
    profile = workdir / "server-profile.json"
    profile.write_text(json.dumps(SERVER_PROFILE, indent=2) + "\n")
    token = uuid.uuid4().hex[:6]
    return TestbedConfig(
        ray=RayConfig(num_cpus=opts.num_cpus, namespace=f"disco-chaos-{os.getpid()}-{token}"),
        server=ServerConfig(
            engine=FAULTY,
            engine_kwargs={"engine": "emulated", "profile": str(profile), "seed": opts.seed},
            num_replicas=opts.replicas, num_cpus=0.1, max_ongoing_requests=256,
            http=HttpConfig(port=0),
        ),
        scheduler=SchedulerConfig(
            policy=opts.policy, regime=opts.regime, budget=opts.budget, migration=True,
            server_profile=str(profile), device_profile="xiaomi14-qwen0.5b",
            actor_name=f"disco-chaos-{token}", checkpoint="gcs", checkpoint_interval_s=0.05,
            seed=opts.seed, recompute_every=opts.recompute_every,
        ),
        fleet=FleetConfig(
            devices=opts.fleets * opts.devices_per_fleet, devices_per_actor=opts.devices_per_fleet,
            network=NetworkConfig(opts.rtt_ms, opts.jitter_ms, "lognormal"), seed=opts.seed,
            server="handle", num_cpus=0.1,
        ),
        agent=AgentConfig(
            enabled=opts.agent, device_id="agent-0", engine=FAULTY,
            engine_kwargs={"engine": "llamacpp", "model": opts.agent_model, "n_threads": 1,
                           "n_ctx": 1024},
            device_profile=str(_data("profile-llamacpp-smollm2-135m.json")),
            first_token_timeout_ms=opts.first_token_timeout_ms,
            stall_timeout_ms=opts.stall_timeout_ms, num_cpus=0.5, server="handle",
        ),
    )  # fmt: skip


class ChaosFleetActor(FleetHttpActor):
    """A fleet with an HTTP API per device whose devices can be partitioned from the server, and
    whose coordinators use the given silence limits (FleetConfig has none: a fleet's devices
    otherwise wait 60 s for a first token and 10 s for a next one)."""

    def __init__(
        self,
        *args: Any,
        first_token_timeout_s: float | None = None,
        stall_timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        for agent in self.fleet.agents.values():
            coord = agent.coordinator
            coord.config = replace(coord.config, first_token_timeout_s=first_token_timeout_s,
                                   stall_timeout_s=stall_timeout_s)  # fmt: skip

    async def partition(self, device_id: str, seconds: float, mode: str = "hang") -> None:
        """Cut ``device_id`` off the server for ``seconds`` (``NetworkEndpoint.partition``)."""
        net = self.fleet.agent(device_id).coordinator.endpoints[EndpointKind.SERVER]
        net.partition(seconds, mode)


class ChaosAgentActor(DeviceAgentActor):
    """The real device agent, whose device engine (a FaultyEndpoint around llama.cpp) takes
    injected faults."""

    async def fault(self, kind: str, down_s: float = 0.0) -> int:
        device = self.agent.coordinator.endpoints[EndpointKind.DEVICE]
        return device.inject(kind, down_s=down_s)


@dataclass
class FleetSlot:
    index: int
    handle: Any = None
    urls: dict[str, str] = field(default_factory=dict)  # device id -> its API's base URL
    up: bool = False
    kills: int = 0


class ChaosBed:
    """Start with :meth:`start`, always end with :meth:`shutdown` (idempotent)."""

    def __init__(self, opts: BedOptions, workdir: Path) -> None:
        self.opts = opts
        self.config = bed_config(opts, Path(workdir))
        self.tb: Any = None
        self.fleets: dict[int, FleetSlot] = {}
        self.agent: Any = None
        self.agent_url: str | None = None

    # ---- up and down ------------------------------------------------------------------------

    def start(self, attempts: int = 3) -> ChaosBed:
        from disco.cluster.runtime import Testbed

        cfg = self.config
        bare = replace(cfg, fleet=replace(cfg.fleet, devices=0),
                       agent=replace(cfg.agent, enabled=False))  # fmt: skip
        for name, value in SERVE_ENV.items():  # read by the Ray this bed starts
            os.environ.setdefault(name, value)
        try:
            for attempt in range(attempts):
                try:  # Testbed.start tears down what it started when it fails
                    self.tb = Testbed.start(bare)
                    break
                except Exception:
                    if attempt == attempts - 1:
                        raise
                    time.sleep(2.0)
            self.tb.config = cfg  # what shutdown and the devices read
            for i in range(self.opts.fleets):
                self.start_fleet(i)
            if self.opts.agent:
                self._start_agent()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _start_agent(self) -> None:
        from disco.cluster.device_actors import start_agent

        tb = self.tb
        self.agent, self.agent_url = start_agent(
            self.config, tb.server_url, tb.scheduler, tb.server_handle, actor_class=ChaosAgentActor
        )
        tb.agent, tb.agent_url = self.agent, self.agent_url

    def start_fleet(self, index: int, timeout_s: float = 120.0) -> FleetSlot:
        """(Re)start fleet actor ``index`` under a new name; its devices' URLs are new."""
        import ray

        cfg, tb = self.config, self.tb
        f = cfg.fleet
        name = f"{actor_prefix(cfg.scheduler.actor_name)}fleet{index}.{uuid.uuid4().hex[:6]}"
        limits = {k: None if v is None else v / 1000.0 for k, v in (
            ("first_token_timeout_s", cfg.agent.first_token_timeout_ms),
            ("stall_timeout_s", cfg.agent.stall_timeout_ms))}  # fmt: skip
        handle = ray.remote(ChaosFleetActor).options(name=name, num_cpus=f.num_cpus).remote(
            to_dict(f), index, f.devices_per_actor, to_dict(cfg.scheduler), tb.server_url,
            cfg.server.model_name, tb.scheduler, tb.server_handle, **limits,
        )  # fmt: skip
        slot = self.fleets.setdefault(index, FleetSlot(index))
        slot.handle = handle
        self._sync_testbed()
        urls = ray.get(handle.serve_http.remote(), timeout=timeout_s)
        slot.urls = {u.rsplit("/", 1)[-1]: u for u in urls}
        slot.up = True
        return slot

    def kill_fleet(self, index: int) -> list[str]:
        """Kill fleet actor ``index`` (its devices die with their streams); returns its device
        ids. :meth:`start_fleet` brings it back."""
        import ray

        slot = self.fleets[index]
        slot.up = False
        slot.kills += 1
        with contextlib.suppress(Exception):
            ray.kill(slot.handle, no_restart=True)
        return list(slot.urls)

    def _sync_testbed(self) -> None:
        self.tb.fleets = [s.handle for s in self.fleets.values() if s.handle is not None]

    def shutdown(self) -> None:
        if self.tb is not None:
            self._sync_testbed()
            self.tb.shutdown()  # kills every actor it started, Serve, then its own Ray
            self.tb = None
        else:  # Testbed.start failed: it cleaned up after itself
            pass

    def __enter__(self) -> ChaosBed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- what is up -------------------------------------------------------------------------

    def targets(self) -> dict[str, str | None]:
        """Every device: the agent's API, then the fleets' (device id -> base URL; None while
        its fleet actor is dead)."""
        out: dict[str, str | None] = {}
        if self.agent_url:
            out[self.config.agent.device_id] = self.agent_url
        for slot in self.fleets.values():
            out.update({d: u if slot.up else None for d, u in slot.urls.items()})
        return out

    def fleet_of(self, device_id: str) -> int | None:
        for slot in self.fleets.values():
            if device_id in slot.urls:
                return slot.index
        return None

    @property
    def scheduler(self) -> Any:
        return self.tb.scheduler

    @property
    def server_handle(self) -> Any:
        return self.tb.server_handle

    def replica_names(self) -> list[tuple[str, str]]:
        """(name, namespace) of every server replica actor alive now."""
        import ray

        return sorted(
            (a["name"], a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(REPLICA_PREFIX) and "DiscoServer" in a["name"]
        )

    def running_replicas(self) -> int:
        """Replicas Serve reports RUNNING (a killed one is replaced within seconds)."""
        from ray import serve

        try:
            app = serve.status().applications[self.config.server.app_name]
            dep = next(iter(app.deployments.values()))
            return int(dep.replica_states.get("RUNNING", 0))
        except Exception:  # noqa: BLE001 - Serve's status moved: count the named actors
            return len(self.replica_names())

    def replica_load(self, calls: int = 12) -> dict[str, int]:
        """Replica actor name -> engine streams open now, for the replicas the router reached
        with ``calls`` probes (each call goes to one replica)."""
        out: dict[str, int] = {}
        for r in [self.server_handle.probe.remote() for _ in range(calls)]:
            with contextlib.suppress(Exception):
                p = r.result(timeout_s=10)
                if p.get("actor"):
                    out[p["actor"]] = int(p["ongoing"])
        return out

    def kill_replica(self, pick: Any) -> tuple[str, int | None] | None:
        """Kill one server replica, the one with the most streams open (``pick(names)`` breaks
        ties, or chooses when the replicas cannot be probed); Serve replaces it. Returns its
        name's last part and its open streams."""
        import ray

        names = self.replica_names()
        if not names:
            return None
        load = self.replica_load()
        busiest = max(load.values(), default=None)
        top = [n for n in names if busiest is not None and load.get(n[0]) == busiest]
        name, ns = pick(top or names)
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
        return name.rsplit("#", 1)[-1], load.get(name)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until every replica runs and the scheduler answers (after start, before load)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while self.running_replicas() < self.opts.replicas:
            if time.monotonic() > deadline:
                raise RuntimeError("the server replicas did not start")
            time.sleep(0.2)
        ray.get(self.scheduler.ping.remote(), timeout=timeout_s)


__all__ = ["BedOptions", "ChaosAgentActor", "ChaosBed", "ChaosFleetActor", "bed_config"]
