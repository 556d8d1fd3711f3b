"""``python -m asymcheck.cli``: the ``asymcheck`` command."""

import sys

from . import main

sys.exit(main())
