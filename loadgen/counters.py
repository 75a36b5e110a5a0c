"""The device agents' own counters over a load run: their ``/metrics``, read before and after.

What the user's stream cannot tell the load generator (money spent on the server, energy spent on
the device, whether a hand-over was a planned migration or a failover) each agent counts itself
and serves at ``GET <target>/metrics`` in the Prometheus text format (``disco_agent_*`` series;
the same counters ``disco demo`` sums over Ray). A run's share is the difference of two readings,
so it includes any other traffic those agents served meanwhile. A target that is no disco agent
(a plain OpenAI server, the mock server) has no such series: the run's counters are then unknown,
never guessed.

Standard library only (``urllib``): this module also runs in the CLI process, beside Ray.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

PREFIX = "disco_agent_"
# Prometheus series (less the prefix; with its source label for tokens) -> counter name.
SERIES: dict[str, str] = {
    "requests_completed_total": "completed",
    "requests_failed_total": "failed",
    "requests_cancelled_total": "cancelled",
    "requests_rejected_total": "rejected",
    "device_refused_total": "refused",  # the device's queue was full (agents that have one)
    'tokens_total{source="server"}': "tokens_server",
    'tokens_total{source="device"}': "tokens_device",
    "migrations_total": "migrations",
    "failovers_total": "failovers",
    "server_cost_usd_total": "server_cost_usd",
    "device_energy_joules_total": "device_energy_j",
    "prompt_tokens_total": "prompt_tokens",
    'prefill_tokens_total{endpoint="server"}': "prefill_server",
    'prefill_tokens_total{endpoint="device"}': "prefill_device",
}
# Info series: the latest value, not a difference (1 where the agent's budget has that regime).
INFO: dict[str, str] = {
    'budget_regime{regime="server"}': "regime_server",
    'budget_regime{regime="device"}': "regime_device",
}
# Every request an agent answered ends in one of these.
FINISHED = ("completed", "failed", "cancelled", "rejected", "refused")


def parse_metrics(text: str) -> dict[str, float] | None:
    """The agent counters in a Prometheus text page (summed over label sets other than the token
    source, e.g. the devices of a fleet's page); None when the page has no agent series."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        try:
            series, value = line[len(PREFIX) :].rsplit(None, 1)
            v = float(value)
        except ValueError:
            continue
        name, _, labels = series.partition("{")
        if name in ("prefill_tokens_total", "budget_regime"):
            key_label = "endpoint" if name == "prefill_tokens_total" else "regime"
            side = next((x for x in ("server", "device") if f'{key_label}="{x}"' in labels), None)
            if side is None:
                continue
            name = f'{name}{{{key_label}="{side}"}}'
        if name == "tokens_total":
            src = (
                "server"
                if 'source="server"' in labels
                else "device"
                if 'source="device"' in labels
                else None
            )
            if src is None:
                continue
            name = f'tokens_total{{source="{src}"}}'
        key = SERIES.get(name) or INFO.get(name)
        if key is not None:
            out[key] = out.get(key, 0.0) + v
    return out or None


@dataclass
class Reading:
    """One reading of every target: its counters, or why there are none."""

    counters: dict[str, dict[str, float]] = field(default_factory=dict)  # url -> counters
    problems: dict[str, str] = field(default_factory=dict)  # url -> why it has no counters


def read_one(url: str, timeout_s: float = 2.0) -> dict[str, float] | str:
    """``url``'s counters, or a short reason why it has none."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as r:
            text = r.read(1 << 20).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return f"GET /metrics answered HTTP {e.code}"
    except (OSError, ValueError) as e:
        return f"GET /metrics failed: {getattr(e, 'reason', None) or e}"
    got = parse_metrics(text)
    return got if got is not None else "/metrics has no disco_agent_* counters"


def read_all(urls: Sequence[str], timeout_s: float = 2.0) -> Reading:
    """Every target at once (a few threads), so a silent one costs ``timeout_s`` once."""
    uniq = list(dict.fromkeys(urls))
    reading = Reading()
    if not uniq:
        return reading
    with ThreadPoolExecutor(max_workers=min(16, len(uniq))) as pool:
        for url, got in zip(uniq, pool.map(lambda u: read_one(u, timeout_s), uniq), strict=True):
            if isinstance(got, str):
                reading.problems[url] = got
            else:
                reading.counters[url] = got
    return reading


def read_settled(
    before: Reading,
    expected: Mapping[str, int],
    settle_s: float = 3.0,
    timeout_s: float = 2.0,
) -> tuple[Reading, bool]:
    """The reading after a run: read again until every agent counts at least ``expected[url]``
    more finished requests than ``before`` (an agent books a request just after its last chunk),
    or ``settle_s`` has passed. Returns the reading and whether it settled."""
    deadline = time.monotonic() + settle_s
    while True:
        after = read_all(list(before.counters), timeout_s)
        settled = all(
            _finished(after.counters.get(u, {})) - _finished(c) >= expected.get(u, 0)
            for u, c in before.counters.items()
        )
        if settled or time.monotonic() >= deadline:
            return after, settled
        time.sleep(0.1)


def _finished(c: Mapping[str, float]) -> float:
    return sum(c.get(k, 0.0) for k in FINISHED)


def run_counters(before: Reading, after: Reading, urls: Sequence[str]) -> dict[str, float] | str:
    """The counters' increase over the run summed over ``urls``, or why it is unknown (some
    target has no counters, or lost them: a restarted agent starts again from zero)."""
    total: dict[str, float] = dict.fromkeys(SERIES.values(), 0.0)
    for url in dict.fromkeys(urls):
        why = before.problems.get(url) or after.problems.get(url)
        if why is not None or url not in before.counters or url not in after.counters:
            return f"{url}: {why or 'no reading'}"
        b, a = before.counters[url], after.counters[url]
        for k in INFO.values():
            if a.get(k):
                total[k] = total.get(k, 0.0) + a[k]
        for k in SERIES.values():
            d = a.get(k, 0.0) - b.get(k, 0.0)
            if d < 0:
                return f"{url}: its counters went backwards (the agent restarted during the run)"
            total[k] += d
    return total
