"""``python -m matsciml``: the same as the ``matsciml`` command."""

import sys

from matsciml.cli.app import main

sys.exit(main())
