"""``python -m server_api.devfleet.embedded [--host H] [--port P] [--persistence FILE] ...``: see :mod:`.runner`."""

import sys

from .runner import main

sys.exit(main())
