"""Turn configured names into factories: engines (ENDPOINTS) and policies (POLICIES).

Registries fill when the modules defining the implementations are imported, so a Ray worker that
builds an engine or a policy imports those packages first. A name of the form
``package.module:attr`` bypasses the registry (for out-of-tree engines and test doubles).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from disco.scheduler.endpoint import ENDPOINTS, Endpoint
from disco.scheduler.policies.base import POLICIES, Policy, PolicyConfig
from disco.scheduler.profiles import DeviceProfile, ServerProfile, load_profile
from disco.scheduler.registry import UnknownNameError
from disco.scheduler.types import Regime

if TYPE_CHECKING:
    from disco.cluster.config import SchedulerConfig

# Packages whose import registers implementations; optional ones may be absent.
ENGINE_PACKAGES = ("disco.device_agents.engines", "disco.cluster.engines")
POLICY_PACKAGES = ("disco.scheduler.policies",)


def _import_attr(spec: str) -> Any:
    mod, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownNameError(f"cannot load {spec!r}: {e}") from None


def _import_packages(names: tuple[str, ...]) -> list[str]:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the package itself is not there (yet)
                missing.append(name)
                continue
            raise
    return missing


def engine_factory(name: str) -> Any:
    if ":" in name:
        return _import_attr(name)
    _import_packages(ENGINE_PACKAGES)
    return ENDPOINTS.get(name)


def build_engine(name: str, kwargs: dict[str, Any]) -> Endpoint:
    return engine_factory(name)(**kwargs)


def policy_factory(name: str) -> Any:
    if ":" in name:
        return _import_attr(name)
    _import_packages(POLICY_PACKAGES)
    return POLICIES.get(name)


def build_policy(
    name: str, config: PolicyConfig, server: ServerProfile, device: DeviceProfile
) -> Policy:
    return policy_factory(name)(config, server, device)


class OfflinePolicyError(ValueError):
    """A simulation-only policy was asked to plan live requests (one line, for the CLI)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"policy {name!r} needs each request's server TTFT in advance, which live requests "
            "never carry (it is the simulator's lower bound): use it with `disco sim` only"
        )


def check_live_policy(name: str) -> None:
    """Refuse a policy that only a simulation can run: one that ``wants_hints`` (the oracle)
    would plan every live request without its hint, i.e. silently on the unconstrained side."""
    if getattr(policy_factory(name), "wants_hints", False):
        raise OfflinePolicyError(name)


def build_live_policy(
    name: str, config: PolicyConfig, server: ServerProfile, device: DeviceProfile
) -> Policy:
    """:func:`build_policy` for live runs (scheduler actor, agent): refuses offline policies."""
    check_live_policy(name)
    policy = build_policy(name, config, server, device)
    if getattr(policy, "wants_hints", False):  # a ``module:factory`` that builds one
        raise OfflinePolicyError(name)
    return policy


def policy_from_config(cfg: SchedulerConfig) -> Policy:
    """The live policy a scheduler config describes (the scheduler actor's, and the local copy
    device agents fall back to)."""
    server = load_profile(cfg.server_profile, "server")
    device = load_profile(cfg.device_profile, "device")
    assert isinstance(server, ServerProfile) and isinstance(device, DeviceProfile)
    pcfg = PolicyConfig(
        regime=Regime(cfg.regime),
        budget=cfg.budget,
        migration=cfg.migration,
        window=cfg.window,
        recompute_every=cfg.recompute_every,
        seed=cfg.seed,
    )
    return build_live_policy(cfg.policy, pcfg, server, device)


def policy_names() -> list[str]:
    _import_packages(POLICY_PACKAGES)
    return POLICIES.names()
