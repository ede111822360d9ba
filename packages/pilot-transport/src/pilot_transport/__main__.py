"""``python -m pilot_transport``: the ``pilot-transport`` command."""

import sys

from pilot_transport._cli import main

sys.exit(main())
