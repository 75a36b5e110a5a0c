"""Typed configuration of a testbed: Ray, the Serve server deployment, the scheduler, the fleet.

One YAML file maps onto :class:`TestbedConfig`; every section is optional and has defaults that
run on a laptop (local Ray, one emulated server replica, no fleet). Loading is strict: an unknown
key or a value of the wrong type raises :class:`ConfigError` naming the dotted path, so a typo in
a config never silently falls back to a default; a section given in part keeps the defaults of
the keys it leaves out.

The device side's sections are the device side's own classes (``disco.device_agents.config``):
``fleet`` is a :class:`FleetConfig`, ``agent`` an :class:`AgentConfig`, ``fleet.network`` a
:class:`NetworkConfig` and ``server.http`` / ``agent.http`` an :class:`HttpConfig`; this module
adds what only the cluster has (Ray, the Serve deployment, the scheduler actor). Every key, its
unit and its default: cluster/deploy/README.md.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from disco.device_agents.config import AgentConfig, FleetConfig, HttpConfig, NetworkConfig

T = TypeVar("T")
# The Serve app's key when server.http.api_key is not set (read in the replicas' environment).
SERVER_API_KEY_ENV = "DISCO_SERVER_API_KEY"


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the offending key."""


@dataclass(frozen=True)
class RayConfig:
    # None: start an embedded local Ray (or join RAY_ADDRESS when that is set); "auto" or
    # "ray://host:10001" / "host:6379": connect to an existing cluster.
    address: str | None = None
    namespace: str = "disco"
    num_cpus: int | None = None  # only for an embedded local Ray
    include_dashboard: bool = False  # the dashboard doubles Ray's start time and memory here


@dataclass(frozen=True)
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(
                f"autoscaling: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                f"got min={self.min_replicas} max={self.max_replicas}"
            )
        if self.target_ongoing_requests <= 0:
            raise ConfigError("autoscaling.target_ongoing_requests must be > 0")

    def to_serve(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }


@dataclass(frozen=True)
class ServerConfig:
    """The Ray Serve deployment that hosts one server engine per replica."""

    # A name in disco.scheduler.endpoint.ENDPOINTS ("emulated", "llamacpp", "vllm", "openai"),
    # or "package.module:factory" for an engine outside the registry.
    engine: str = "emulated"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    model_name: str = "disco-server"  # the OpenAI `model` the route answers to
    app_name: str = "disco"
    route_prefix: str = "/"
    num_replicas: int = 1  # ignored when `autoscaling` is set
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = 64
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # e.g. {"disco_server": 0.01}
    # 0: every token is its own SSE chunk, sent at once. > 0: coalesce chunks over this interval,
    # as Ray Serve LLM does by default (50 ms); kept only to measure what it costs.
    stream_batching_interval_ms: float = 0.0
    # Serve's HTTP proxy (host, port) and the app's limits and key; the key may also come from
    # DISCO_SERVER_API_KEY in the replicas' environment.
    http: HttpConfig = field(default_factory=lambda: HttpConfig(port=8000))
    # "HeadOnly": one HTTP proxy (also what several nodes on one machine need: they share an
    # address); "EveryNode": a proxy per node, for a real multi-machine cluster.
    proxy_location: str = "HeadOnly"

    def __post_init__(self) -> None:
        if self.proxy_location not in ("HeadOnly", "EveryNode", "Disabled"):
            raise ConfigError(
                f"server.proxy_location must be HeadOnly, EveryNode or Disabled, "
                f"got {self.proxy_location!r}"
            )
        if not self.engine:
            raise ConfigError("server.engine must be a non-empty engine name")
        if self.num_replicas < 1:
            raise ConfigError("server.num_replicas must be >= 1")
        if self.max_ongoing_requests < 1:
            raise ConfigError("server.max_ongoing_requests must be >= 1")
        if self.stream_batching_interval_ms < 0:
            raise ConfigError("server.stream_batching_interval_ms must be >= 0")


PLANNING_MODES = ("central", "snapshot")


