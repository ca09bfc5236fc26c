"""``python -m jaxckpt``: the command line (see :mod:`jaxckpt.cli`)."""

import sys

from .cli import main

sys.exit(main())
