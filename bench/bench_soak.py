"""Soak: the chaos benchmark's testbed under a steady load for a long time, sampling every
process it starts (RSS, open file descriptors, live asyncio tasks), Ray's object store and the
scheduler's state size; growth per hour after warm-up (issue 15).

    disco bench soak --duration 1800 --out DIR

writes DIR/soak.json (per process: the value after warm-up, at the end, and the slope of a linear
fit per hour; disco.cluster.soak's docstring) and DIR/soak.png. Embedded Ray of its own, loopback
only, torn down at the end.
"""

from __future__ import annotations

import sys

from disco.cluster.soak import main

if __name__ == "__main__":
    sys.exit(main())
