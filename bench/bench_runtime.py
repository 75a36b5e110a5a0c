"""The Ray runtime's own costs: what the agent + scheduler + Serve path adds to a stream, how many
decisions one scheduler actor makes, and what Serve-LLM-style stream batching does to TTFT.

(1) Latency. The server engine is the emulated one replaying a fixed profile (TTFT 50 ms, one
    token every 10 ms, no randomness), so every difference between paths is overhead:
    - ``engine``: the engine's stream consumed in this process (no HTTP, no Ray);
    - ``serve``: an HTTP stream straight from the Serve app (proxy -> replica -> engine);
    - ``agent``: an HTTP stream from a device agent (a Ray actor) that asks the scheduler actor
      for a plan (``server-only``, so only the server runs) and streams from the Serve app.
    Requests are sequential and interleaved across paths. TTFT is request-sent -> first content
    chunk at the client; TBT is every gap between content chunks.
(2) Scheduler throughput: decisions/s of one SchedulerActor running the ``disco`` policy, with
    many concurrent callers, one Ray call per decision vs the micro-batching ActorPlanner, from
    this process and from caller actors. Then plan latency (P50, P99) while another actor streams
    reports in, with checkpointing off and on (GCS, every 50 ms: the snapshot is taken on the
    actor's event loop, the write runs on a thread).
(3) Stream batching: TTFT straight from Serve with ``stream_batching_interval_ms`` 0 (ours) vs
    20 and 50 (Ray Serve LLM's default).

    .venv/bin/python bench/bench_runtime.py --requests 200 --write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import ray

from disco.cluster.config import (
    AgentConfig,
    RayConfig,
    SchedulerConfig,
    ServerConfig,
    TestbedConfig,
)
from disco.cluster.device_actors import start_agent
from disco.cluster.planner_client import ActorPlanner
from disco.cluster.runtime import Testbed, deploy_server, server_url
from disco.cluster.scheduler_actor import start_scheduler
from disco.device_agents.engines.emulated import EmulatedEndpoint
from disco.scheduler.endpoint import GenerationRequest
from disco.scheduler.types import EndpointKind, Request, RequestOutcome

RESULTS = Path(__file__).parent / "results" / "runtime.md"
PROMPT = "Explain how a device and a server can share the work of answering one question."
TTFT_S, TBT_S = 0.050, 0.010


def write_profile(d: Path) -> str:
    p = d / "steady-server.json"
    p.write_text(json.dumps({
        "kind": "server", "name": "steady", "prices": {"input_per_mtok": 0.15,
        "output_per_mtok": 0.6}, "tbt_s": TBT_S, "tbt_cv": 0.0, "ttft_samples": [TTFT_S],
    }))  # fmt: skip
    return str(p)


def median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs) if xs else float("nan")


def p99_ms(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return 1000 * s[min(len(s) - 1, int(0.99 * len(s)))]


# ---- (1) latency ---------------------------------------------------------------------------------


async def engine_stream(engine: EmulatedEndpoint, tokens: int, i: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    times = []
    gen = GenerationRequest(PROMPT, tokens, request_id=f"e{i}")
    async for _ in engine.stream(gen):
        times.append(time.perf_counter())
    return times[0] - t0, [b - a for a, b in zip(times, times[1:], strict=False)]


async def http_stream(client: httpx.AsyncClient, url: str, tokens: int, model: str) -> tuple:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "stream": True}
    t0 = time.perf_counter()
    times = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
    return times[0] - t0, [b - a for a, b in zip(times, times[1:], strict=False)]


async def handle_stream(handle: Any, tokens: int) -> tuple:
    t0 = time.perf_counter()
    times = []
    gen = handle.options(stream=True).generate.remote({"prompt": PROMPT, "max_tokens": tokens})
    async for chunk in gen:
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            times.append(time.perf_counter())
    return times[0] - t0, [b - a for a, b in zip(times, times[1:], strict=False)]


async def measure_latency(
    tb: Testbed, profile: str, n: int, tokens: int, http_agent_url: str
) -> dict[str, dict]:
    engine = EmulatedEndpoint(profile)
    paths = {
        "engine": None,
        "serve": tb.server_url,
        "handle": "handle",
        "agent": tb.agent_url,
        "agent_http": http_agent_url,
    }
    ttft: dict[str, list[float]] = {k: [] for k in paths}
    tbt: dict[str, list[float]] = {k: [] for k in paths}
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(5):  # warm-up: connections, first-call imports
            await http_stream(client, tb.server_url, 4, "disco-server")
            await http_stream(client, tb.agent_url, 4, "disco")
            await http_stream(client, http_agent_url, 4, "disco")
            await handle_stream(tb.server_handle, 4)
        for i in range(n):
            for name, url in paths.items():
                if url is None:
                    t, g = await engine_stream(engine, tokens, i)
                elif url == "handle":
                    t, g = await handle_stream(tb.server_handle, tokens)
                else:
                    model = "disco" if name.startswith("agent") else "disco-server"
                    t, g = await http_stream(client, url, tokens, model)
                ttft[name].append(t)
                tbt[name].extend(g)
    return {
        k: {"ttft_p50": median_ms(ttft[k]), "ttft_p99": p99_ms(ttft[k]),
            "tbt_p50": median_ms(tbt[k]), "tbt_p99": p99_ms(tbt[k]), "n": len(ttft[k])}
        for k in paths
    }  # fmt: skip


async def measure_batching(tb: Testbed, intervals: list[float], n: int, tokens: int) -> dict:
    out = {}
    async with httpx.AsyncClient(timeout=60) as client:
        for ms in intervals:
            cfg = replace(
                tb.config.server, app_name=f"b{int(ms)}", route_prefix=f"/b{int(ms)}",
                stream_batching_interval_ms=ms,
            )  # fmt: skip
            deploy_server(cfg)
            url = server_url(cfg, int(tb.server_url.rsplit(":", 1)[1].split("/")[0]))
            for _ in range(3):
                await http_stream(client, url, 4, "disco-server")
            ttfts, gaps = [], []
            for _ in range(n):
                t, g = await http_stream(client, url, tokens, "disco-server")
                ttfts.append(t)
                gaps.extend(g)
            out[ms] = {"ttft_p50": median_ms(ttfts), "ttft_p99": p99_ms(ttfts),
                       "tbt_p50": median_ms(gaps), "added_p50": median_ms(ttfts) - 1000 * TTFT_S}  # fmt: skip
            ray.serve.delete(cfg.app_name)
    return out


# ---- (2) scheduler throughput --------------------------------------------------------------------


async def _callers(planner_plan, concurrency: int, seconds: float, tag: str) -> int:
    stop = time.perf_counter() + seconds
    done = 0

    async def one(c: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            await planner_plan(Request(f"{tag}-{c}-{i}", 0.0, 50 + (i * 37 + c) % 900))
            i += 1
            done += 1

    await asyncio.gather(*(one(c) for c in range(concurrency)))
    return done


@ray.remote(num_cpus=0)
class CallerActor:
    """A separate process calling the scheduler, like an emulated fleet does."""

    def __init__(self, scheduler: Any) -> None:
        self.planner = ActorPlanner(scheduler)

    async def run(self, concurrency: int, seconds: float, tag: str) -> int:
        return await _callers(self.planner.plan, concurrency, seconds, tag)

    async def ping_latency(self, n: int) -> float:
        """Median ms of an empty actor call: Ray's floor for any remote decision."""
        xs = []
        for _ in range(n):
            t0 = time.perf_counter()
            await self.planner.actor.ping.remote()
            xs.append(time.perf_counter() - t0)
        return median_ms(xs[10:])

    async def latency(self, n: int) -> float:
        """Median ms of one plan() when nothing else is going on."""
        return median_ms(await self.latencies(n, "lat"))

    async def latencies(self, n: int, tag: str) -> list[float]:
        """Seconds per sequential plan(), the first 10 (warm-up) left out."""
        xs = []
        for i in range(n):
            t0 = time.perf_counter()
            await self.planner.plan(Request(f"{tag}-{i}", 0.0, 100))
            xs.append(time.perf_counter() - t0)
        return xs[10:]

    async def report(self, n: int, start: int = 0) -> None:
        """``n`` outcomes, reported the way agents do (concurrently, micro-batched)."""
        await asyncio.gather(*(self.planner.report(_outcome(start + i)) for i in range(n)))

    async def report_for(self, seconds: float, per_batch: int) -> int:
        """Reports ``per_batch`` outcomes at a time until ``seconds`` have passed."""
        stop, i = time.perf_counter() + seconds, 0
        while time.perf_counter() < stop:
            await self.report(per_batch, i)
            i += per_batch
        return i


