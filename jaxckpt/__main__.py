"""``python -m jaxckpt``: the command line (see :mod:`jaxckpt.tools.cli`)."""

import sys

from jaxckpt.tools.cli import main

sys.exit(main())
