"""Chaos: server replicas, fleet actors, the agent's llama.cpp engine and the scheduler killed at
random, streams stalled and devices partitioned, under a steady open-loop load; what the users
lost, duplicated or got out of order, recovery time and budget drift (issue 15).

    disco bench chaos --duration 600 --kill-every 5 --seed 0 --out DIR

writes DIR/chaos.json (every number's meaning: disco.cluster.chaos's docstring), DIR/timeline.png
(tokens by endpoint over time, faults marked) and DIR/records.jsonl (each stream as its user got
it). Everything runs on an embedded Ray of its own, on loopback, and is torn down at the end.
"""

from __future__ import annotations

import sys

from disco.cluster.chaos import main

if __name__ == "__main__":
    sys.exit(main())
