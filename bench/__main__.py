"""`python -m bench`: the comparison of hookd with its alternatives (see bench/run.py)."""

import sys

from bench.run import main

sys.exit(main())