@dataclass(frozen=True)
class SchedulerConfig:
    """The central SchedulerActor and the policy it wraps."""

    # A name in disco.scheduler.policies.POLICIES, or "package.module:factory".
    policy: str = "disco"
    regime: str = "server"  # "server" (DiSCo-S) or "device" (DiSCo-D)
    budget: float = 0.5
    migration: bool = True
    window: int = 2000
    recompute_every: int = 100
    seed: int = 0
    server_profile: str = "gpt-4o-mini"  # a named profile or a JSON file
    device_profile: str = "xiaomi14-qwen0.5b"
    actor_name: str = "disco-scheduler"
    max_restarts: int = -1  # restart forever; state comes back from the checkpoint
    # Where the budget state is checkpointed: "gcs" (Ray's GCS key-value store: survives actor
    # restarts on any node), a file path, or "none".
    checkpoint: str = "gcs"
    checkpoint_interval_s: float = 0.05
    num_cpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    # How devices plan (issue 11): "central" asks this actor per request (one actor call, a WAN
    # round trip on a real phone); "snapshot" plans on the device from the policy snapshot the
    # actor publishes, under a budget lease, and reports outcomes in batches.
    planning: str = "central"
    publish_interval_s: float = 1.0  # snapshot: at most one fit and publish per interval
    sync_s: float = 0.5  # snapshot: how often a holder (fleet actor, agent) syncs
    lease_period_s: float = 2.0  # snapshot: a budget lease covers this long
    lease_headroom: float = 0.25  # snapshot: allowance over the fitted share (a cap, not a target)

    def __post_init__(self) -> None:
        if self.planning not in PLANNING_MODES:
            raise ConfigError(
                f"scheduler.planning must be one of {PLANNING_MODES}, got {self.planning!r}"
            )
        if min(self.publish_interval_s, self.sync_s, self.lease_period_s) <= 0:
            raise ConfigError("scheduler.publish_interval_s, sync_s and lease_period_s must be > 0")
        if self.lease_headroom < 0:
            raise ConfigError("scheduler.lease_headroom must be >= 0")
        if self.regime not in ("server", "device"):
            raise ConfigError(f"scheduler.regime must be 'server' or 'device', got {self.regime!r}")
        if not 0.0 <= self.budget <= 1.0:
            raise ConfigError(f"scheduler.budget must be in [0, 1], got {self.budget}")
        if self.window <= 0 or self.recompute_every <= 0:
            raise ConfigError("scheduler.window and scheduler.recompute_every must be > 0")
        if self.checkpoint_interval_s < 0:
            raise ConfigError("scheduler.checkpoint_interval_s must be >= 0")


@dataclass(frozen=True)
class TestbedConfig:
    __test__ = False  # not a pytest test class

    ray: RayConfig = field(default_factory=RayConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)


# ---- loading -------------------------------------------------------------------------------


def load_config(path: str | Path) -> TestbedConfig:
    """Read a YAML file into a :class:`TestbedConfig`; any problem is a :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    try:
        return from_dict(TestbedConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def from_dict(cls: type[T], data: Any, where: str = "", base: T | None = None) -> T:
    """Build dataclass ``cls`` from plain data, checking keys and types recursively; keys that
    ``data`` leaves out keep ``base``'s values (a nested section: its field's default)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown key(s) {', '.join(map(str, unknown))} "
            f"(known: {', '.join(fields)})"
        )
    kwargs = {
        k: _coerce(hints[k], v, f"{where}.{k}" if where else k, _default(fields[k]))
        for k, v in data.items()
    }
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _coerce(tp: Any, value: Any, where: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, default) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, default if isinstance(default, tp) else None)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):  # tuple[X, ...]: a list in YAML
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        it = typing.get_args(tp)[0]
        items = [_coerce(it, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (for YAML dumps and for shipping a config to a Ray actor)."""
    return dataclasses.asdict(cfg)


__all__ = [
    "AgentConfig", "AutoscalingConfig", "ConfigError", "FleetConfig", "HttpConfig",
    "NetworkConfig", "RayConfig", "SERVER_API_KEY_ENV", "SchedulerConfig", "ServerConfig", "TestbedConfig",
    "from_dict", "load_config", "to_dict",
]  # fmt: skip
