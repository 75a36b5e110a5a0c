"""Per-agent counters and a TTFT histogram, rendered in the Prometheus text format.

Hand-written (no client library): a handful of series does not justify a dependency, and each
agent (or emulated device) owns its own instance, so there is no process-global registry.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from disco.scheduler.types import RequestOutcome

# Seconds; spans a fast local device (tens of ms) to a congested server tail (several seconds).
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class AgentMetrics:
    requests: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0  # bad input answered with a 4xx
    planner_errors: int = 0  # planner reports that failed (telemetry lost)
    planner_fallbacks: int = 0  # requests the planner did not plan in time: planned locally
    device_refused: int = 0  # refused: the device's queue was full and the plan needed it
    # The device's queue (device_queue.py), read when rendered: gauges, summed over devices.
    device_running: int = 0
    device_waiting: int = 0
    device_queued: int = 0  # streams that had to wait for a device slot (a counter)
    device_saturated: int = 0  # 1 while the queue is at its limit (requests are refused)
    # Prompt tokens of finished requests, and what each endpoint prefilled for them (race losers
    # included: the budget's spend, scheduler/billing.py).
    prompt_tokens: int = 0
    prefill_server: int = 0
    prefill_device: int = 0
    # Which endpoint the budget constrains ("server"/"device"; None: not known), an info series.
    regime: str | None = None
    tokens: int = 0
    tokens_server: int = 0
    tokens_device: int = 0
    migrations: int = 0
    failovers: int = 0
    server_cost_usd: float = 0.0
    device_energy_j: float = 0.0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS) + 1))
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def observe(self, outcome: RequestOutcome, failovers: int, cancelled: bool) -> None:
        if cancelled:
            self.cancelled += 1
        elif outcome.error:
            self.failed += 1
        else:
            self.completed += 1
        self.prompt_tokens += outcome.prompt_tokens
        self.prefill_server += outcome.server_prompt_tokens
        self.prefill_device += outcome.device_prompt_tokens
        n_server = sum(1 for s in outcome.token_sources if s.value == "server")
        self.tokens += len(outcome.token_sources)
        self.tokens_server += n_server
        self.tokens_device += len(outcome.token_sources) - n_server
        self.migrations += outcome.migrated_at is not None
        self.failovers += failovers
        self.server_cost_usd += outcome.server_cost
        self.device_energy_j += outcome.device_energy_j
        ttft = outcome.ttft
        if ttft is not None:
            self.ttft_buckets[bisect.bisect_left(TTFT_BUCKETS, ttft)] += 1
            self.ttft_sum += ttft
            self.ttft_count += 1

    def render(self, prefix: str = "disco_agent", labels: str = "") -> str:
        lb = f"{{{labels}}}" if labels else ""
        out: list[str] = []
        declared: set[str] = set()

        def counter(name: str, help_: str, value: float, extra: str = "") -> None:
            full = f"{prefix}_{name}"
            if full not in declared:
                declared.add(full)
                out.append(f"# HELP {full} {help_}\n# TYPE {full} counter\n")
            lab = ",".join(x for x in (labels, extra) if x)
            out.append(f"{full}{{{lab}}} {value}\n" if lab else f"{full} {value}\n")

        counter("requests_total", "Requests accepted.", self.requests)
        counter("requests_completed_total", "Requests streamed to the end.", self.completed)
        counter("requests_failed_total", "Requests that ended with an error.", self.failed)
        counter("requests_cancelled_total", "Requests the client abandoned.", self.cancelled)
        counter("requests_rejected_total", "Requests rejected as bad input.", self.rejected)
        counter("planner_errors_total", "Planner reports that failed (telemetry lost).",
                self.planner_errors)  # fmt: skip
        counter("planner_fallbacks_total",
                "Requests planned by the local fallback: the planner failed or was late.",
                self.planner_fallbacks)  # fmt: skip
        def gauge(name: str, help_: str, value: float) -> None:
            full = f"{prefix}_{name}"
            out.append(f"# HELP {full} {help_}\n# TYPE {full} gauge\n{full}{lb} {value}\n")

        gauge("device_streams_running", "Streams holding a device slot now.", self.device_running)
        gauge("device_streams_waiting", "Streams waiting for a device slot now.",
              self.device_waiting)  # fmt: skip
        gauge("device_saturated", "1 while the device's queue is at its limit: a request the "
              "plan gives to the device alone is refused.", self.device_saturated)  # fmt: skip
        counter("device_streams_queued_total", "Streams that waited for a device slot.",
                self.device_queued)  # fmt: skip
        counter("device_refused_total",
                "Requests refused: the device queue was full and the budget kept the server out.",
                self.device_refused)  # fmt: skip
        counter("prompt_tokens_total", "Prompt tokens of finished requests.", self.prompt_tokens)
        for side, v in (("server", self.prefill_server), ("device", self.prefill_device)):
            counter("prefill_tokens_total",
                    "Prompt tokens each endpoint prefilled (race losers included): the budget's "
                    "spend is the constrained endpoint's share of prompt_tokens_total.",
                    v, f'endpoint="{side}"')  # fmt: skip
        if self.regime is not None:
            full = f"{prefix}_budget_regime"
            lab = ",".join(x for x in (labels, f'regime="{self.regime}"') if x)
            out.append(f"# HELP {full} The endpoint the budget constrains (info).\n"
                       f"# TYPE {full} gauge\n{full}{{{lab}}} 1\n")  # fmt: skip
        counter("tokens_total", "Tokens delivered to users.", self.tokens_server, 'source="server"')
        counter("tokens_total", "Tokens delivered to users.", self.tokens_device, 'source="device"')
        counter("migrations_total", "Generations migrated mid-stream.", self.migrations)
        counter("failovers_total", "Hand-overs after an endpoint failed.", self.failovers)
        counter("server_cost_usd_total", "Server cost (list prices).", self.server_cost_usd)
        counter("device_energy_joules_total", "Device energy.", self.device_energy_j)
        h = f"{prefix}_ttft_seconds"
        out.append(f"# HELP {h} Time to first token at the user.\n# TYPE {h} histogram\n")
        cum = 0
        for bound, n in zip((*TTFT_BUCKETS, float("inf")), self.ttft_buckets, strict=True):
            cum += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lab = ",".join(x for x in (labels, f'le="{le}"') if x)
            out.append(f"{h}_bucket{{{lab}}} {cum}\n")
        out.append(f"{h}_sum{lb} {self.ttft_sum}\n{h}_count{lb} {self.ttft_count}\n")
        return "".join(out)


def merge_metrics(parts: Iterable[AgentMetrics]) -> AgentMetrics:
    """The sum of several agents' counters (a fleet, or an app over many devices)."""
    total = AgentMetrics()
    for m in parts:
        for f in fields(AgentMetrics):
            v = getattr(m, f.name)
            if f.name == "regime":  # one regime, or "mixed" when the devices disagree
                if v is not None and total.regime not in (None, v):
                    total.regime = "mixed"
                elif v is not None:
                    total.regime = v
            elif isinstance(v, list):
                acc = getattr(total, f.name)
                for i, x in enumerate(v):
                    acc[i] += x
            else:
                setattr(total, f.name, getattr(total, f.name) + v)
    return total
