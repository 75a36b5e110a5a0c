"""An emulated fleet: many devices in one process (one Ray actor on the cluster side).

Each device has its own DeviceProfile (an emulated llama.cpp-like engine), its own last-hop network
to the shared server endpoint, its own coordinator and agent. All of them share one event loop,
so a fleet holds thousands of concurrent streams at the cost of their timers.

A plain class with async methods: the cluster side wraps it with ``ray.remote`` (async actor);
``stream`` is an async generator, which Ray serves as a streaming actor method. Everything
returned is plain data (dicts, lists, strings), so it crosses process boundaries as is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import fields
from typing import Any

from disco.scheduler.endpoint import Endpoint, GenerationRequest
from disco.scheduler.planner import Planner
from disco.scheduler.profiles import DeviceProfile, ServerProfile, load_profile

from .agent import DeviceAgent
from .config import AgentConfig, FleetConfig
from .coordinator import Coordinator, CoordinatorConfig
from .engines.emulated import EmulatedEndpoint
from .local_planner import StaticPlanner
from .network import NetworkEndpoint
from .results import ResultsLog, outcome_to_dict
from .telemetry import AgentMetrics, merge_metrics

PlannerFactory = Callable[[str, DeviceProfile], Planner]


class EmulatedFleet:
    """``config.devices`` emulated devices (:class:`~disco.device_agents.config.FleetConfig`).

    ``planner``: one planner for every device (e.g. the scheduler actor behind the Planner
    protocol) or ``planner_factory(device_id, profile)`` for one each; default: race both.
    ``server``: the server endpoint the devices reach through their networks; default: an
    emulated server of ``server_profile``, which is also what the devices' coordinators price
    and estimate migrations with. ``id_prefix`` names the devices (``emu-0``, ...);
    ``results_path`` (JSONL) receives every outcome.
    """

    def __init__(
        self,
        config: FleetConfig,
        *,
        planner: Planner | None = None,
        planner_factory: PlannerFactory | None = None,
        server: Endpoint | None = None,
        server_profile: str = "gpt-4o-mini",
        id_prefix: str = "emu",
        coordinator: CoordinatorConfig | None = None,
        results_path: str | None = None,
    ) -> None:
        cfg = config
        if cfg.devices <= 0:
            raise ValueError(f"an emulated fleet needs devices > 0, got {cfg.devices}")
        self.config = cfg
        self.id_prefix = id_prefix
        sp = load_profile(server_profile, "server")
        assert isinstance(sp, ServerProfile)
        self.server_profile = sp
        self.server = server or EmulatedEndpoint(
            sp,
            seed=cfg.seed,
            time_scale=cfg.time_scale,
            fail_after_tokens=cfg.server_fail_after_tokens,
        )
        self.results = ResultsLog(results_path) if results_path else None
        self.agents: dict[str, DeviceAgent] = {}
        for i in range(cfg.devices):
            device_id = f"{id_prefix}-{i}"
            prof = load_profile(cfg.profiles[i % len(cfg.profiles)], "device")
            assert isinstance(prof, DeviceProfile)
            device = EmulatedEndpoint(prof, seed=cfg.seed + i, time_scale=cfg.time_scale)
            net = NetworkEndpoint(self.server, cfg.network, seed=cfg.seed + i)
            agent_cfg = AgentConfig(device_id=device_id, planner_timeout_ms=cfg.planner_timeout_ms)
            # None: an agent's defaults (its stall limits, its retries).
            coord = Coordinator(net, device, sp, prof, coordinator or agent_cfg.coordinator())
            if planner_factory is not None:
                p = planner_factory(device_id, prof)
            else:
                p = planner or StaticPlanner()
            self.agents[device_id] = DeviceAgent(coord, p, agent_cfg, results=self.results)

    # --- requests ---------------------------------------------------------------------------
    def device_ids(self) -> list[str]:
        return list(self.agents)

    def agent(self, device_id: str) -> DeviceAgent:
        try:
            return self.agents[device_id]
        except KeyError:
            raise KeyError(f"no device {device_id!r} in this fleet") from None

    async def generate(
        self,
        device_id: str,
        prompt: str,
        max_tokens: int,
        request_id: str | None = None,
        output_tokens: int | None = None,
        with_events: bool = False,
    ) -> dict[str, Any]:
        """Run one request to the end; returns its outcome as a dict (``text`` included).

        A failed request is returned with ``error`` set, not raised, so one bad stream does not
        take a batch of ``asyncio.gather`` calls (or a Ray caller) down with it.
        """
        ex = await self.agent(device_id).start(
            GenerationRequest(prompt, max_tokens), request_id, output_tokens
        )
        events = []
        try:
            async for ev in ex:
                events.append(ev)
        except Exception:
            pass  # the outcome carries the error
        finally:
            await ex.aclose()
        assert ex.outcome is not None
        d = outcome_to_dict(ex.outcome, device_id=device_id, failovers=ex.failovers)
        d["text"] = "".join(ev.text for ev in events)
        if with_events:
            d["events"] = [
                {"index": e.index, "text": e.text, "time": e.time, "source": e.source.value}
                for e in events
            ]
        return d

    async def stream(
        self, device_id: str, prompt: str, max_tokens: int, request_id: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Token by token, as dicts (index, text, time, source, finish_reason)."""
        ex = await self.agent(device_id).start(GenerationRequest(prompt, max_tokens), request_id)
        try:
            async for ev in ex:
                yield {
                    "index": ev.index,
                    "text": ev.text,
                    "time": ev.time,
                    "source": ev.source.value if ev.source else None,
                    "finish_reason": ev.finish_reason,
                }
        finally:
            await ex.aclose()

    # --- telemetry --------------------------------------------------------------------------
    def metrics(self) -> AgentMetrics:
        """The fleet's counters summed over its devices."""
        return merge_metrics(a.metrics for a in self.agents.values())

    def metrics_text(self) -> str:
        return self.metrics().render(
            prefix="disco_fleet", labels=f'fleet="{self.id_prefix}"'
        )

    def stats(self) -> dict[str, Any]:
        m = self.metrics()
        return {f.name: getattr(m, f.name) for f in fields(AgentMetrics)} | {
            "devices": len(self.agents)
        }

    async def close(self) -> None:
        for a in self.agents.values():
            await a.drain()
        await self.server.close()
        if self.results is not None:
            self.results.close()
