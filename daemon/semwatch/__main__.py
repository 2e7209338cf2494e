from __future__ import annotations

import sys

from semwatch.cli import main

sys.exit(main())
