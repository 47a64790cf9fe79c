"""``python -m displback`` runs the command line."""

import sys

from displback.app.cli import main

sys.exit(main())
