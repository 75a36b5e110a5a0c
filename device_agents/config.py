"""The device side's configuration: one class per concept, shared by every layer above.

- :class:`HttpConfig`: an OpenAI-compatible HTTP front (the agent's API; the Serve app's too).
- :class:`NetworkConfig`: the last hop between a device and the server (emulated delays).
- :class:`AgentConfig`: one device agent (engine, HTTP front, planner timeout).
- :class:`FleetConfig`: many emulated devices in one process.

The testbed YAML (``disco.cluster.config.TestbedConfig``) is made of these same classes: its
``agent`` and ``fleet`` sections are :class:`AgentConfig` and :class:`FleetConfig`, and
``server.http`` is an :class:`HttpConfig`, so a key has one name and one unit everywhere
(durations in milliseconds, ``_ms``; cluster/deploy/README.md lists every key). A few fields say
where the cluster runs a part (``enabled``, ``server``, ``devices_per_actor``, ``num_cpus``,
``resources``); the device code ignores them. Plain data, no heavy imports: the cluster's config
loader and Ray actors build these from YAML and pickles.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

API_KEY_ENV = "DISCO_API_KEY"  # the agent's key when the config and the command line have none
DISTRIBUTIONS = ("constant", "normal", "exponential", "lognormal", "pareto")
SERVER_MODES = ("handle", "http", "emulated")  # how a device reaches the server (see FleetConfig)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HttpConfig:
    """An OpenAI-compatible HTTP front: the device agent's API (``disco agent``, the testbed's
    ``agent.http``) and the Serve app's (the testbed's ``server.http``; there ``host``/``port``
    are the Serve proxy's). Sizes in bytes and tokens."""

    host: str = "127.0.0.1"  # never all interfaces unless asked
    port: int = 8080  # 0: a free port at start
    # When set, every request must carry "Authorization: Bearer KEY"; off loopback one is
    # required (check_exposure). Each front also reads one from an environment variable.
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096  # (the default max_tokens is the wire's DEFAULT_MAX_TOKENS)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_tokens_limit < 1 or self.max_body_bytes < 1024:
            raise ValueError("need max_tokens_limit >= 1 and max_body_bytes >= 1024")

    def key(self, env_var: str = API_KEY_ENV) -> str | None:
        """The key in force: ``api_key``, else the environment variable ``env_var``."""
        return self.api_key or os.environ.get(env_var) or None

    def check_exposure(self, env_var: str = API_KEY_ENV) -> None:
        """Refuse to listen beyond loopback without a key (in the config or ``env_var``): an
        open API on a network spends the server budget of whoever reaches it."""
        if not is_loopback(self.host) and not self.key(env_var):
            raise ValueError(
                f"binding {self.host} exposes the API: set an API key (api_key, --api-key or "
                f"{env_var}) or bind 127.0.0.1"
            )


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """The last hop of one device: one-way delay = rtt_ms / 2 + a jitter sample of scale
    ``jitter_ms`` (both in milliseconds).

    ``normal``: |N(0, jitter)|; ``exponential``: mean jitter; ``lognormal``: jitter * LogN(0, 1)
    (a heavier tail); ``pareto``: jitter * Pareto(shape 2.5) (rare long stalls, the last hop's
    tail); ``constant``: no jitter. The defaults are a phone on a good mobile link.
    """

    rtt_ms: float = 50.0
    jitter_ms: float = 10.0
    distribution: str = "lognormal"

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.jitter_ms < 0:
            raise ValueError("rtt_ms and jitter_ms must be >= 0")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}"
            )

    def one_way(self, rng: np.random.Generator) -> float:
        """One one-way delay, in seconds (what the event loop sleeps)."""
        j = self.jitter_ms / 1000.0
        if self.distribution == "constant" or j == 0:
            extra = 0.0
        elif self.distribution == "normal":
            extra = abs(float(rng.normal(0.0, j)))
        elif self.distribution == "exponential":
            extra = float(rng.exponential(j))
        elif self.distribution == "lognormal":
            extra = j * float(rng.lognormal(0.0, 1.0))
        else:
            extra = j * float(rng.pareto(2.5))
        return self.rtt_ms / 2000.0 + extra


def _check_timeout(value: float) -> None:
    if value <= 0:
        raise ValueError(f"planner_timeout_ms must be > 0, got {value}")


