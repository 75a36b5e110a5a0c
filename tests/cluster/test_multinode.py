"""Three Ray nodes on one machine (``ray.cluster_utils.Cluster``): a head, a server node and a
device node told apart by custom resources; the testbed places each part on its node."""

from __future__ import annotations

import httpx
import pytest
from needs import require

ray = require("ray")
cluster_utils = require("ray.cluster_utils")

from disco.cluster.config import (  # noqa: E402
    FleetConfig,
    NetworkConfig,
    RayConfig,
    SchedulerConfig,
    ServerConfig,
    TestbedConfig,
)
from disco.cluster.runtime import Testbed  # noqa: E402


@pytest.fixture(scope="module")
def three_nodes():
    cluster = cluster_utils.Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    server_node = cluster.add_node(num_cpus=1, resources={"disco_server": 4})
    device_node = cluster.add_node(num_cpus=1, resources={"disco_device": 4})
    cluster.wait_for_nodes()
    try:
        yield cluster, server_node.node_id, device_node.node_id
    finally:
        cluster.shutdown()


def test_server_replicas_and_fleets_land_on_their_nodes(three_nodes):
    cluster, server_node, device_node = three_nodes
    cfg = TestbedConfig(
        ray=RayConfig(address=cluster.address, namespace="disco-multinode"),
        server=ServerConfig(
            engine="emulated", engine_kwargs={"profile": "gpt-4o-mini", "time_scale": 0.02},
            num_cpus=0.1, num_replicas=2, resources={"disco_server": 1},
        ),
        scheduler=SchedulerConfig(policy="race", resources={"disco_server": 0.1}),
        fleet=FleetConfig(
            devices=4, devices_per_actor=2, time_scale=0.02, resources={"disco_device": 1},
            network=NetworkConfig(rtt_ms=2, jitter_ms=0, distribution="constant"),
        ),
    )  # fmt: skip
    tb = Testbed.start(cfg)
    try:
        assert tb.owns_ray  # it joined the cluster, so shutdown() disconnects
        replica_nodes = {
            httpx.get(f"{tb.server_url}/health", timeout=10).json()["node_id"] for _ in range(8)
        }
        assert replica_nodes == {server_node}
        assert ray.get(tb.scheduler.stats.remote())["node_id"] == server_node
        assert {ray.get(f.node_id.remote()) for f in tb.fleets} == {device_node}
        # a request from a device node streams from the server node through Serve
        fleet = tb.fleets[0]
        dev = ray.get(fleet.device_ids.remote())[0]
        out = ray.get(fleet.generate.remote(dev, "Hello from the edge", 10), timeout=120)
        assert out["error"] is None and len(out["token_times"]) == 10
        assert ray.get(tb.scheduler.stats.remote())["plans"] >= 1
    finally:
        tb.shutdown()
    assert not ray.is_initialized()


def test_disco_serve_deploys_onto_the_running_cluster(three_nodes, tmp_path, capsys):
    from disco.cluster.cli import main
    from disco.cluster.runtime import free_port

    cluster, server_node, _ = three_nodes
    assert not ray.is_initialized()
    port = free_port()
    cfg = tmp_path / "testbed.yaml"
    cfg.write_text(
        "ray: {namespace: disco-cli}\n"
        "server:\n"
        "  engine: emulated\n"
        "  engine_kwargs: {profile: gpt-4o-mini, time_scale: 0.02}\n"
        "  num_cpus: 0.1\n"
        "  resources: {disco_server: 1}\n"
        f"  http: {{port: {port}}}\n"
        "scheduler: {policy: race, actor_name: cli-scheduler}\n"
    )
    assert main(["serve", "--config", str(cfg), "--address", cluster.address]) == 0
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{port}/v1/completions" in out
    assert not ray.is_initialized()  # the command disconnected; what it deployed stays up
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
    assert health["node_id"] == server_node
    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 3},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    ray.init(address=cluster.address, namespace="disco-cli", log_to_driver=False)
    try:
        sched = ray.get_actor("cli-scheduler", namespace="disco-cli")  # detached, still there
        assert ray.get(sched.stats.remote())["policy"] == "race"
        ray.kill(sched)
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
