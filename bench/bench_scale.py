"""Scale: 100,000 registered emulated devices and thousands of concurrent streams planning from
the scheduler's snapshots under budget leases (or per request, central), on this machine (issue
11).

    disco bench scale --devices 100000 --streams 3000 --duration 120 --out DIR
    disco bench scale --devices 10000 --streams 300 --scheduler-rtt-ms 50 --planning both --out DIR

writes DIR/scale.json (concurrent streams, token-timing error, plan overhead, budget used, snapshot
age, the scheduler's CPU seconds, syncs, leases; every key: disco.cluster.scale_bench's docstring
and KEYS) and DIR/scale.png (streams and budget used over time). Embedded Ray of its own, loopback
only, torn down at the end.
"""

from __future__ import annotations

import sys

from disco.cluster.scale_bench import main

if __name__ == "__main__":
    sys.exit(main())
