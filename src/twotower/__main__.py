"""``python -m twotower`` runs the ``twotower`` command line."""

import sys

from twotower.cli import main

sys.exit(main())