def _outcome(i: int) -> RequestOutcome:
    n = 50 + (i * 37) % 900
    return RequestOutcome(f"o{i}", 0.0, n, token_times=[0.3 + (i % 7) * 0.05],
                          server_prompt_tokens=n, server_output_tokens=20,
                          first_token_from=EndpointKind.SERVER, server_started=True)  # fmt: skip


async def measure_checkpointing(seconds: float) -> list[dict]:
    """Plan latency while reports stream in, checkpointing off vs on (GCS every 50 ms)."""
    rows = []
    for store in ("none", "gcs"):
        cfg = SchedulerConfig(policy="disco", actor_name=f"bench-ckpt-{store}", checkpoint=store,
                              checkpoint_interval_s=0.05)  # fmt: skip
        actor = start_scheduler(cfg)
        planner, reporter = CallerActor.remote(actor), CallerActor.remote(actor)
        await reporter.report.remote(3000)  # fill the policy's 2,000-request window
        reports = reporter.report_for.remote(seconds, 20)
        xs = await planner.latencies.remote(int(seconds * 500), f"ck-{store}")
        sent = await reports
        stats = await actor.stats.remote()
        rows.append({"checkpoint": store, "p50_ms": median_ms(xs), "p99_ms": p99_ms(xs),
                     "plans": len(xs), "reports_per_s": sent / seconds,
                     "checkpoints": stats.get("checkpoints", 0),
                     "write_ms": stats.get("checkpoint_write_ms", 0.0)})  # fmt: skip
        for a in (planner, reporter, actor):
            ray.kill(a)
    return rows


