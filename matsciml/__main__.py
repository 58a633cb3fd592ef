"""``python -m matsciml``: the same as the ``matsciml`` command."""

import sys

from matsciml.cli import main

sys.exit(main())
