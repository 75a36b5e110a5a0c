"""A `ray start --head` of a test's own, as a user starts one, that cannot touch any other Ray.

Its own temp dir (``--temp-dir``), loopback address, free ports for everything Ray opens on the
head (GCS, Ray Client, node and object managers, metrics, the dashboard agent, the runtime-env
agent, the dashboard when asked), its own token (``RAY_AUTH_TOKEN`` in ``env``: ``~/.ray`` is not
touched). ``stop()`` ends exactly its processes: those whose command line names its temp dir or
its GCS address (``ray stop`` would stop every Ray on the machine), SIGTERM then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from disco.cluster.runtime import free_port

RAY = str(Path(sys.executable).with_name("ray"))


class RayHead:
    def __init__(
        self, *, num_cpus: int = 2, resources: dict[str, float] | None = None,
        dashboard: bool = False,
    ) -> None:  # fmt: skip
        # Short: Ray's unix sockets live under it (paths are limited to ~107 bytes).
        self.temp_dir = tempfile.mkdtemp(prefix="drh", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_port = free_port() if dashboard else None
        self.num_cpus = num_cpus
        self.resources = resources or {}
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("RAY_", "DISCO_"))}  # fmt: skip
        self.env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                     "RAY_ADDRESS": self.address, "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
        self.start_output = ""

    @property
    def dashboard_url(self) -> str | None:
        return None if self.dashboard_port is None else f"http://127.0.0.1:{self.dashboard_port}"

    def command(self) -> list[str]:
        ports = {
            "--port": self.port,
            "--ray-client-server-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--metrics-export-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1",
               "--temp-dir", self.temp_dir, "--num-cpus", str(self.num_cpus),
               "--disable-usage-stats"]  # fmt: skip
        for flag, port in ports.items():
            cmd += [flag, str(port)]
        if self.resources:
            cmd += ["--resources", json.dumps(self.resources)]
        if self.dashboard_port is None:
            cmd += ["--include-dashboard=false"]
        else:
            cmd += ["--include-dashboard=true", "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(self.dashboard_port)]  # fmt: skip
        return cmd

    def start(self, timeout_s: float = 60.0) -> RayHead:
        try:
            p = subprocess.run(self.command(), env=self.env, cwd=self.temp_dir, text=True,
                               capture_output=True, timeout=timeout_s)  # fmt: skip
        except BaseException:
            self.stop()
            raise
        self.start_output = p.stdout + p.stderr
        if p.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({p.returncode}):\n{self.start_output[-3000:]}")
        return self

    def processes(self) -> list[psutil.Process]:
        """This head's processes (raylet, GCS, workers, agents...), never another Ray's."""
        mine = re.compile(rf"{re.escape(self.temp_dir)}(?![\w.-])|\d:{self.port}(?!\d)")
        me = os.getpid()
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
            except (psutil.Error, TypeError):
                continue
            if p.pid != me and mine.search(cmd):
                found.append(p)
        return found

    def stop(self, timeout_s: float = 3.0) -> None:
        """SIGTERM this head's processes, SIGKILL what is left after ``timeout_s``; twice, for
        workers that a dying raylet may still have been starting."""
        for _ in range(2):
            procs = self.processes()
            if not procs:
                break
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(procs, timeout=timeout_s)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(alive, timeout=5)
            time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
