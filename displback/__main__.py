"""``python -m displback`` runs the command line."""

import sys

from displback.cli import main

sys.exit(main())
