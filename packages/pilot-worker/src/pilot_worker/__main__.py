"""``python -m pilot_worker``: the ``pilot-worker`` command."""

from __future__ import annotations

import sys

from pilot_worker._cli import main

if __name__ == "__main__":
    sys.exit(main())
