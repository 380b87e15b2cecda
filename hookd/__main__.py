"""`python -m hookd`, the same as the `hookd` command."""

import sys

from hookd.cli import main

# Guarded: multiprocessing's spawn re-imports the parent's main module in every worker.
if __name__ == "__main__":
    sys.exit(main())
