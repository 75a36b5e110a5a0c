"""Typed config loading: defaults, the shipped YAML files, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from needs import require

from disco.cluster.cli import main
from disco.cluster.config import (
    ConfigError,
    ServerConfig,
    TestbedConfig,
    from_dict,
    load_config,
    to_dict,
)

DEPLOY = Path(__file__).resolve().parents[2] / "cluster" / "deploy"


def test_defaults_are_local_and_loopback():
    cfg = TestbedConfig()
    assert cfg.ray.address is None and cfg.server.http.host == "127.0.0.1"
    assert cfg.server.stream_batching_interval_ms == 0
    assert from_dict(TestbedConfig, to_dict(cfg)) == cfg  # round trip


def test_shipped_testbed_yaml_loads():
    cfg = load_config(DEPLOY / "testbed.yaml")
    assert cfg.fleet.devices == 100 and cfg.fleet.network.distribution == "lognormal"
    assert cfg.scheduler.policy == "disco" and cfg.scheduler.budget == pytest.approx(0.3)
    assert cfg.agent.http.port == 0 and cfg.agent.planner_timeout_ms == 100
    assert cfg.server.proxy_location == "HeadOnly" and cfg.server.http.port == 8000


def test_the_device_sections_are_the_device_sides_own_classes():
    """One class per concept: the YAML's fleet, agent, network and http sections are built
    straight into disco.device_agents.config's classes, never into cluster-side copies."""
    from disco.device_agents import config as device

    cfg = TestbedConfig()
    assert type(cfg.fleet) is device.FleetConfig and type(cfg.agent) is device.AgentConfig
    assert type(cfg.fleet.network) is device.NetworkConfig
    assert type(cfg.server.http) is type(cfg.agent.http) is device.HttpConfig


def test_a_partial_section_keeps_the_sections_defaults():
    # server.http's default port is Serve's 8000 (HttpConfig's own default is the agent's 8080):
    # giving only the host must not change the port.
    cfg = from_dict(TestbedConfig, {"server": {"http": {"host": "127.0.0.2"}},
                                    "agent": {"http": {"api_key": "k"}}})  # fmt: skip
    assert cfg.server.http.port == 8000 and cfg.server.http.host == "127.0.0.2"
    assert cfg.agent.http.port == 0 and cfg.agent.http.api_key == "k"


def test_units_are_milliseconds_where_the_key_says_so(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("fleet:\n  devices: 2\n  profiles: [a, b]\n"
                 "  network: {rtt_ms: 80, jitter_ms: 0, distribution: constant}\n")  # fmt: skip
    import numpy as np

    fleet = load_config(p).fleet
    assert fleet.profiles == ("a", "b")  # a YAML list
    assert fleet.network.one_way(np.random.default_rng(0)) == pytest.approx(0.040)  # seconds


def test_serve_yaml_args_are_a_server_config():
    doc = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    args = doc["applications"][0]["args"]
    cfg = from_dict(ServerConfig, args, "server")
    assert cfg.engine == "llamacpp" and cfg.autoscaling is not None
    assert cfg.autoscaling.to_serve()["max_replicas"] == 4


def test_rayservice_embeds_a_valid_serve_config():
    doc = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = serve_cfg["applications"][0]
    assert app["import_path"] == "disco.cluster.serve_app:app_builder"
    assert from_dict(ServerConfig, app["args"], "server").engine == "vllm"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("server:\n  enigne: emulated\n", "server: unknown key(s) enigne"),
        ("server:\n  num_replicas: two\n", "server.num_replicas: expected an integer"),
        ("scheduler:\n  budget: 1.5\n", "budget must be in [0, 1]"),
        ("scheduler:\n  regime: both\n", "regime must be 'server' or 'device'"),
        ("fleet:\n  network: {rtt_ms: -1}\n", "rtt_ms and jitter_ms must be >= 0"),
        ("server:\n  autoscaling: {min_replicas: 3, max_replicas: 2}\n", "min_replicas"),
        ("server: [1, 2]\n", "server: expected a mapping"),
        ("ray: {address: 5}\n", "ray.address: expected a string"),
        ("server: {http: {port: 70000}}\n", "port must be in"),
        ("server: {http: {proxy_location: HeadOnly}}\n", "server.http: unknown key(s)"),
        ("server: {proxy_location: Somewhere}\n", "proxy_location must be"),
        ("fleet: {n_devices: 3}\n", "fleet: unknown key(s) n_devices"),
        ("fleet: {network: {rtt_s: 0.05}}\n", "fleet.network: unknown key(s) rtt_s"),
        ("agent: {planner_timeout_ms: 0}\n", "planner_timeout_ms must be > 0"),
        ("agent: {host: 0.0.0.0}\n", "agent: unknown key(s) host"),
        ("a: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_app_builder_accepts_the_serve_yaml_args():
    require("ray.serve")
    from disco.cluster.serve_app import app_builder, deployment_options

    doc = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    app = app_builder(doc["applications"][0]["args"])
    assert app is not None
    opts = deployment_options(from_dict(ServerConfig, doc["applications"][0]["args"]))
    assert "num_replicas" not in opts and opts["autoscaling_config"]["min_replicas"] == 1
    assert opts["ray_actor_options"]["resources"] == {"disco_server": 0.01}


def test_cli_serve_with_a_bad_config_exits_2_with_one_line(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("server:\n  replicas: 3\n")
    assert main(["serve", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key(s) replicas" in err[0]


def test_cli_agent_refuses_a_public_host_without_a_key(capsys, monkeypatch):
    monkeypatch.delenv("DISCO_API_KEY", raising=False)
    code = main(["agent", "--server", "http://127.0.0.1:1", "--host", "0.0.0.0", "--port", "9"])
    assert code == 2
    assert "API key" in capsys.readouterr().err
