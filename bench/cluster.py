"""`python -m bench.cluster --ready FILE [--replicas N] [--pool-size P]`: hookd replicas sharing state
in Redis behind haproxy (`tests.deployment`), kept up until SIGTERM, as one process tree, so the
comparison benchmark accounts for their CPU and memory as for any other contender. The haproxy URL
is written to FILE once every replica is in rotation.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from tests.deployment import Deployment


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ready", type=Path, required=True, help="file to write the URL to once serving")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--pool-size", type=int, default=1, help="workers per replica")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as home:
        deployed = Deployment(Path(home), count=args.replicas, pool_size=args.pool_size)
        try:
            args.ready.write_text(deployed.url)
            stop.wait()
        finally:
            deployed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