async def measure_scheduler(seconds: float) -> list[dict]:
    cfg = SchedulerConfig(policy="disco", actor_name="bench-scheduler", checkpoint="none")
    actor = start_scheduler(cfg)
    await actor.ping.remote()
    rows = []

    async def direct(req: Request):
        return await actor.plan.remote(req)

    lat_caller = CallerActor.remote(actor)
    ping_ms = await lat_caller.ping_latency.remote(300)
    rows.append({"mode": "empty actor call (`ping`): 1 caller actor, sequential",
                 "callers": "1", "rate": 1000.0 / ping_ms, "p50_ms": ping_ms})  # fmt: skip
    plan_ms = await lat_caller.latency.remote(300)
    rows.append({"mode": "plan latency: 1 caller actor, sequential ActorPlanner.plan",
                 "callers": "1", "rate": 1000.0 / plan_ms, "p50_ms": plan_ms})  # fmt: skip
    ray.kill(lat_caller)
    for conc in (1, 100):
        t0 = time.perf_counter()
        n = await _callers(direct, conc, seconds, f"d{conc}")
        rows.append({"mode": "one Ray call per decision", "callers": f"{conc} coroutines, 1 process",
                     "rate": n / (time.perf_counter() - t0)})  # fmt: skip
    for conc in (100, 1000):
        planner = ActorPlanner(actor)
        t0 = time.perf_counter()
        n = await _callers(planner.plan, conc, seconds, f"b{conc}")
        rows.append({"mode": "ActorPlanner micro-batching", "callers": f"{conc} coroutines, 1 process",
                     "rate": n / (time.perf_counter() - t0)})  # fmt: skip
    callers = [CallerActor.remote(actor) for _ in range(4)]
    await asyncio.gather(*(c.run.remote(1, 0.2, "w") for c in callers))  # warm-up
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(c.run.remote(250, seconds, f"a{i}") for i, c in
                                    enumerate(callers)))  # fmt: skip
    rows.append({"mode": "ActorPlanner micro-batching", "callers": "4 actors x 250 coroutines",
                 "rate": sum(counts) / (time.perf_counter() - t0)})  # fmt: skip
    for c in callers:
        ray.kill(c)
    ray.kill(actor)
    return rows


