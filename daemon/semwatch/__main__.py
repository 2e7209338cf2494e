"""`python -m semwatch`: the same as the `semwatch` console script (the demo starts the daemon so)."""

from __future__ import annotations

import sys

from semwatch.cli import main

sys.exit(main())
