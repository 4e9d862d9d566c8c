"""``python -m proxy`` is the ``tether`` command."""

import sys

from .cli.main import main

sys.exit(main())
