"""Issue 11 on four Ray nodes (``ray.cluster_utils.Cluster``): the scheduler on the head, Serve
replicas on a server node, one fleet actor on each of two device nodes, planning on the devices
from snapshots under budget leases. One device node is removed mid-run: the other fleet's
requests all finish, the scheduler counts the lost lease, and the budget holds."""

from __future__ import annotations

import random
import threading
import time

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

pytestmark = pytest.mark.slow

BUDGET = 0.3
WORDS = ["the", "a", "device", "server", "token", "stream", "budget", "lease", "snapshot", "fleet", "node"]


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(3.5, 1.0)) + 3))


def drive(fleet, devices, stop: threading.Event, out: list, seed: int) -> None:
    """Batches of requests to one fleet actor until ``stop`` (bounded: 400 batches at most)."""
    rng = random.Random(seed)
    for _ in range(400):
        if stop.is_set():
            return
        calls = [{"device_id": d, "prompt": prompt(rng), "max_tokens": rng.randint(4, 24)}
                 for d in devices]  # fmt: skip
        try:
            out.extend(ray.get(fleet.generate_many.remote(calls), timeout=60))
        except Exception as e:  # noqa: BLE001 - the fleet's node is gone
            out.append({"lost_batch": len(calls), "error": type(e).__name__})
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def four_nodes():
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "resources": {"disco_head": 1}},
    )
    cluster.add_node(num_cpus=1, resources={"disco_server": 4})
    a = cluster.add_node(num_cpus=1, resources={"disco_device": 1})
    b = cluster.add_node(num_cpus=1, resources={"disco_device": 1})
    cluster.wait_for_nodes()
    try:
        yield cluster, a, b
    finally:
        cluster.shutdown()


def test_losing_a_fleet_node_loses_only_its_devices(four_nodes):
    cluster, node_a, node_b = four_nodes
    cfg = TestbedConfig(
        ray=RayConfig(address=cluster.address, namespace="disco-fleets"),
        server=ServerConfig(
            engine="emulated", engine_kwargs={"profile": "gpt-4o-mini", "time_scale": 0.05},
            num_cpus=0.1, num_replicas=1, resources={"disco_server": 1},
        ),
        scheduler=SchedulerConfig(
            policy="disco", regime="server", budget=BUDGET, planning="snapshot",
            publish_interval_s=0.5, sync_s=0.2, lease_period_s=0.5,
            resources={"disco_head": 0.1},
        ),
        fleet=FleetConfig(
            devices=16, devices_per_actor=8, time_scale=0.05, resources={"disco_device": 1},
            network=NetworkConfig(rtt_ms=2, jitter_ms=0, distribution="constant"),
            scheduler_rtt_ms=20.0,
        ),
    )  # fmt: skip
    tb = Testbed.start(cfg)
    try:
        nodes = [ray.get(f.node_id.remote()) for f in tb.fleets]
        assert sorted(nodes) == sorted([node_a.node_id, node_b.node_id])
        by_node = dict(zip(nodes, tb.fleets, strict=True))
        keep, doomed = by_node[node_a.node_id], by_node[node_b.node_id]
        stop = threading.Event()
        got: dict[str, list] = {"keep": [], "doomed": []}
        threads = [
            threading.Thread(target=drive, args=(f, ray.get(f.device_ids.remote()), stop, got[k], i))
            for i, (k, f) in enumerate((("keep", keep), ("doomed", doomed)))
        ]
        for t in threads:
            t.start()
        time.sleep(12.0)
        cluster.remove_node(node_b)  # the fleet actor on it dies with its streams
        time.sleep(10.0)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        kept = [r for r in got["keep"] if "lost_batch" not in r]
        assert len(kept) >= 80 and all(r["error"] is None for r in kept), kept[:3]
        assert any("lost_batch" in r for r in got["doomed"]), "the doomed fleet never failed"
        st = ray.get(tb.scheduler.status.remote(), timeout=30)
        snaps = st["snapshots"]
        assert st["planning"] == "snapshot" and snaps["syncs"] > 20 and snaps["publishes"] >= 2
        # The dead fleet's lease is lost (it stopped syncing), and counted.
        assert snaps["leases_lost"] >= 1 and snaps["holders_live"] == 1, snaps
        # The survivor planned locally all along: no plan call reached the scheduler.
        planner = ray.get(keep.stats.remote())["planner"]
        assert planner["plans"] >= len(kept) and planner["cold_plans"] == 0
        assert planner["plan_overhead_ms_p50"] < 5.0  # a local decision (loose: a busy CPU)
        # The budget: what the survivors reported stays near b (a short run: a loose band).
        assert st["requests"] >= len(kept) * 0.9
        assert st["budget"]["spent_share"] <= BUDGET + 0.1, st["budget"]
    finally:
        tb.shutdown()
