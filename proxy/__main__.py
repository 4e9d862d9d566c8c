"""``python -m proxy`` is the ``tether`` command."""

import sys

from .cli import main

sys.exit(main())
