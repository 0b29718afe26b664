"""`python -m trlax ...` runs the command line (see trlax.cli)."""

import sys

from trlax.cli import main

sys.exit(main())