# ---- report --------------------------------------------------------------------------------------


def render(
    lat: dict, sched: list[dict], ckpt: list[dict], batching: dict, args: argparse.Namespace
) -> str:
    lines = [
        "# Runtime benchmark (bench/bench_runtime.py)",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"Ray {ray.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"`python bench/bench_runtime.py --requests {args.requests} --tokens {args.tokens} "
        f"--seconds {args.seconds}`. Medians (P99 beside). Timings vary 20-30% run to run here "
        "(2 cores shared with other work).",
        "",
        f"## (1) TTFT and TBT by path (engine: TTFT {TTFT_S * 1000:.0f} ms, a token every "
        f"{TBT_S * 1000:.0f} ms, no randomness; {args.requests} sequential requests of "
        f"{args.tokens} tokens per path, interleaved)",
        "",
        "| path | TTFT p50 (ms) | TTFT p99 | added to TTFT vs engine (p50) | TBT p50 (ms) | TBT p99 |",
        "|---|---|---|---|---|---|",
    ]
    base = lat["engine"]["ttft_p50"]
    for name, label in (("engine", "engine in-process (direct)"),
                        ("handle", "Serve DeploymentHandle stream (no HTTP proxy)"),
                        ("serve", "HTTP straight from Serve (proxy -> replica)"),
                        ("agent", "client -HTTP-> agent + scheduler -handle-> Serve"),
                        ("agent_http", "client -HTTP-> agent + scheduler -HTTP-> Serve")):  # fmt: skip
        r = lat[name]
        lines.append(
            f"| {label} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
            f"{r['ttft_p50'] - base:+.2f} | {r['tbt_p50']:.2f} | {r['tbt_p99']:.2f} |"
        )
    over_http = lat["agent_http"]["ttft_p50"] - lat["serve"]["ttft_p50"]
    over_handle = lat["agent"]["ttft_p50"] - lat["handle"]["ttft_p50"]
    lines += [
        "",
        "What the agent + scheduler add on top of the Serve path they use (median TTFT; target "
        f"<= 2 ms): **{over_handle:+.2f} ms** over a handle stream, **{over_http:+.2f} ms** over "
        "an HTTP stream. The agent path's own pieces: one HTTP hop client -> agent (uvicorn), one "
        "scheduler plan (a Ray actor call, see (2)), the coordinator's queue hand-off.",
        "",
        f"## (2) Scheduler actor decisions/s (policy `disco`, {args.seconds:.0f} s per row)",
        "",
        "| mode | callers | decisions/s |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['mode']} | {r['callers']} | {r['rate']:,.0f}"
        + (f" (p50 {r['p50_ms']:.2f} ms per call)" if "p50_ms" in r else "")
        + " |"
        for r in sched
    ]
    lines += [
        "",
        "Plan latency (one caller actor, sequential `ActorPlanner.plan`) while another actor "
        "reports outcomes, 20 at a time, as fast as the actor takes them:",
        "",
        "| checkpoint | plan p50 (ms) | plan p99 (ms) | plans | reports/s | checkpoints written "
        "| last write (ms, on its thread) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['checkpoint']}{' (every 50 ms)' if r['checkpoint'] != 'none' else ''} | "
        f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['plans']} | {r['reports_per_s']:,.0f} | "
        f"{r['checkpoints']} | {r['write_ms']:.2f} |"
        for r in ckpt
    ]
    lines += [
        "",
        f"## (3) Serve stream batching vs TTFT ({args.requests // 2} sequential requests per row, "
        "HTTP straight from Serve)",
        "",
        "| stream_batching_interval_ms | TTFT p50 (ms) | TTFT p99 | added vs engine TTFT (p50) | TBT p50 |",
        "|---|---|---|---|---|",
    ]
    for ms, r in batching.items():
        lines.append(
            f"| {ms:g}{' (ours, default)' if ms == 0 else ''}"
            f"{' (Ray Serve LLM default)' if ms == 50 else ''} | {r['ttft_p50']:.2f} | "
            f"{r['ttft_p99']:.2f} | {r['added_p50']:+.2f} | {r['tbt_p50']:.2f} |"
        )
    lines += [
        "",
        "## Reading these numbers",
        "",
        "- Serve's own per-request cost dominates the path: on this 2-core machine a plain "
        "`GET /health` through Serve's HTTP proxy takes ~9-11 ms, a handle call skips the proxy "
        "and saves about half of it. That is why agents inside the cluster (fleets, the agent "
        "actor) reach the replicas through a DeploymentHandle (`fleet.server: handle`), and only "
        "agents on other machines use HTTP.",
        "- What DiSCo's agent + scheduler add is the column difference between an agent row and "
        "the Serve row it uses. About 1-2 ms of it is the scheduler's plan: one Ray actor call, "
        "whose floor here is ~0.9-1.5 ms (an empty `ping` call) — see the first two rows of (2). The "
        "rest is the client -> agent HTTP hop (uvicorn in a Ray actor) and the coordinator's "
        "queue hand-off. The <= 2 ms target is not met on this machine; the plan call is already "
        "at Ray's floor (tuples on the wire, no extra task per call).",
        "- Decisions/s: one Ray call per decision is bounded by the call's round trip; the "
        "ActorPlanner gathers the calls made in one event-loop tick into one `plan_wire` call, so "
        "one actor keeps up with thousands of concurrent streams (target >= 5,000/s).",
        "- Checkpointing (the scheduler's state to GCS every 50 ms while reports arrive): the "
        "snapshot (a pickle of the policy, ~0.1 ms for DiSCo's 2,000-request window) is taken on "
        "the actor's event loop and the GCS write runs on a thread, so plan latency with it on "
        "stays within run-to-run noise of it off (P50 and P99 in (2)). Writing on the loop, as "
        "before, added each write (~1 ms to a local GCS, a round trip to a remote one) to every "
        "plan that came in meanwhile.",
        "- Stream batching: Serve-LLM-style coalescing waits one interval before its first drain, "
        "so it adds about the whole interval to every TTFT (~+17-20 ms at 20 ms, ~+50 ms at 50 ms "
        "vs 0); TBT p50 drops to ~0 because tokens then arrive in bursts. Our deployment "
        "defaults to 0.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--write", action="store_true", help=f"write {RESULTS}")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        profile = write_profile(Path(d))
        cfg = TestbedConfig(
            ray=RayConfig(num_cpus=4),
            server=ServerConfig(engine="emulated", engine_kwargs={"profile": profile},
                                num_cpus=0.1, http=replace(ServerConfig().http, port=0)),
            scheduler=SchedulerConfig(policy="server-only", server_profile=profile,
                                      checkpoint="none"),
            agent=AgentConfig(enabled=True, engine="emulated", num_cpus=0.1,
                              engine_kwargs={"profile": "xiaomi14-qwen0.5b"}),
        )  # fmt: skip
        with Testbed.start(cfg) as tb:
            http_cfg = replace(cfg, agent=replace(cfg.agent, server="http", device_id="agent-http"))
            http_agent, http_agent_url = start_agent(http_cfg, tb.server_url, tb.scheduler)
            lat = asyncio.run(
                measure_latency(tb, profile, args.requests, args.tokens, http_agent_url)
            )
            ray.kill(http_agent)
            print(json.dumps(lat, indent=1))
            batching = asyncio.run(
                measure_batching(tb, [0.0, 20.0, 50.0], args.requests // 2, args.tokens)
            )
            print(json.dumps(batching, indent=1))
            sched = asyncio.run(measure_scheduler(args.seconds))
            print(json.dumps(sched, indent=1))
            ckpt = asyncio.run(measure_checkpointing(args.seconds))
            print(json.dumps(ckpt, indent=1))
    text = render(lat, sched, ckpt, batching, args)
    print(text)
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