@dataclass(frozen=True)
class AgentConfig:
    """One device agent: what it runs, where it listens, how long it waits for a plan.

    ``disco agent`` builds one from its flags; the testbed starts one as a Ray actor from the
    YAML's ``agent`` section when ``enabled``, reaching the server by ``server`` (``handle``: a
    Serve DeploymentHandle; ``http``: the OpenAI API) with ``num_cpus``/``resources``.
    """

    enabled: bool = False
    device_id: str = "agent-0"
    # A GGUF path or a bundled model name; None: the small device model (models.py).
    model: str | None = None
    engine: str = "llamacpp"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    device_profile: str | None = None  # for migration estimates; None: the scheduler's
    http: HttpConfig = field(default_factory=lambda: HttpConfig(port=0))
    # A planner (the scheduler actor) that has not answered by then is replaced by the local
    # fallback policy for that request: one short timeout, here only.
    planner_timeout_ms: float = 100.0
    # A stream with no first token this long after it started (a device stream: after it got its
    # device slot) or no next token for stall_timeout_ms has failed: the other endpoint takes
    # over. None: no limit.
    first_token_timeout_ms: float | None = 60_000.0
    stall_timeout_ms: float | None = 10_000.0
    # The device engine runs device_slots streams at once (None: the engine's own limit,
    # llama.cpp 1); the rest wait in the agent's FIFO. Past max_device_queue waiting streams, a
    # request that the plan gives to the device alone is refused (HTTP 429); None: no limit.
    device_slots: int | None = None
    max_device_queue: int | None = 16
    # Once both endpoints failed, the one that failed first starts again (another replica, a
    # restarted engine), up to this many times per request (CoordinatorConfig.retries).
    retries: int = 2
    server: str = "handle"
    num_cpus: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.server not in ("handle", "http"):
            raise ValueError(f"server must be 'handle' or 'http', got {self.server!r}")
        _check_timeout(self.planner_timeout_ms)
        for name in ("first_token_timeout_ms", "stall_timeout_ms"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0 (or null: no limit), got {v}")
        if self.device_slots is not None and self.device_slots < 0:
            raise ValueError(f"device_slots must be >= 0, got {self.device_slots}")
        if self.max_device_queue is not None and self.max_device_queue < 0:
            raise ValueError(f"max_device_queue must be >= 0, got {self.max_device_queue}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")

    def coordinator(self) -> Any:
        """The coordinator's config these fields ask for (a CoordinatorConfig)."""
        from .coordinator import CoordinatorConfig

        def s(ms: float | None) -> float | None:
            return None if ms is None else ms / 1000.0

        return CoordinatorConfig(
            first_token_timeout_s=s(self.first_token_timeout_ms),
            stall_timeout_s=s(self.stall_timeout_ms),
            device_slots=self.device_slots,
            retries=self.retries,
        )


@dataclass(frozen=True)
class FleetConfig:
    """Emulated devices (``disco.device_agents.fleet.EmulatedFleet``): ``devices`` of them,
    taking ``profiles`` round-robin, each behind its own ``network``.

    The testbed hosts them ``devices_per_actor`` to a Ray actor (``num_cpus``, ``resources``) and
    connects them to the server as ``server`` says: ``handle`` (a Serve DeploymentHandle, no HTTP
    proxy hop), ``http`` (the Serve app's OpenAI API, as an edge box would) or ``emulated`` (an
    in-process emulated server in each fleet actor: no Serve, for scale).
    """

    devices: int = 0
    profiles: tuple[str, ...] = ("xiaomi14-qwen0.5b", "pixel7pro-bloom1.1b")  # names or files
    network: NetworkConfig = field(default_factory=NetworkConfig)
    time_scale: float = 1.0  # < 1 replays the device profiles faster (tests)
    seed: int = 0  # device i draws from seed + i
    planner_timeout_ms: float = 100.0  # as AgentConfig's, for every device
    # Fault injection on the fleet's own emulated server (failover runs; see EmulatedEndpoint).
    server_fail_after_tokens: int | None = None
    server: str = "handle"
    # Round trip from these devices to the scheduler actor (ms, emulated; 0: the cluster's own),
    # paid by every per-request plan (planning: central) or every sync (planning: snapshot).
    scheduler_rtt_ms: float = 0.0
    devices_per_actor: int = 500
    num_cpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "profiles", tuple(self.profiles))  # a YAML list is fine too
        if self.devices < 0 or self.devices_per_actor < 1:
            raise ValueError("need devices >= 0 and devices_per_actor >= 1")
        if not self.profiles:
            raise ValueError("profiles must name at least one device profile")
        if self.server not in SERVER_MODES:
            raise ValueError(f"server must be one of {SERVER_MODES}, got {self.server!r}")
        if self.time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        if self.scheduler_rtt_ms < 0:
            raise ValueError("scheduler_rtt_ms must be >= 0")
        _check_timeout(self.planner_timeout_ms)
