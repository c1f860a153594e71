"""`python -m cluster.bench`."""

import sys

from cluster.bench.cli import main

sys.exit(main())
