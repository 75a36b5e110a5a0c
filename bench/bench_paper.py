"""The DiSCo paper's tables beside ours: `disco reproduce` (bench/results/paper.md and its PNGs).

The same flags as `disco reproduce` (see `disco reproduce --help`):

    .venv/bin/python bench/bench_paper.py            # = disco bench paper = disco reproduce
"""

from __future__ import annotations

import sys

from disco.cluster.commands.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
