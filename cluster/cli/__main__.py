"""`python -m cluster.cli`: the `dsv4` command."""

import sys

from cluster.cli.main import main

sys.exit(main())
